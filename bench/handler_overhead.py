"""CPU benchmark: the worker handler's overhead over a bare diffusers pipeline call, and image encoding.

    python bench/handler_overhead.py --model models/sdxl-dev [--repeats 7]

Prints JSON lines. The bare call is stock ``StableDiffusionXLPipeline.__call__`` with the same
prompt, size, steps, scheduler and seed, to PIL; the handler adds validation, the prompt encoder,
per-image generators, our VAE decode with NaN/black checks, and image encoding (reported apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import load_settings
from worker.generation.schedulers import build_scheduler
from worker.handler import Worker
from worker.output.images import encode_image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=Path("models/sdxl-dev"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    worker = Worker(load_settings({}))
    worker.start(args.model)
    if worker.startup_error:
        raise SystemExit(str(worker.startup_error))
    engine = worker.engine
    job = {
        "prompt": "a lighthouse on a cliff at dawn, oil painting",
        "negative_prompt": "blurry",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "scheduler": "Euler",
        "seed": 1,
    }

    def bare() -> float:
        engine.pipe.scheduler = build_scheduler("Euler", engine.scheduler_config)
        started = time.perf_counter()
        engine.pipe(
            prompt=job["prompt"],
            negative_prompt=job["negative_prompt"],
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(1),
        )
        return time.perf_counter() - started

    def through_handler() -> tuple[float, float]:
        engine.prompt_encoder.clear_cache()  # no help from the embedding cache: a fair comparison
        started = time.perf_counter()
        out = worker.handle({"id": "bench", "input": job})
        total = time.perf_counter() - started
        return total, out["metadata"]["timings"]["image_encoding_s"]

    bare(), through_handler()  # warm-up
    bare_times, handler_times, encode_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        bare_times.append(bare())
        total, encoding = through_handler()
        handler_times.append(total - encoding)
        encode_times.append(encoding)
    bare_s, handler_s = statistics.median(bare_times), statistics.median(handler_times)
    print(
        json.dumps(
            {
                "bench": "handler_overhead",
                "device": "cpu",
                "size": args.size,
                "steps": args.steps,
                "bare_pipeline_s": round(bare_s, 4),
                "handler_without_image_encoding_s": round(handler_s, 4),
                "overhead_pct": round(100 * (handler_s / bare_s - 1), 2),
                "image_encoding_s": round(statistics.median(encode_times), 4),
            }
        )
    )

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    smooth = noise.resize((64, 64)).resize((1024, 1024), Image.BICUBIC)  # closer to a real picture
    for name, image in (("noise", noise), ("smooth", smooth)):
        for output_format in ("png", "jpeg", "webp"):
            times, size = [], 0
            for _ in range(5):
                started = time.perf_counter()
                size = len(encode_image(image, output_format, 95, 0, "parameters").data)
                times.append(time.perf_counter() - started)
            print(
                json.dumps(
                    {
                        "bench": "image_encoding_1024",
                        "content": name,
                        "format": output_format,
                        "seconds": round(statistics.median(times), 4),
                        "bytes": size,
                    }
                )
            )


if __name__ == "__main__":
    main()
