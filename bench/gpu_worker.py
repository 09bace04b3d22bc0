"""GPU benchmark: the worker's handler against stock diffusers on full-size SDXL (random weights).

    python bench/gpu_worker.py [--steps 25] [--size 1024] [--repeats 3]

Prints JSON lines, all from one process on one card, so the ratios compare like with like:
stock ``StableDiffusionXLPipeline.__call__`` to PIL (the stock fp16 VAE path upcasts per call)
against the worker's handler (validation, prompt encoder, per-image generators, the VAE kept in
fp32, NaN/black checks, PNG encoding reported apart), per-image time at num_images 4, the VAE
decode in fp16 and fp32, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fullsize import build_random_pipeline, save_as_model_dir


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="sdxl_base", help="dev_tiny with --device cpu: a dry run of the script")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32

    from diffusers import StableDiffusionXLPipeline

    from worker.handler import STATE, handler, start_engine
    from worker.schedulers import build_scheduler

    started = time.perf_counter()
    model_dir = save_as_model_dir(
        build_random_pipeline(args.config, args.device, dtype),
        Path(tempfile.mkdtemp(prefix="sdxl-full-")) / "sdxl-random",
        "fp16" if dtype == torch.float16 else "fp32",
    )
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    emit(bench="setup", built_and_saved_s=round(time.perf_counter() - started, 1), card=card)

    started = time.perf_counter()
    start_engine(model_dir)
    if STATE.startup_error:
        raise SystemExit(STATE.startup_error)
    engine = STATE.engine
    emit(bench="engine_load", seconds=round(time.perf_counter() - started, 2), plan=engine.plan.reason)

    stock = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(args.device)
    stock.set_progress_bar_config(disable=True)
    prompt, negative = "a lighthouse on a cliff at dawn, oil painting", "blurry"
    job = {
        "prompt": prompt,
        "negative_prompt": negative,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "scheduler": "Euler",
        "seed": 1,
    }

    def run_stock(num_images: int = 1) -> None:
        stock.scheduler = build_scheduler("Euler", engine.scheduler_config)
        stock(
            prompt=prompt,
            negative_prompt=negative,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            num_images_per_prompt=num_images,
            generator=torch.Generator().manual_seed(1),
        )

    encodings: list[float] = []

    def run_handler(num_images: int = 1, output_format: str = "png") -> None:
        engine.prompt_encoder.clear_cache()  # stock re-encodes every call; so do we, for a fair ratio
        out = handler({"id": "bench", "input": {**job, "num_images": num_images, "output_format": output_format}})
        if "error" in out:
            emit(bench="error", error=out["error"])
            raise SystemExit(1)
        encodings.append(out["metadata"]["timings"]["image_encoding_s"])
        run_handler.last = out["metadata"]["timings"]

    stock_s = timed(run_stock, args.repeats)
    handler_s = timed(run_handler, args.repeats)
    encoding_s = statistics.median(encodings)
    emit(
        bench="handler_vs_stock",
        size=args.size,
        steps=args.steps,
        stock_to_pil_s=round(stock_s, 3),
        handler_total_s=round(handler_s, 3),
        handler_png_encoding_s=round(encoding_s, 3),
        overhead_pct_without_encoding=round(100 * ((handler_s - encoding_s) / stock_s - 1), 2),
        breakdown=run_handler.last,
    )
    stock4 = timed(lambda: run_stock(4), 1)
    encodings.clear()
    # JPEG: four random-weight (noise) PNGs would exceed RunPod's payload limit as base64.
    handler4 = timed(lambda: run_handler(4, "jpeg"), 1)
    emit(
        bench="four_images",
        stock_per_image_s=round(stock4 / 4, 3),
        handler_per_image_s=round(handler4 / 4, 3),
        handler_jpeg_encoding_per_image_s=round(statistics.median(encodings) / 4, 3),
    )

    latents = torch.randn(1, 4, args.size // 8, args.size // 8, device=args.device)
    vae = engine.pipe.vae
    for dtype in (torch.float32, torch.float16):
        vae.to(dtype)
        with torch.inference_mode():
            seconds = timed(lambda dt=dtype: vae.decode(latents.to(dt) / vae.config.scaling_factor), 5)
        emit(bench="vae_decode", dtype=str(dtype), seconds=round(seconds, 4))
    vae.to(torch.float32)
    if args.device == "cuda":
        emit(bench="peak_gpu_memory", gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


if __name__ == "__main__":
    main()
