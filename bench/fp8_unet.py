"""FP8 UNet linears (``QUANTIZE=fp8``, :mod:`worker.generation.fp8`) against the 16-bit UNet and stock diffusers
(issue 23).

    python bench/fp8_unet.py --out-dir OUT --deadline 555     # CUDA: full-size SDXL, random weights, 1024²
    python bench/fp8_unet.py --dev                            # CPU: the dev-size architecture, checks the script

One process, one pipeline, the variants (``--variants``) applied to the same UNet in turn. JSON lines:

- ``unet``: ms per CFG step (CUDA-event median and min of ``--repeats`` calls; batch 1 means 2 UNet rows),
  the first call's seconds (the compile, for compiled variants), peak GPU memory, and the step's output against
  eager fp32 on the same inputs (relative L2). Default variants: eager fp32 / fp16 (stock's UNet) / fp8, regional
  (``compile_repeated_blocks``) fp16 / bf16 / fp8, then, deadline permitting, the whole UNet compiled (default
  mode) in fp16 and fp8. ``regional_fp8_prequantised`` (bench only) quantises the weights once, to measure
  what the shipped layer's per-call weight quantisation costs.
- ``quality`` (unless ``--no-quality``): each variant's full denoising (``--steps``, Euler, CFG 7.5, the same
  prompt and ``--seeds``) against eager fp32, stock (eager fp16) and the fp16 and bf16 regional engines:
  latents cosine, final-image (fp32 VAE decode, 8-bit) PSNR and max abs diff, NaN check; ``repeat``: the FP8
  run twice gives identical latents.
- ``unet_batch``: ms per step and per image at ``--batch-sizes`` for ``--batch-variants`` (one recompile each).
- ``kernels``: the CUDA kernels of the ``--profile`` variants by kind and the top ones (``bench/kernels.py``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import jsonlines  # noqa: E402
from bench.engine_speed import unet_inputs  # noqa: E402
from bench.jsonlines import emit, time_left  # noqa: E402
from bench.kernels import kernel_profile  # noqa: E402
from worker.generation.fp8 import Fp8Linear, disable_fp8, enable_fp8, fp8_layers, quantize_rows  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting, dramatic sky"
NEGATIVE = "blurry, low quality"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms_per_call(function: Any, repeats: int, warmup: int = 3) -> dict[str, float]:
    with torch.no_grad():
        for _ in range(warmup):
            function()
        sync()
        times = []
        for _ in range(repeats):
            if torch.cuda.is_available():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                function()
                times.append(1000 * (time.perf_counter() - began))
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2)}


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {k: cast(v, dtype) for k, v in value.items()}
    if torch.is_tensor(value) and value.is_floating_point() and value.ndim > 0:
        return value.to(dtype)
    return value


def rel_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    output = output.double()
    return float(f"{float((output - reference).norm() / reference.norm()):.3g}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)


def psnr(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    difference = (a.to(torch.int16) - b.to(torch.int16)).abs()
    mse = float((difference.double() ** 2).mean())
    return {
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
        "max_abs_diff": int(difference.max()),
    }


class PrequantisedFp8Linear(Fp8Linear):
    """Bench only: the weight quantised once (buffers), to measure what quantising it on every call costs.

    Not the shipped layer: merged LoRAs would need these buffers refreshed on every merge and restore.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[-1] % 16:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        shape = x.shape
        x_q, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
        out = torch._scaled_mm(
            x_q.contiguous(), self.w_q.t(), scale_a=x_scale, scale_b=self.w_scale_t, out_dtype=torch.bfloat16
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.w_q.shape[0])


def prequantise(unet: torch.nn.Module) -> None:
    for module in unet.modules():
        if type(module) is Fp8Linear:
            w_q, w_scale = quantize_rows(module.weight.detach())
            module.register_buffer("w_q", w_q, persistent=False)
            module.register_buffer("w_scale_t", w_scale.t().contiguous(), persistent=False)
            module.__class__ = PrequantisedFp8Linear


def unprequantise(unet: torch.nn.Module) -> None:
    for module in unet.modules():
        if type(module) is PrequantisedFp8Linear:
            del module.w_q, module.w_scale_t
            module.__class__ = Fp8Linear


# name: (dtype, None for the engine's (fp16 on CUDA), FP8 linears, compilation); each runs in the order listed.
VARIANTS: dict[str, tuple[torch.dtype | None, str | None, str]] = {
    "eager_fp32": (torch.float32, None, "off"),
    "eager_fp16": (None, None, "off"),  # stock diffusers' UNet
    "eager_fp8": (None, "dynamic", "off"),
    "regional_fp16": (None, None, "regional"),
    "regional_bf16": (torch.bfloat16, None, "regional"),
    "regional_fp8": (None, "dynamic", "regional"),
    "regional_fp8_prequantised": (None, "prequantised", "regional"),
    "whole_fp16": (None, None, "whole"),
    "whole_fp8": (None, "dynamic", "whole"),
}
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "regional_fp8_prequantised"]  # the first H200 run's


class Variant:
    """The UNet in one configuration: its dtype, FP8 on or off, and how it is compiled; :meth:`undo` reverts."""

    def __init__(self, pipe: Any, name: str, dtype: torch.dtype, fp8: str | None, compile: str) -> None:
        self.pipe, self.name, self.dtype, self.fp8, self.compile = pipe, name, dtype, fp8, compile
        self.compile_s: float | None = None
        unet = pipe.unet
        unet.to(dtype)
        if fp8:
            self.layers = len(enable_fp8(unet))
            if fp8 == "prequantised":
                prequantise(unet)
        self.inner = unet.forward
        if compile == "regional":
            unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
        elif compile == "whole":
            self.inner = torch.compile(unet.forward, fullgraph=True, dynamic=False)
        pipe_dtype = pipe.text_encoder_2.dtype
        inner = self.inner

        def forward(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
            # The pipeline hands the UNet its text encoders' dtype; a bf16 UNet gets its inputs cast, as a bf16
            # engine would, and the result cast back for the scheduler. The timestep as float32 (the engine's).
            if torch.is_tensor(timestep):
                timestep = timestep.to(torch.float32)
            if dtype != sample.dtype:
                sample, args, kwargs = cast(sample, dtype), cast(args, dtype), cast(kwargs, dtype)
                output = inner(sample, timestep, *args, **kwargs)
                return (output[0].to(pipe_dtype), *output[1:]) if isinstance(output, tuple) else output
            return inner(sample, timestep, *args, **kwargs)

        unet.forward = forward

    def undo(self) -> None:
        unet = self.pipe.unet
        del unet.forward  # the instance attribute: the class's forward again
        if self.compile == "regional":
            for module in unet.modules():
                module._compiled_call_impl = None
        if self.fp8:
            unprequantise(unet)
            disable_fp8(unet)
        torch._dynamo.reset()


def latents_and_image(pipe: Any, seed: int, steps: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        latents = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=generator,
            output_type="latent",
        ).images
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return latents.float().cpu(), pixels


def run_variant(
    pipe: Any, args: argparse.Namespace, name: str, dtype: torch.dtype, fp8: str | None, compile: str, state: dict
) -> None:
    """Time one variant's UNet step and run its full denoising for every seed, compared with the references."""
    unet = pipe.unet
    variant = Variant(pipe, name, dtype, fp8, compile)
    try:
        inputs = {**cast(state["inputs"], dtype), "return_dict": False}
        reset_peak()
        began = time.perf_counter()
        with torch.no_grad():
            output = unet(**inputs)[0].clone()
        sync()
        first_call_s = round(time.perf_counter() - began, 2)
        timing = ms_per_call(lambda: unet(**inputs), args.repeats)
        emit(
            bench="unet",
            variant=name,
            batch=1,
            first_call_s=first_call_s,  # the compile, for the compiled variants
            **timing,
            peak_gib=peak_gib(),
            fp8_layers=fp8_layers(unet),
            rel_l2_vs_eager_fp32=rel_l2(output, state["unet_reference"]),
            nan=bool(torch.isnan(output).any()),
        )
        if name in args.profile:
            profile(unet, inputs, name)
        if args.no_quality:
            return
        results = []
        for seed in args.seeds:
            reset_peak()
            latents, pixels = latents_and_image(pipe, seed, args.steps, args.size)
            results.append((latents, pixels, peak_gib()))
        state["runs"][name] = results
        for against, reference in state["runs"].items():
            if against == name or against not in state["compare_against"]:
                continue
            for seed, (latents, pixels, peak), (ref_latents, ref_pixels, _) in zip(
                args.seeds, results, reference, strict=True
            ):
                emit(
                    bench="quality",
                    variant=name,
                    against=against,
                    seed=seed,
                    latents_cosine=cosine(latents, ref_latents),
                    latents_rel_l2=rel_l2(latents, ref_latents.double()),
                    **psnr(pixels, ref_pixels),
                    nan=bool(torch.isnan(latents).any()),
                    peak_gib=peak,
                )
        if fp8:  # the same request twice: the same latents, bit for bit
            again, _ = latents_and_image(pipe, args.seeds[0], args.steps, args.size)
            emit(bench="repeat", variant=name, identical=bool(torch.equal(again, results[0][0])))
    finally:
        variant.undo()


def batch_steps(pipe: Any, args: argparse.Namespace, state: dict) -> None:
    """ms per step at larger batches, regional fp16 and fp8 (the compiled blocks recompile once per shape)."""
    for batch in args.batch_sizes:
        for name in args.batch_variants:
            if time_left() < 60:
                emit(bench="skipped", what=f"{name} batch {batch}", reason="deadline")
                continue
            dtype, fp8, compile = VARIANTS[name]
            variant = Variant(pipe, name, dtype or state["dtype"], fp8, compile)
            try:
                inputs = {
                    **unet_inputs(pipe.unet, args.size, batch, state["device"], state["dtype"]),
                    "return_dict": False,
                }
                reset_peak()
                began = time.perf_counter()
                with torch.no_grad():
                    pipe.unet(**inputs)
                sync()
                first_call_s = round(time.perf_counter() - began, 2)
                timing = ms_per_call(lambda inputs=inputs: pipe.unet(**inputs), max(5, args.repeats // 2))
                emit(
                    bench="unet_batch",
                    variant=name,
                    batch=batch,
                    first_call_s=first_call_s,
                    **timing,
                    ms_per_image=round(timing["median_ms"] / batch, 2),
                    peak_gib=peak_gib(),
                )
            finally:
                variant.undo()


def profile(unet: Any, inputs: dict[str, Any], name: str) -> None:
    if torch.cuda.is_available():
        emit(bench="kernels", variant=name, **kernel_profile(lambda: unet(**inputs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", action="store_true", help="the dev-size architecture on the CPU (script check)")
    parser.add_argument("--out-dir")
    parser.add_argument("--deadline", type=float, default=540)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, help="denoising steps of the quality runs (default 30; dev 4)")
    parser.add_argument("--size", type=int, help="(default 1024; dev 128)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[4])
    parser.add_argument("--skip-whole", action="store_true", help="no whole-UNet compiles (minutes each)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-variants", default="regional_fp16,regional_fp8")
    parser.add_argument("--profile", default="regional_fp8", help="comma list of variants whose kernels to list")
    parser.add_argument("--no-quality", action="store_true", help="UNet steps only: no full denoising runs")
    args = parser.parse_args()
    args.variants, args.batch_variants = args.variants.split(","), args.batch_variants.split(",")
    args.profile = args.profile.split(",")
    unknown = {*args.variants, *args.batch_variants} - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}: use {', '.join(VARIANTS)}")
    device = "cpu" if args.dev else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/fp8_unet.py needs a CUDA GPU (--dev runs the dev-size model on the CPU)")
    args.steps = args.steps or (4 if args.dev else 30)
    args.size = args.size or (128 if args.dev else 1024)
    dtype = torch.float16 if device == "cuda" else torch.float32
    jsonlines.start(Path(args.out_dir) / "fp8_unet.jsonl" if args.out_dir else None, STARTED + args.deadline)
    import diffusers

    from bench.fullsize import build_random_pipeline

    emit(
        bench="config",
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        capability=".".join(map(str, torch.cuda.get_device_capability())) if device == "cuda" else None,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        size=args.size,
        steps=args.steps,
        seeds=args.seeds,
    )
    began = time.perf_counter()
    pipe = build_random_pipeline("dev_tiny" if args.dev else "sdxl_base", device, dtype)
    if device == "cuda":
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = True  # as worker.generation.acceleration sets it
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(torch.float32)  # every variant's latents decoded the same way: PSNR measures the UNet alone
    state: dict[str, Any] = {"device": device, "dtype": dtype, "runs": {}}
    state["inputs"] = unet_inputs(pipe.unet, args.size, 1, device, dtype)
    with torch.no_grad():  # references: the eager fp32 UNet's step, and its full denoising
        pipe.unet.to(torch.float32)
        state["unet_reference"] = pipe.unet(**cast(state["inputs"], torch.float32), return_dict=False)[0].double()
    emit(bench="setup", seconds=round(time.perf_counter() - began, 1), fp8_candidates=len(enable_fp8(pipe.unet)))
    disable_fp8(pipe.unet)
    state["compare_against"] = ("eager_fp32", "eager_fp16", "regional_fp16", "regional_bf16")
    variants = [name for name in args.variants if VARIANTS[name][2] != "whole"]
    whole = [] if args.skip_whole else [name for name in args.variants if VARIANTS[name][2] == "whole"]
    for index, name in enumerate([*variants, *whole]):
        variant_dtype, fp8, compile = VARIANTS[name]
        variant_dtype = variant_dtype or dtype
        if index == len(variants):  # the larger batches before the whole-UNet compiles (minutes each)
            pipe.unet.to(dtype)
            batch_steps(pipe, args, state)
        needed = 200 if compile == "whole" and device == "cuda" else 30
        if time_left() < needed:
            emit(bench="skipped", what=name, reason="deadline")
            continue
        try:
            run_variant(pipe, args, name, variant_dtype, fp8, compile, state)
        except Exception as error:  # one variant's failure must not cost the others' lines
            emit(bench="failed", variant=name, error=f"{type(error).__name__}: {str(error)[:400]}")
            if device == "cuda":
                torch.cuda.empty_cache()
    if not whole:
        pipe.unet.to(dtype)
        batch_steps(pipe, args, state)
    emit(bench="done", seconds=round(time.perf_counter() - STARTED, 1))


if __name__ == "__main__":
    main()
