"""Which compiled UNet and VAE to ship: each variant's speed and compile time in one process on one GPU.

    python bench/compile_variants.py --out-dir OUT --deadline 540      # CUDA only

Full-size SDXL with random weights (speed does not depend on weight values). JSON lines (``bench`` key):

- ``load``: the converted folder loaded the stock way (``from_pretrained`` to the CPU, then ``.to("cuda")``)
  against ``device_map="cuda"`` (safetensors straight onto the GPU), alternated, page cache warm for both.
- ``unet``: ms per CFG step (1024², batch 1, so the UNet sees 2 rows) and seconds to compile, for eager
  fp16/bf16, ``torch.compile`` of the whole UNet in fp16 and bf16 (default mode, with cuDNN's autotuner off and
  on), with CUDA graphs (``reduce-overhead``), regional compilation (the repeated transformer blocks only), and
  ``COMPILE=aot``'s AOTInductor package in fp16 (``aot_fp16_default``: its build, then ``aot_load``: a second
  install loading the saved package, with its check against eager).
- ``unet_output``: each variant's output against eager fp32 on the same inputs (relative L2 error), never NaN.
- ``kernels``: the top CUDA kernels of the fastest variant (torch.profiler), to say what limits it.
- ``vae``: the 1024² decode eager in fp32 / fp16 / bf16 and compiled in bf16.

``--deadline`` skips what would not finish (each compile is given ~120 s), so a device call returns lines.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import jsonlines  # noqa: E402
from bench.engine_speed import unet_inputs  # noqa: E402
from bench.jsonlines import emit, time_left  # noqa: E402


def ms_per_call(function: Any, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median and min of ``repeats`` calls timed with CUDA events (after ``warmup`` calls)."""
    with torch.no_grad():
        for _ in range(warmup):
            function()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2)}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    output = output.double()
    return {
        "rel_l2": float(f"{float((output - reference).norm() / reference.norm()):.3g}"),
        "nan": bool(torch.isnan(output).any()),
    }


def measure_loading(model_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    results: dict[str, list[float]] = {"cpu_then_to_cuda": [], "device_map_cuda": []}
    for _ in range(2):
        for name in results:
            torch.cuda.synchronize()
            started = time.perf_counter()
            if name == "cpu_then_to_cuda":
                pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float16).to("cuda")
            else:
                pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float16, device_map="cuda")
            torch.cuda.synchronize()
            results[name].append(round(time.perf_counter() - started, 2))
            on_gpu = all(p.device.type == "cuda" for p in pipe.unet.parameters())
            del pipe
            torch.cuda.empty_cache()
    emit(bench="load", seconds=results, all_on_gpu_after_device_map=on_gpu)


def cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    def cast(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        if torch.is_tensor(value) and value.is_floating_point() and value.ndim > 0:
            return value.to(dtype)
        return value

    return {k: cast(v) for k, v in inputs.items()}


def measure_unet(unet: Any, args: argparse.Namespace) -> None:
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True  # as worker.generation.acceleration sets it
    base = {**unet_inputs(unet, 1024, 1, "cuda", torch.float16), "return_dict": False}
    with torch.no_grad():  # the reference: eager fp32 on the same inputs
        unet.to(torch.float32)
        reference = unet(**cast_inputs(base, torch.float32))[0].double()
    unet.to(memory_format=torch.channels_last)
    fastest: tuple[float, str, Any] = (math.inf, "", None)

    def record(name: str, dtype: torch.dtype, forward: Any, compile_s: float | None, **extra: Any) -> None:
        nonlocal fastest
        inputs = cast_inputs(base, dtype)
        with torch.no_grad():
            output = forward(**inputs)[0].clone()
        timing = ms_per_call(lambda: forward(**inputs), repeats=args.repeats)
        emit(bench="unet", variant=name, compile_s=compile_s, **timing, **extra)
        emit(bench="unet_output", variant=name, against="eager fp32", **relative_error(output, reference))
        if timing["median_ms"] < fastest[0]:
            fastest = (timing["median_ms"], name, (forward, inputs))

    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        unet.to(dtype)
        torch.backends.cudnn.benchmark = False
        record(f"eager_{dtype_name}", dtype, unet.forward, None)
        torch.backends.cudnn.benchmark = True
        record(f"eager_{dtype_name}_cudnn_benchmark", dtype, unet.forward, None)
        torch.backends.cudnn.benchmark = False
        modes = ["default"] if dtype_name == "fp16" else ["default", "reduce-overhead", *args.extra_modes]
        for mode in modes:
            if time_left() < 150:
                emit(bench="skipped", what=f"compile {dtype_name} {mode}", reason="deadline")
                continue
            torch._dynamo.reset()
            compiled = torch.compile(
                unet.forward, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode
            )
            inputs = cast_inputs(base, dtype)
            started = time.perf_counter()
            with torch.no_grad():
                compiled(**inputs)
            torch.cuda.synchronize()
            compile_s = round(time.perf_counter() - started, 1)
            record(f"compiled_{dtype_name}_{mode}", dtype, compiled, compile_s)
            if mode == "default":
                torch.backends.cudnn.benchmark = True
                record(f"compiled_{dtype_name}_{mode}_cudnn_benchmark", dtype, compiled, compile_s)
                torch.backends.cudnn.benchmark = False
    torch._dynamo.reset()
    if time_left() > 300:  # the worker's COMPILE=aot: the whole UNet exported and built ahead of time, fp16
        unet.to(torch.float16)
        measure_aot(unet, base, record)
        unet.to(torch.bfloat16)
    else:
        emit(bench="skipped", what="aot fp16", reason="deadline")

    if time_left() > 120:  # regional: only the transformer blocks, compiled in place on the bf16 UNet
        unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
        inputs = cast_inputs(base, torch.bfloat16)
        started = time.perf_counter()
        with torch.no_grad():
            unet(**inputs)
        torch.cuda.synchronize()
        record("regional_bf16_default", torch.bfloat16, unet.forward, round(time.perf_counter() - started, 1))
    profile(*fastest[1:])


def measure_aot(unet: Any, base: dict[str, Any], record: Any) -> None:
    """The package built on the first call (its compile time), timed; then a second install that only loads it."""
    from worker.generation.aot_unet import AotUNet

    folder = Path(tempfile.mkdtemp(prefix="variants-aot-"))
    configs = {"conv_1x1_as_mm": True, "max_autotune": False}
    aot = AotUNet.install(unet, folder, "compile_variants", configs)
    try:
        inputs = cast_inputs(base, torch.float16)
        started = time.perf_counter()
        with torch.no_grad():
            aot(**inputs)
        torch.cuda.synchronize()
        compile_s = round(time.perf_counter() - started, 1)
        aot.freeze()
        record("aot_fp16_default", torch.float16, aot, compile_s, package=aot.records[0].to_dict())
    finally:
        aot.uninstall()
    again = AotUNet.install(unet, folder, "compile_variants", configs)
    try:
        with torch.no_grad():
            again(**cast_inputs(base, torch.float16))
        emit(bench="aot_load", **again.records[0].to_dict(), packaged_calls=again.packaged_calls)
    finally:
        again.uninstall()


def profile(name: str, call: tuple[Any, dict[str, Any]] | None) -> None:
    if call is None:
        return
    forward, inputs = call
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            forward(**inputs)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    emit(
        bench="kernels",
        variant=name,
        cuda_ms_per_step=round(total / 3 / 1000, 2),
        top=[
            {
                "kernel": e.key[:90],
                "ms_per_step": round(e.self_device_time_total / 3 / 1000, 3),
                "share": round(e.self_device_time_total / total, 3),
                "calls_per_step": e.count // 3,
            }
            for e in top
        ],
    )


def measure_vae(vae: Any) -> None:
    generator = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn(1, 4, 128, 128, generator=generator).cuda()
    reference = None
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        vae.to(dtype)
        with torch.no_grad():
            output = vae.decode(latents.to(dtype), return_dict=False)[0].double()
        reference = output if reference is None else reference
        timing = ms_per_call(lambda d=dtype: vae.decode(latents.to(d), return_dict=False), repeats=5, warmup=1)
        emit(bench="vae", variant=f"eager_{name}", **timing, **relative_error(output, reference))
    if time_left() < 120:
        emit(bench="skipped", what="compiled vae", reason="deadline")
        return
    vae.to(torch.bfloat16)
    vae.decoder.compile(fullgraph=True, dynamic=False)
    started = time.perf_counter()
    with torch.no_grad():
        output = vae.decode(latents.to(torch.bfloat16), return_dict=False)[0].double()
    torch.cuda.synchronize()
    compile_s = round(time.perf_counter() - started, 1)
    timing = ms_per_call(lambda: vae.decode(latents.to(torch.bfloat16), return_dict=False), repeats=5, warmup=1)
    emit(bench="vae", variant="compiled_bf16", compile_s=compile_s, **timing, **relative_error(output, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir")
    parser.add_argument("--deadline", type=float, default=540)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--extra-modes", nargs="*", default=[], help="e.g. max-autotune-no-cudagraphs (slow)")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/compile_variants.py needs a CUDA GPU")
    jsonlines.start(Path(args.out_dir) / "compile_variants.jsonl" if args.out_dir else None, STARTED + args.deadline)
    import diffusers

    from bench.fullsize import build_random_pipeline, save_as_model_dir

    emit(bench="config", device=torch.cuda.get_device_name(), torch=torch.__version__, diffusers=diffusers.__version__)
    started = time.perf_counter()
    pipe = build_random_pipeline("sdxl_base", "cuda", torch.float16)
    if not args.skip_load:
        model_dir = save_as_model_dir(pipe, Path(tempfile.mkdtemp(prefix="variants-")) / "sdxl-random")
        emit(bench="setup", seconds=round(time.perf_counter() - started, 1))
        measure_loading(model_dir)
    measure_vae(pipe.vae)
    measure_unet(pipe.unet, args)
    emit(bench="done", seconds=round(time.perf_counter() - STARTED, 1))


if __name__ == "__main__":
    main()
