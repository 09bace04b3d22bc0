"""Seam quality, time and peak memory of diffusers' tiled VAE against the whole-image decode and encode.

    python bench/vae_tiling.py                                   # the dev VAE, a 1024² image (latents 128²), CPU
    python bench/vae_tiling.py --vae sdxl --size 1024 --tile 512 # SDXL's VAE architecture, random weights, CPU
    python bench/vae_tiling.py --model-dir models/sdxl --size 2048   # a converted model's own VAE (GPU if present)

The worker tiles with ``AutoencoderKL``'s own tiling (:mod:`worker.generation.vae_tiling`): tiles of the VAE's
``sample_size`` (1024 px for SDXL, 256 px for the dev VAE; ``--tile`` overrides it here), 25% overlap, linear
blending. A smooth synthetic picture (gradients, discs, stripes) is encoded once without tiles; its latents are then
decoded whole and tiled, and the picture is encoded tiled and decoded whole. One JSON line per measurement:
PSNR (dB, images on 0..255) and the largest and mean absolute differences in 8-bit levels, seconds, and peak memory
(CUDA: ``max_memory_allocated``; CPU: the growth of the process's peak RSS over what it held before the call, each
variant in a fresh process so one variant's peak cannot hide another's).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_picture(size: int) -> Image.Image:
    """Smooth gradients with hard-edged discs and stripes: both what blends hide and what seams show."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6.0 * x + 4.0 * y)], axis=-1)
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for k in range(12):
        cx, cy, r = (k * 397) % size, (k * 211) % size, size // 16 + (k * 13) % (size // 10)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=((k * 60) % 256, (k * 110) % 256, (k * 170) % 256))
    for k in range(0, size, max(8, size // 32)):
        draw.line((k, 0, k + size // 4, size), fill=(255, 255, 255), width=2)
    return image


def load_vae(args: argparse.Namespace, device: str) -> Any:
    from diffusers import AutoencoderKL

    if args.model_dir:
        dtype = torch.float32 if device == "cpu" else torch.float16
        vae = AutoencoderKL.from_pretrained(Path(args.model_dir) / "vae", torch_dtype=dtype, local_files_only=True)
        if device == "cuda" and vae.config.force_upcast:
            vae = vae.to(torch.float32)  # as the worker keeps a force_upcast VAE (VAE_DTYPE unset)
    else:  # random weights of an architecture: the public SDXL VAE's, or the dev model's
        from bench.fullsize import random_init
        from model_build.architectures import empty_component

        vae = empty_component("sdxl_base" if args.vae == "sdxl" else "dev_tiny", "vae").to_empty(device="cpu")
        random_init(vae, torch.Generator("cpu").manual_seed(0))
    vae = vae.to(device).eval().requires_grad_(False)
    if args.tile:
        vae.tile_sample_min_size = args.tile
        vae.tile_latent_min_size = args.tile // 8
    return vae


def to_pixels(decoded: torch.Tensor) -> np.ndarray:
    """The worker's 8-bit image from the VAE's -1..1 output (diffusers' postprocess rounds the same way)."""
    return ((decoded.float().clamp(-1, 1) / 2 + 0.5) * 255).round().to(torch.uint8).cpu().numpy()


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((difference.astype(np.float64) ** 2).mean())
    return {
        "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else math.inf,
        "max_abs_levels": int(difference.max()),
        "mean_abs_levels": round(float(difference.mean()), 4),
    }


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def inputs(args: argparse.Namespace, vae: Any, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The picture (-1..1) and its untiled latents, made once and read back by every variant's process."""
    work = Path(args.work)
    if not (work / "latents.pt").exists():
        picture = torch.from_numpy(np.asarray(synthetic_picture(args.size))).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.inference_mode():
            latents = vae.encode(picture.to(device, vae.dtype)).latent_dist.mode()
        torch.save({"picture": picture, "latents": latents.float().cpu()}, work / "latents.pt")
    saved = torch.load(work / "latents.pt")
    return saved["picture"].to(device, vae.dtype), saved["latents"].to(device, vae.dtype)


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """One variant (decode/encode, tiled or not) in this process: its output, seconds and peak memory."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.set_num_threads(args.threads)
    vae = load_vae(args, device)
    picture, latents = inputs(args, vae, device)
    operation, tiled = args.measure_one.split(":")
    if operation == "setup":
        return {}
    vae.use_tiling = tiled == "tiled"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss, peak_before = current_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = vae.decode(latents).sample if operation == "decode" else vae.encode(picture).latent_dist.mode()
        if device == "cuda":
            torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if device == "cuda":
        memory = {"peak_extra_gpu_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
    else:
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory = {
            "peak_extra_rss_mib": round((peak_after - base_rss) / 2**20, 1),
            "peak_was_this_call": peak_after > peak_before,  # else the number is a lower bound
        }
    if operation == "encode":
        vae.use_tiling = False
        with torch.inference_mode():
            output = vae.decode(output).sample  # compare encodes by the images they decode to
    np.save(Path(args.work) / f"{operation}-{tiled}.npy", to_pixels(output))
    # CPU seconds (one thread) say more than wall seconds on a shared machine.
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "device": device, **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", choices=("dev", "sdxl"), default="dev", help="random-weight architecture to build")
    parser.add_argument("--model-dir", help="a converted model folder: its own VAE instead of random weights")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--tile", type=int, help="tile side in pixels (default: the VAE's sample_size)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: comparable CPU seconds)")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        print(json.dumps(measure_one(args)))
        return
    passthrough = [f"--size={args.size}", f"--vae={args.vae}"]
    passthrough += [f"--model-dir={args.model_dir}"] if args.model_dir else []
    passthrough += [f"--tile={args.tile}"] if args.tile else []
    passthrough += ["--cpu"] if args.cpu else []
    passthrough += [f"--threads={args.threads}"]
    results: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
    work = Path(tempfile.mkdtemp(prefix="vae-tiling-"))
    for variant in ("setup:-", "decode:whole", "decode:tiled", "encode:whole", "encode:tiled"):
        command = [sys.executable, __file__, *passthrough, f"--measure-one={variant}", f"--work={work}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        if not variant.startswith("setup"):
            results[variant] = (
                json.loads(done.stdout.strip().splitlines()[-1]),
                np.load(work / f"{variant.replace(':', '-')}.npy"),
            )
    source = args.model_dir or f"random {args.vae} VAE"
    for operation in ("decode", "encode"):
        whole, tiled = results[f"{operation}:whole"], results[f"{operation}:tiled"]
        line = {
            "vae_tiling": operation,
            "vae": source,
            "size": args.size,
            "tile": args.tile or "sample_size",
            **compare(whole[1], tiled[1]),
            "whole": whole[0],
            "tiled": tiled[0],
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
