"""Engine speed against stock diffusers, in one process on one device (issue 12's figures), as JSON lines.

    python bench/engine_speed.py                        # CPU: dev-size model, overhead figures (nox -s bench)
    python bench/engine_speed.py --full-size --compile unet --cache-dir /tmp/compile-cache --out-dir OUT
                                                        # GPU: full-size SDXL with random weights

Stock is ``StableDiffusionXLPipeline`` as a plain user runs it (eager, SDPA, fp16 on CUDA, the VAE upcast
per call, PIL's default PNG), this engine is :class:`worker.handler.Worker` with the speed-ups of
:mod:`worker.generation.acceleration`. Lines (``bench`` key):

- ``end_to_end``: seconds per image, 1024² (``--size``), ``--steps`` (30), batch 1, to a base64 PNG.
- ``throughput``: images/s at ``--throughput-steps`` (20) for each ``--batch-sizes`` (1,4,8), to PIL images.
- ``unet_step``: ms per UNet call with CFG (batch 2) at the job's latent size; ``unet_variants``: the
  same for each eager step on its own (channels_last, fused QKV, bf16), so each step's effect is a same-run ratio.
- ``unet_kernels``: that call's GPU kernels under the profiler (``bench/kernels.py``): busy time against wall
  time, the share of matrix products, convolutions, attention and fused kernels, the top kernels.
- ``aot_cuda_graph`` (``--compile aot``): the package's call captured in a CUDA graph against the plain call.
- ``vae_decode``: seconds per 1024² decode in fp32 / fp16 / bf16 and the quality of each against fp32.
- ``text_encode``, ``image_encode``, ``peak_gpu_memory``.
- ``quality``: engine against stock for the same seed: cosine of latents, max abs diff and PSNR of the
  final 8-bit image, NaN check; ``determinism``: identical requests give identical bytes.
- ``other_shape``: a shape that was not warmed up runs (eagerly) without compiling anything.
- ``--peer``: ``bench/tuned_peer.py``'s lines (stock diffusers tuned by its own speed guide and compiled, with its
  time to the first image, against stock in that process); last in the run.
- ``cold_start`` (``--cold-start off,cache,regional,regional-cache``): a fresh process from start to its first
  image, with the engine's compilation off, with the compile cache this run saved (in an empty local Inductor
  cache; with ``--compile aot``, the AOTInductor packages it built), with regional compilation from nothing, and
  with regional compilation and the cache that the regional start saved; each with the engine's start-up
  phases (imports, load, to GPU, compile, warm-up) and Dynamo's
  largest compile-time counters (where a warm start's compile seconds go).

Speed does not depend on weight values, so the model is built with random weights (no download) and
saved as a converted folder the worker loads. Everything prints as it is measured (``--out-dir`` keeps
a copy); ``--deadline`` skips what would not finish in time, so a device call always returns lines.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROCESS_STARTED = time.perf_counter()  # before torch: the cold-start child reports its imports from here

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import jsonlines  # noqa: E402
from bench.jsonlines import emit, time_left  # noqa: E402
from bench.kernels import kernel_profile  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting, dramatic sky"
NEGATIVE = "blurry, low quality"
SEED = 1
GUIDANCE = 7.5


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function: Any, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float], digits: int = 4) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), digits), "min_s": round(min(times), digits), "n": len(times)}


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def png_base64(image: Any) -> str:
    """What a plain user returns: PIL's default PNG, base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_array(image: Any) -> Any:
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)


def compare_images(a: Any, b: Any) -> dict[str, Any]:
    import numpy as np

    x, y = image_array(a), image_array(b)
    difference = np.abs(x - y)
    mse = float((difference.astype(np.float64) ** 2).mean())
    return {
        "max_abs_diff": int(difference.max()),
        "mean_abs_diff": round(float(difference.mean()), 4),
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
        "identical": bool(mse == 0),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)


def decode_uri(uri: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


# -- stock diffusers ---------------------------------------------------------------------------------------------


def unet_inputs(unet: Any, size: int, batch: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """UNet inputs of one CFG step for ``batch`` images (the UNet sees 2 x batch)."""
    generator = torch.Generator("cpu").manual_seed(0)
    latent = size // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    rows = 2 * batch
    config = unet.config
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * rows, dtype=dtype, device=device)
    return {
        "sample": randn(rows, unet.config.in_channels, latent, latent),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": randn(rows, 77, unet.config.cross_attention_dim),
        "added_cond_kwargs": {"text_embeds": randn(rows, text_embeds), "time_ids": time_ids},
    }


def unet_step_ms(unet: Any, inputs: dict[str, Any], repeats: int) -> dict[str, float]:
    inputs = {key: value for key, value in inputs.items() if key != "return_dict"}
    with torch.no_grad():
        times = timed(lambda: unet(**inputs, return_dict=False), repeats, warmup=2)
    return {"median_ms": round(1000 * statistics.median(times), 2), "min_ms": round(1000 * min(times), 2)}


def record_unet_call(worker: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of the first UNet call of a real job (so a replay meets the same compiled-code guards)."""
    unet = worker.engine.pipe.unet
    recorded: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not recorded:
            names = ("sample", "timestep", "encoder_hidden_states")
            recorded.update({name: value for name, value in zip(names, args, strict=False)}, **kwargs)

    handle_ = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        handle(worker, payload)
    finally:
        handle_.remove()
    return recorded


def pipeline_call(pipe: Any, args: argparse.Namespace) -> Any:
    """``call(num_images, num_steps, output_type)``: ``pipe`` as a plain user calls it, with this bench's prompt,
    size, guidance, seed and a fresh ``--scheduler`` each time (stock and the tuned peer)."""
    from worker.generation.schedulers import build_scheduler

    scheduler_config = dict(pipe.scheduler.config)

    def call(num_images: int = 1, num_steps: int = args.steps, output_type: str = "pil") -> Any:
        pipe.scheduler = build_scheduler(args.scheduler, scheduler_config)
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=args.size,
            height=args.size,
            num_inference_steps=num_steps,
            num_images_per_prompt=num_images,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type=output_type,
        ).images

    return call


def run_stock(args: argparse.Namespace, model_dir: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Every stock figure, then the stock references for the quality comparison."""
    from diffusers import StableDiffusionXLPipeline

    stock = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype).to(device)
    stock.set_progress_bar_config(disable=True)
    call = pipeline_call(stock, args)
    size, steps = args.size, args.steps

    reset_peak()
    times = timed(lambda: png_base64(call()[0]), args.repeats)
    emit(bench="end_to_end", engine="stock", size=size, steps=steps, batch=1, **summary(times), peak_gpu_gib=peak_gib())
    reference = {"image": call()[0], "latents": call(output_type="latent").float().cpu()}

    throughput(args, "stock", lambda n: call(n, args.throughput_steps))

    from worker.output.images import encode_image

    image, sizes = reference["image"], {}
    times = timed(lambda: sizes.__setitem__("stock", len(png_base64(image))), 5)
    emit(bench="image_encode", engine="stock", format="png (PIL default, level 6) + base64", **summary(times))
    this_png = lambda: base64.b64encode(encode_image(image, "png", 95, SEED, PROMPT).data)  # noqa: E731
    times = timed(lambda: sizes.__setitem__("this", len(this_png())), 5)
    emit(
        bench="image_encode",
        engine="this",
        format=f"png level 1 in strips on {os.cpu_count()} cores (worker.output.png) + base64",
        **summary(times),
        base64_bytes=sizes,
    )
    with torch.no_grad():
        times = timed(lambda: stock.encode_prompt(PROMPT, negative_prompt=NEGATIVE, device=device), 10)
    emit(bench="text_encode", engine="stock", **summary(times))
    if not args.skip_variants:
        variants_unet(args, stock, device, dtype)
        variants_vae(args, stock, reference["latents"], device)
    return reference  # stock's modules go with this frame; main() empties the CUDA cache


def throughput(args: argparse.Namespace, engine: str, run: Any) -> None:
    for batch in args.batch_sizes:
        if time_left() < 60:
            emit(bench="skipped", what=f"throughput {engine} batch {batch}", reason="deadline")
            return
        reset_peak()
        times = timed(lambda b=batch: run(b), args.throughput_repeats)
        seconds = statistics.median(times)
        emit(
            bench="throughput",
            engine=engine,
            steps=args.throughput_steps,
            batch=batch,
            images_per_s=round(batch / seconds, 3),
            seconds_per_call=round(seconds, 3),
            peak_gpu_gib=peak_gib(),
        )


def variants_unet(args: argparse.Namespace, stock: Any, device: str, dtype: torch.dtype) -> None:
    """Each eager step on its own, cumulatively, on stock's UNet (which is thrown away afterwards)."""
    unet = stock.unet
    inputs = unet_inputs(unet, args.size, 1, device, dtype)
    results = {"eager": unet_step_ms(unet, inputs, args.unet_repeats)}
    unet.to(memory_format=torch.channels_last)
    results["channels_last"] = unet_step_ms(unet, inputs, args.unet_repeats)
    unet.fuse_qkv_projections()
    results["channels_last+fused_qkv"] = unet_step_ms(unet, inputs, args.unet_repeats)
    if device == "cuda":
        unet.to(torch.bfloat16)
        bf16_inputs = unet_inputs(unet, args.size, 1, device, torch.bfloat16)
        results["channels_last+fused_qkv+bf16"] = unet_step_ms(unet, bf16_inputs, args.unet_repeats)
    emit(bench="unet_variants", engine="stock (eager steps)", size=args.size, cfg_batch=2, ms=results)


def variants_vae(args: argparse.Namespace, stock: Any, latents: torch.Tensor, device: str) -> None:
    vae = stock.vae
    scaled = latents.to(device) / vae.config.scaling_factor
    reference = None
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if device != "cuda" and name != "fp32":
            continue
        for layout in ("nchw", "channels_last"):
            vae.to(
                dtype=dtype, memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
            )
            with torch.no_grad():
                times = timed(lambda dt=dtype: vae.decode(scaled.to(dt), return_dict=False), 5)
                decoded = vae.decode(scaled.to(dtype), return_dict=False)[0].float()
            if reference is None:
                reference = decoded
            pixels = ((decoded - reference).abs() * 127.5).max().item()
            emit(
                bench="vae_decode",
                dtype=name,
                layout=layout,
                **summary(times),
                nan=bool(torch.isnan(decoded).any()),
                max_abs_diff_vs_fp32_in_8bit_levels=round(pixels, 2),
            )


# -- this engine -------------------------------------------------------------------------------------------------


def engine_settings(args: argparse.Namespace) -> Any:
    """The worker's settings for this run: the whole pipeline on the device, the speed-ups asked for."""
    from core.settings import load_settings

    return load_settings(
        {},
        offload="none",
        channels_last=not args.no_channels_last,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_vae=args.compile_vae,
        compile_cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        warmup_sizes=((args.size, args.size),),
        warmup_batch_sizes=tuple(args.warmup_batch_sizes),
        vae_dtype=args.vae_dtype or "",
    )


def start_worker(args: argparse.Namespace, model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The worker on ``model_dir``, with the speed-ups applied and warmed up (by the engine, or here)."""
    from worker.generation.acceleration import accelerate
    from worker.handler import Worker

    settings = engine_settings(args)
    phases: dict[str, float] = {}
    started = time.perf_counter()
    worker = Worker(settings)
    worker.start(model_dir)
    if worker.engine is None:
        raise SystemExit(f"worker did not start: {worker.startup_error}")
    phases["engine_start_s"] = time.perf_counter() - started
    engine = worker.engine
    accelerator = getattr(engine, "accelerator", None)
    if accelerator is None:  # an engine that does not apply them itself: apply them here, as it would
        started = time.perf_counter()
        accelerator = accelerate(engine.pipe, settings)
        phases["engine_start_s"] += time.perf_counter() - started
    report = accelerator.report
    phases["of_which_warm_up_s"] = report.seconds if report else 0.0
    dtypes = {name: str(getattr(engine.pipe, name).dtype) for name in ("unet", "text_encoder_2", "vae")}
    return worker, {
        "phases": phases,
        "applied": accelerator.applied,
        "dtypes": dtypes,
        "warm_up": report.to_dict() if report else None,
    }


def job(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    payload = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "scheduler": args.scheduler,
        "guidance_scale": GUIDANCE,
        "seed": SEED,
        "output_format": "png",
    }
    payload.update(overrides)
    return {"id": "bench", "input": payload}


def handle(worker: Any, payload: dict[str, Any]) -> dict[str, Any]:
    output = worker.handle(payload)
    if "error" in output:
        raise SystemExit(f"the worker answered an error: {output['error']}")
    return output


def graphs_now() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_engine(args: argparse.Namespace, model_dir: Path, reference: dict[str, Any], device: str) -> None:
    from worker.generation.schedulers import build_scheduler
    from worker.request.schema import parse_request

    reset_peak()
    worker, start = start_worker(args, model_dir)
    engine = worker.engine
    emit(bench="engine_start", **start, peak_gpu_gib=peak_gib())

    reset_peak()
    outputs: list[dict[str, Any]] = []
    times = timed(lambda: outputs.append(handle(worker, job(args))), args.repeats)
    last = outputs[-1]
    emit(
        bench="end_to_end",
        engine="this",
        size=args.size,
        steps=args.steps,
        batch=1,
        **summary(times),
        timings=last["metadata"]["timings"],
        denoise_ms_per_step=round(1000 * last["metadata"]["timings"]["denoising_s"] / args.steps, 1),
        peak_gpu_gib=peak_gib(),
    )
    uris = {output["images"][0] for output in outputs}
    emit(bench="determinism", identical_requests=len(outputs), distinct_images=len(uris), bit_identical=len(uris) == 1)

    image = decode_uri(last["images"][0])
    pipe = engine.pipe
    pipe.scheduler = build_scheduler(args.scheduler, engine.scheduler_config)
    with torch.no_grad():
        latents = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
        ).images.float()
    emit(
        bench="quality",
        against="stock diffusers, same seed",
        latents_cosine=cosine(latents.cpu(), reference["latents"]),
        latents_nan=bool(torch.isnan(latents).any()),
        image=compare_images(image, reference["image"]),
    )

    def generate(batch: int) -> None:
        request = parse_request(job(args, num_inference_steps=args.throughput_steps, num_images=batch)["input"])
        engine.generate(request)

    throughput(args, "this", generate)

    recorded = record_unet_call(worker, job(args, num_inference_steps=2))
    emit(
        bench="unet_step",
        engine="this",
        note="the UNet call of a real job, replayed (compiled where the job's is)",
        size=args.size,
        cfg_batch=2,
        ms=unet_step_ms(pipe.unet, recorded, args.unet_repeats),
    )
    if args.kernels:
        replay = {key: value for key, value in recorded.items() if key != "return_dict"}
        emit(
            bench="unet_kernels",
            engine="this",
            compile=args.compile,
            size=args.size,
            cfg_batch=2,
            **kernel_profile(lambda: pipe.unet(**replay, return_dict=False)),
        )
    if args.compile == "aot" and device == "cuda":
        aot_cuda_graph(pipe.unet, recorded, args.unet_repeats)
    request = parse_request(job(args)["input"])
    with torch.no_grad():
        times = timed(lambda: (engine.prompt_encoder.clear_cache(), engine.encode(request)), 10)
    emit(bench="text_encode", engine="this", **summary(times))
    vae = pipe.vae
    scaled = reference["latents"].to(device=device, dtype=vae.dtype) / vae.config.scaling_factor
    with torch.no_grad():
        times = timed(lambda: vae.decode(scaled, return_dict=False), 5)
    emit(bench="vae_decode", engine="this", dtype=str(vae.dtype), **summary(times))

    before = graphs_now()
    other = job(args, width=args.other_width, height=args.other_height, num_inference_steps=args.throughput_steps)
    seconds = timed(lambda: handle(worker, other), 1, warmup=0)[0]
    out = handle(worker, other)
    emit(
        bench="other_shape",
        size=f"{args.other_width}x{args.other_height}",
        steps=args.throughput_steps,
        seconds=round(seconds, 3),
        graphs_compiled_while_serving=graphs_now() - before,
        images=len(out["images"]),  # NaN or black images would have been an error
    )
    emit(bench="peak_gpu_memory", engine="this", gib=peak_gib())


def milliseconds(times: list[float]) -> dict[str, float]:
    return {"median": round(1000 * statistics.median(times), 2), "min": round(1000 * min(times), 2)}


def aot_cuda_graph(unet: Any, recorded: dict[str, Any], repeats: int) -> None:
    """The AOT package's call replayed from its CUDA graph against the plain call, same inputs, same process.

    The graph is the one the engine captured at its warm-up (``COMPILE_MODE=reduce-overhead``), or one captured here
    by the worker's own function; with the default mode's runner that capture fails, and the line says why. A replay
    includes the copies of the inputs in and of the output out, as a job's call does."""
    from worker.generation.aot_unet import AotUNet, _capture_graph, _first, _key

    aot = unet.forward
    if not isinstance(aot, AotUNet) or not aot.packages:
        emit(bench="aot_cuda_graph", skipped="no AOT package serves this UNet")
        return
    kwargs = {key: value for key, value in recorded.items() if key not in ("sample", "timestep")}
    inputs = aot._packaged_inputs(recorded["sample"], recorded["timestep"], (), kwargs)
    loaded = None if inputs is None else aot.package_for(inputs)
    if loaded is None:
        emit(bench="aot_cuda_graph", skipped="the recorded call has no package")
        return
    try:
        engine_graph = loaded.graphs.get(_key(inputs))
        graphed = engine_graph or _capture_graph(loaded.model, inputs)

        def plain() -> torch.Tensor:
            return _first(loaded.model(*inputs))

        def replay() -> torch.Tensor:
            return graphed(*inputs)

        with torch.no_grad():
            reference, captured = plain().clone(), replay()
            sync()
            agreement = cosine(captured.float().cpu(), reference.float().cpu())
            identical = bool(torch.equal(captured, reference))
            plain_times = timed(plain, repeats, warmup=2)
            graph_times = timed(replay, repeats, warmup=2)
        emit(
            bench="aot_cuda_graph",
            captured_by="engine" if engine_graph is not None else "bench",
            batch_rows=loaded.batch_rows,
            plain_ms=milliseconds(plain_times),
            graph_ms=milliseconds(graph_times),
            cosine=agreement,
            bit_identical=identical,
            kernels_graph=kernel_profile(replay, top=3),
        )
    except Exception as error:  # an experiment: its failure is a finding, not the end of the run
        emit(bench="aot_cuda_graph", error=f"{type(error).__name__}: {error}"[:600])


# -- the tuned-diffusers peer -------------------------------------------------------------------------------------


def tuned_peer(args: argparse.Namespace, model_dir: Path) -> None:
    """bench/tuned_peer.py in a process of its own (this one's Dynamo stance and Inductor flags are the engine's),
    its lines relayed: stock and the tuned peer in that one process."""
    if time_left() < 90:
        emit(bench="skipped", what="tuned peer", reason="deadline")
        return
    command = [sys.executable, str(Path(__file__).with_name("tuned_peer.py")), "--model-dir", str(model_dir)]
    command += ["--size", str(args.size), "--steps", str(args.steps), "--throughput-steps", str(args.throughput_steps)]
    command += ["--repeats", str(args.repeats), "--mode", args.peer_mode, "--deadline", str(int(time_left() - 15))]
    command += ["--scheduler", args.scheduler]
    result = subprocess.run(command, capture_output=True, text=True, timeout=max(60, time_left()))
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            emit(**json.loads(line), process="tuned_peer.py")
    if result.returncode != 0:
        emit(bench="peer", exit_code=result.returncode, stderr_tail=result.stderr[-1500:])


# -- cold start --------------------------------------------------------------------------------------------------


def cold_start_child(args: argparse.Namespace) -> None:
    """In a fresh process: imports, worker start (load + warm-up), first job; phases from process start."""
    import_started = time.perf_counter()
    import diffusers  # noqa: F401

    import worker.handler  # noqa: F401

    imports_s = time.perf_counter() - import_started
    worker_, start = start_worker(args, Path(args.model_dir))
    started = time.perf_counter()
    handle(worker_, job(args))
    first_job_s = time.perf_counter() - started
    started = time.perf_counter()
    handle(worker_, job(args))
    emit(
        bench="cold_start_child",
        compile=args.compile,
        torch_import_s=round(import_started - PROCESS_STARTED, 2),
        other_imports_s=round(imports_s, 2),
        **{k: round(v, 2) for k, v in start["phases"].items()},
        engine_phases=getattr(worker_.engine, "startup_phases", None),
        cache=start["warm_up"],
        compile_times=dynamo_compile_times(),
        first_job_s=round(first_job_s, 2),
        second_job_s=round(time.perf_counter() - started, 2),
        since_process_start_s=round(time.perf_counter() - PROCESS_STARTED, 2),
    )


def dynamo_compile_times(top: int = 10) -> dict[str, float] | str:
    """Dynamo's seconds per compile phase in this process (nested counters, so they overlap), largest first."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
    except Exception as error:  # a private API: its absence must not cost the cold-start line
        return f"unavailable: {error!r}"
    largest = sorted(zip(map(float, values), names, strict=True), reverse=True)[:top]
    return {name: round(seconds, 2) for seconds, name in largest}


def cold_starts(args: argparse.Namespace, model_dir: Path) -> None:
    regional_cache = tempfile.mkdtemp(prefix="regional-compile-cache-")
    for case in args.cold_start:
        if time_left() < 90:
            emit(bench="skipped", what=f"cold start {case}", reason="deadline")
            return
        command = [sys.executable, str(Path(__file__).resolve()), "--child-cold-start", "--model-dir", str(model_dir)]
        command += ["--size", str(args.size), "--steps", str(args.steps), "--scheduler", args.scheduler]
        environment = dict(os.environ)
        if case == "off":
            command += ["--compile", "off"]
        elif case in ("regional", "regional-cache"):
            # "regional": regional compilation from nothing (an empty local cache), saving its compile cache;
            # "regional-cache": the same start on a fresh machine with that cache file (the image or volume's)
            command += ["--compile", "regional", "--cache-dir", regional_cache]
        else:  # "cache": the file this run saved, in an empty local cache (as on a fresh machine)
            command += ["--compile", args.compile, "--compile-mode", args.compile_mode, "--cache-dir", args.cache_dir]
            command += ["--warmup-batch-sizes", *map(str, args.warmup_batch_sizes)]
            if args.compile_vae:
                command.append("--compile-vae")
        if case != "off":  # every compiling start begins with an empty local Inductor cache, as on a fresh machine
            fresh = Path(tempfile.mkdtemp(prefix="inductor-empty-"))
            environment.update(TORCHINDUCTOR_CACHE_DIR=str(fresh), TRITON_CACHE_DIR=str(fresh / "triton"))
        for flag, value in (("--vae-dtype", args.vae_dtype),):
            if value:
                command += [flag, value]
        if args.no_channels_last:
            command.append("--no-channels-last")
        started = time.perf_counter()
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=max(60, time_left()))
        wall = time.perf_counter() - started
        child = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        emit(
            bench="cold_start",
            case=case,
            process_start_to_first_image_s=round(wall - (child[-1]["second_job_s"] if child else 0), 2),
            exit_code=result.returncode,
            child=child[-1] if child else None,
            stderr_tail=None if result.returncode == 0 else result.stderr[-1500:],
        )


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full-size", action="store_true", help="full-size SDXL on CUDA (default: dev-size on CPU)")
    parser.add_argument("--size", type=int, help="width = height (default 1024 full-size, 256 dev)")
    parser.add_argument("--steps", type=int, help="steps of the end-to-end figure (default 30 full-size, 8 dev)")
    parser.add_argument("--throughput-steps", type=int, help="(default 20 full-size, 4 dev)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="(default 1 4 8 full-size, 1 2 dev)")
    parser.add_argument("--scheduler", default="Euler")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-repeats", type=int, default=2)
    parser.add_argument("--unet-repeats", type=int, default=10)
    parser.add_argument("--other-width", type=int, help="a shape that is not warmed up (default 832 / 320)")
    parser.add_argument("--other-height", type=int, help="(default 1216 / 256)")
    parser.add_argument("--compile", default="off", choices=("off", "unet", "regional", "aot"))
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-vae", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--vae-dtype", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--warmup-batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--cache-dir", help="the persistent compile cache (saved by this run, used by cold starts)")
    parser.add_argument(
        "--cold-start",
        default="",
        help="comma list of off,cache,regional,regional-cache: fresh-process start-up runs",
    )
    parser.add_argument("--work-dir", help="where the random model folder is written (default: a temporary folder)")
    parser.add_argument("--model-dir", help="use this converted folder instead of building one")
    parser.add_argument("--out-dir", help="also write the JSON lines here")
    parser.add_argument(
        "--copy-cache", action="store_true", help="also copy the compile cache (gzipped, ~50 MB) into --out-dir"
    )
    parser.add_argument("--deadline", type=float, default=570, help="seconds; later sections are skipped")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--skip-variants", action="store_true", help="no per-step UNet and VAE variant lines")
    parser.add_argument(
        "--peer", action="store_true", help="also time diffusers tuned by its own speed guide (it compiles: minutes)"
    )
    parser.add_argument("--peer-mode", default="default", help="the peer's torch.compile mode (guide: max-autotune)")
    parser.add_argument(
        "--no-kernels", dest="kernels", action="store_false", help="no kernel profile of this engine's UNet call"
    )
    parser.add_argument("--child-cold-start", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    full = args.full_size
    args.size = args.size or (1024 if full else 256)
    args.steps = args.steps or (30 if full else 8)
    args.throughput_steps = args.throughput_steps or (20 if full else 4)
    args.batch_sizes = args.batch_sizes or ([1, 4, 8] if full else [1, 2])
    args.other_width = args.other_width or (832 if full else 320)
    args.other_height = args.other_height or (1216 if full else 256)
    args.cold_start = [case for case in args.cold_start.split(",") if case]
    unknown = set(args.cold_start) - {"off", "cache", "regional", "regional-cache"}
    if unknown:
        parser.error(f"--cold-start {','.join(sorted(unknown))}: use off, cache, regional or regional-cache")
    if (
        "regional-cache" in args.cold_start
        and "regional" not in args.cold_start[: args.cold_start.index("regional-cache")]
    ):
        parser.error("--cold-start regional-cache uses the cache that regional saves: list regional before it")
    if "cache" in args.cold_start and not (args.cache_dir and args.compile != "off"):
        parser.error("--cold-start cache needs --compile unet|regional|aot and --cache-dir")
    return args


def build_model(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Path:
    from bench.fullsize import build_random_pipeline, save_as_model_dir

    started = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="engine-speed-"))
    target = work / ("sdxl-random" if args.full_size else "sdxl-dev-random")
    if target.exists():
        shutil.rmtree(target)
    pipe = build_random_pipeline("sdxl_base" if args.full_size else "dev_tiny", device, dtype)
    model_dir = save_as_model_dir(pipe, target, "fp16" if dtype == torch.float16 else "fp32")
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    emit(bench="setup", built_and_saved_s=round(time.perf_counter() - started, 1), model_dir=str(model_dir))
    return model_dir


def save_cache_copy(args: argparse.Namespace) -> None:
    """Copy the compile cache into --out-dir gzipped, in parts under the device tool's 16 MiB file limit."""
    import gzip

    if not (args.out_dir and args.cache_dir and args.copy_cache):
        return
    for path in sorted(Path(args.cache_dir).glob("*.bin")):
        data = gzip.compress(path.read_bytes(), compresslevel=6)
        part_size = 15 * 2**20
        for index in range(0, max(1, math.ceil(len(data) / part_size))):
            (Path(args.out_dir) / f"{path.name}.gz.{index}").write_bytes(
                data[index * part_size : (index + 1) * part_size]
            )
        emit(bench="compile_cache_file", name=path.name, bytes=path.stat().st_size, gzip_bytes=len(data))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = "cuda" if args.full_size else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if args.child_cold_start:
        cold_start_child(args)
        return
    copy_to = Path(args.out_dir) / "engine_speed.jsonl" if args.out_dir else None
    jsonlines.start(copy_to, PROCESS_STARTED + args.deadline)
    import diffusers
    import transformers

    emit(
        bench="config",
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        dtype=str(dtype),
        size=args.size,
        steps=args.steps,
        scheduler=args.scheduler,
        options={k: v for k, v in vars(args).items() if k not in ("child_cold_start",)},
    )
    model_dir = Path(args.model_dir) if args.model_dir else build_model(args, device, dtype)
    if not args.skip_stock:  # --skip-stock: cold starts only
        reference = run_stock(args, model_dir, device, dtype)
        if device == "cuda":
            torch.cuda.empty_cache()
        run_engine(args, model_dir, reference, device)
        save_cache_copy(args)
    cold_starts(args, model_dir)
    if args.peer:
        tuned_peer(args, model_dir)
    emit(bench="done", seconds=round(time.perf_counter() - PROCESS_STARTED, 1))


if __name__ == "__main__":
    main()
