"""Issue 23's peer: stock diffusers tuned by diffusers' own speed guide and compiled, against plain stock in the
same process, as JSON lines.

    python bench/tuned_peer.py --model-dir DIR --deadline 300      # a converted full-size folder, on a GPU
    python bench/engine_speed.py --full-size ... --peer            # the same, after this engine's figures

The guide ("Accelerate inference" in diffusers' docs, formerly tutorials/fast_diffusion.md): bf16, fused QKV,
channels_last for the UNet and the VAE, its four Inductor flags, ``torch.compile(fullgraph=True)`` on the UNet and
``vae.decode``. It says ``mode="max-autotune"``; ``--mode`` picks (issue 23 asks for ``default``: the guide's own
mode did not give a first image within 9 minutes on an H200). Lines: ``end_to_end`` for stock and the peer (the
peer's with ``load_s`` and ``first_image_s``, the compile), ``quality`` (latents against stock's, same seed, and one
UNet call of each on the same inputs), ``throughput`` at batch 1 (another batch size would compile again). A
watchdog prints what the peer was doing when ``--deadline`` passes, so a call that cannot wait still learns it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROCESS_STARTED = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import jsonlines  # noqa: E402
from bench.engine_speed import (  # noqa: E402
    compare_images,
    cosine,
    peak_gib,
    pipeline_call,
    png_base64,
    reset_peak,
    summary,
    sync,
    throughput,
    timed,
    unet_inputs,
)
from bench.jsonlines import emit, time_left  # noqa: E402

GUIDE_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


def run_stock(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionXLPipeline

    stock = StableDiffusionXLPipeline.from_pretrained(args.model_dir, dtype=dtype).to(device)
    stock.set_progress_bar_config(disable=True)
    call = pipeline_call(stock, args)
    reset_peak()
    times = timed(lambda: png_base64(call()[0]), args.repeats)
    emit(bench="end_to_end", engine="stock", size=args.size, steps=args.steps, batch=1, **summary(times))
    throughput(args, "stock", lambda n: call(n, args.throughput_steps))
    return stock, {"image": call()[0], "latents": call(output_type="latent").float().cpu()}


def run_peer(args: argparse.Namespace, device: str, stock: Any, reference: dict[str, Any]) -> None:
    import torch._inductor.config as inductor_config
    from diffusers import StableDiffusionXLPipeline

    started = time.perf_counter()
    phase = {"now": "loading"}

    def give_up() -> None:
        waited = time.perf_counter() - started
        emit(
            bench="end_to_end",
            engine="tuned diffusers",
            mode=args.mode,
            outcome=f"no figure within {waited:.0f} s",
            still=phase["now"],
        )
        os._exit(0)

    watchdog = threading.Timer(max(5.0, time_left() - 5), give_up)
    watchdog.daemon = True
    watchdog.start()
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model_dir, dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    for name, value in GUIDE_INDUCTOR_FLAGS.items():
        setattr(inductor_config, name, value)
    eager_unet = pipe.unet
    pipe.unet = torch.compile(pipe.unet, mode=args.mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=args.mode, fullgraph=True)
    call = pipeline_call(pipe, args)
    load_s = time.perf_counter() - started

    phase["now"] = "compiling (the first image)"
    first = time.perf_counter()
    image = call()[0]
    sync()
    first_image_s = time.perf_counter() - first
    phase["now"] = "measuring"
    reset_peak()
    times = timed(lambda: png_base64(call()[0]), args.repeats, warmup=0)
    emit(
        bench="end_to_end",
        engine="tuned diffusers",
        mode=args.mode,
        inductor_flags=GUIDE_INDUCTOR_FLAGS,
        size=args.size,
        steps=args.steps,
        batch=1,
        **summary(times),
        load_s=round(load_s, 2),
        first_image_s=round(first_image_s, 2),
        peak_gpu_gib=peak_gib(),
    )
    latents = call(output_type="latent").float().cpu()
    # One UNet call of each on the same inputs: the first step's disagreement, before 30 steps compound it.
    stock_inputs = unet_inputs(stock.unet, args.size, 1, device, stock.unet.dtype)
    peer_inputs = unet_inputs(stock.unet, args.size, 1, device, torch.bfloat16)
    with torch.no_grad():
        stock_step = stock.unet(**stock_inputs, return_dict=False)[0].float()
        peer_step = pipe.unet(**peer_inputs, return_dict=False)[0].float()
        eager_step = eager_unet(**peer_inputs, return_dict=False)[0].float()
    emit(
        bench="quality",
        engine="tuned diffusers",
        against="stock diffusers, same seed",
        latents_cosine=cosine(latents, reference["latents"]),
        latents_nan=bool(torch.isnan(latents).any()),
        image=compare_images(image, reference["image"]),
        one_unet_call_cosine={
            "compiled_vs_stock": cosine(peer_step, stock_step),
            "eager_vs_stock": cosine(eager_step, stock_step),
        },
    )
    throughput(args, "tuned diffusers", lambda n: call(n, args.throughput_steps))
    watchdog.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="a converted folder (bench/engine_speed.py builds one)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scheduler", default="Euler")
    parser.add_argument("--mode", default="default", help="the peer's torch.compile mode (the guide: max-autotune)")
    parser.add_argument("--deadline", type=float, default=570, help="seconds from the start; the watchdog's")
    parser.add_argument("--out-dir", help="also write the JSON lines here")
    args = parser.parse_args(argv)
    # engine_speed's throughput figure, at batch 1 only: another batch size would make the peer compile again.
    args.batch_sizes, args.throughput_repeats = [1], 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    copy_to = Path(args.out_dir) / "tuned_peer.jsonl" if args.out_dir else None
    jsonlines.start(copy_to, PROCESS_STARTED + args.deadline)
    emit(
        bench="config",
        script="tuned_peer",
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        options=vars(args),
    )
    stock, reference = run_stock(args, device, dtype)
    run_peer(args, device, stock, reference)
    emit(bench="done", seconds=round(time.perf_counter() - PROCESS_STARTED, 1))


if __name__ == "__main__":
    main()
