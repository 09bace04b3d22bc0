"""What a UNet step costs at shapes the compiled worker did not warm up (GPU; JSON lines).

With ``COMPILE=unet`` the worker compiles the warm-up shapes and then freezes compilation
(``eager_on_recompile``): any other shape, a job without classifier-free guidance (UNet batch 1 instead of 2) or
ControlNet residuals run eagerly. The smoke run of 2026-12-03 showed those jobs slower than the same jobs in a worker
without compile. This measures one UNet step, in one process and on the same weights, for:

- ``eager``: the UNet before anything was compiled;
- ``compiled``: the compiled forward at a warmed shape;
- ``fallback``: the compiled forward at a shape it was not warmed for (Dynamo's eager fallback);
- ``bypass``: the module's own forward at that shape, not going through ``torch.compile`` at all;
- ``force_eager``: the compiled forward under torch's ``force_eager`` stance, as ControlNet and IP-Adapter jobs run.

    python bench/compile_fallback.py --out bench/results/h200-DATE-compile_fallback.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import jsonlines


def unet_inputs(pipe: Any, width: int, height: int, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One denoising call's UNet inputs for a ``width`` x ``height`` picture and UNet batch ``batch``."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    sample = torch.randn(batch, 4, height // 8, width // 8, device=device, dtype=dtype)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim, device=device, dtype=dtype),
        "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype),
    }
    timestep = torch.tensor(500, device=device)
    # The keyword arguments diffusers' SDXL pipelines pass (0.42.1): Dynamo guards on which keys a call has, so a
    # call without timestep_cond/cross_attention_kwargs misses the compiled code (the first run of this bench did).
    kwargs = {
        "encoder_hidden_states": hidden,
        "timestep_cond": None,
        "cross_attention_kwargs": None,
        "added_cond_kwargs": added,
        "return_dict": False,
    }
    return (sample, timestep), kwargs


@torch.no_grad()
def step_ms(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any], repeats: int) -> float:
    """Median milliseconds of one ``forward`` call (two calls first: compile caches and CUDA graphs settle)."""
    for _ in range(2):
        forward(*args, **kwargs)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        forward(*args, **kwargs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU: the fallback cost is a GPU question")
    jsonlines.start(Path(args.out) if args.out else None)

    def emit(**row: Any) -> None:
        jsonlines.emit(bench="compile_fallback", **row)

    from bench.fullsize import build_random_pipeline
    from worker.generation.acceleration import SpeedupOptions, apply_speedups

    pipe = build_random_pipeline(device="cuda", dtype=torch.float16)
    pipe.unet.to(memory_format=torch.channels_last)
    own_forward = pipe.unet.forward  # the module's bound forward, before the accelerator replaces it
    shapes = {
        "warmed_1024_cfg": (1024, 1024, 2),
        "1280x1024_cfg": (1280, 1024, 2),
        "1024_no_cfg": (1024, 1024, 1),
    }
    inputs = {name: unet_inputs(pipe, *shape) for name, shape in shapes.items()}
    for name, (call_args, call_kwargs) in inputs.items():
        emit(shape=name, path="eager", ms=step_ms(own_forward, call_args, call_kwargs, args.repeats))

    options = SpeedupOptions(compile="unet", compile_mode=args.compile_mode, channels_last=True)
    accelerator = apply_speedups(pipe, options)
    started = time.perf_counter()
    report = accelerator.warm_up()
    emit(path="warm_up", seconds=round(time.perf_counter() - started, 1), error=report.error)
    for name, (call_args, call_kwargs) in inputs.items():
        path = "compiled" if name.startswith("warmed") else "fallback"
        emit(shape=name, path=path, ms=step_ms(pipe.unet.forward, call_args, call_kwargs, args.repeats))
        emit(shape=name, path="bypass", ms=step_ms(own_forward, call_args, call_kwargs, args.repeats))
        with torch.compiler.set_stance("force_eager"):  # how ControlNet and IP-Adapter jobs run a compiled UNet
            emit(shape=name, path="force_eager", ms=step_ms(pipe.unet.forward, call_args, call_kwargs, args.repeats))


if __name__ == "__main__":
    main()
