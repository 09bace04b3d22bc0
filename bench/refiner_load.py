"""Full-size SDXL base + refiner (random weights): the refiner converts, and what it adds on the GPU.

    python bench/refiner_load.py WORKDIR [--dev] [--device cuda]

Writes JSON lines to stdout (and $OUT/refiner_load.jsonl when OUT is set). Steps: write the dev
checkpoints (full size unless --dev), convert both with model_build (timed), verify --full the
refiner, then in a fresh process load the base, the refiner sharing the base's VAE and OpenCLIP
encoder, and the refiner on its own, measuring load time and GPU memory, and run a base-only job
and an ensemble-of-experts job (high_noise_frac 0.8) at 1024x1024, 25 steps each.

Plain diffusers pipelines, not the worker's engine: it measures what the refiner itself costs.
On the device machine (no network): carry wheels of diffusers 0.42.1 and transformers 5.24.0 and
install them with ``pip install --no-deps`` (keep the image's huggingface_hub 1.x: 2.x needs httpx2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from model_build.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def log(**fields) -> None:
    line = json.dumps(fields)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "refiner_load.jsonl", "a") as handle:
            handle.write(line + "\n")


def run(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "model_build", "-q", *args], cwd=ROOT, check=True)
    return round(time.perf_counter() - started, 1)


def prepare(work: Path, dev: bool) -> tuple[Path, Path]:
    size = [] if dev else ["--full-size"]
    models = {}
    for name, extra in (("base", []), ("refiner", ["--refiner"])):
        checkpoint = work / f"{name}.safetensors"
        seconds = run("dev-checkpoint", str(checkpoint), *size, *extra)
        log(step=f"write {name} checkpoint", seconds=seconds, gb=round(checkpoint.stat().st_size / 1e9, 2))
        models[name] = work / "models" / name
        seconds = run("convert", str(checkpoint), "--output", str(models[name]))
        manifest = read_manifest(models[name])
        log(
            step=f"convert {name}",
            seconds=seconds,
            family=manifest.family,
            config=manifest.config,
            tensors=manifest.tensors,
        )
        checkpoint.unlink()  # disk: the folder is what is measured from here on
    log(step="verify --full refiner", seconds=run("verify", "--full", str(models["refiner"])))
    return models["base"], models["refiner"]


def measure(base_dir: Path, refiner_dir: Path, device: str, dev: bool) -> None:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def allocated() -> float:
        return round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda" else 0.0

    def load(cls, folder: Path, **shared):
        started = time.perf_counter()
        pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **shared).to(device)
        sync()
        pipe.set_progress_bar_config(disable=True)
        return pipe, round(time.perf_counter() - started, 2)

    before = allocated()
    base, seconds = load(StableDiffusionXLPipeline, base_dir)
    base_gib = allocated() - before
    log(step="load base", seconds=seconds, gpu_gib=round(base_gib, 2))
    shared = {"vae": base.vae, "text_encoder_2": base.text_encoder_2, "tokenizer_2": base.tokenizer_2}
    before = allocated()
    refiner, seconds = load(StableDiffusionXLImg2ImgPipeline, refiner_dir, **shared)
    log(
        step="load refiner sharing the base's vae and text_encoder_2",
        seconds=seconds,
        extra_gpu_gib=round(allocated() - before, 2),
    )
    before = allocated()
    alone, seconds = load(StableDiffusionXLImg2ImgPipeline, refiner_dir)
    log(step="load refiner on its own", seconds=seconds, extra_gpu_gib=round(allocated() - before, 2))
    del alone
    if device == "cuda":
        torch.cuda.empty_cache()

    size, steps = (64, 4) if dev else (1024, 25)
    prompt = "a lighthouse on a cliff at dusk"

    def job(ensemble: bool) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        generator = torch.Generator(device).manual_seed(0)
        started = time.perf_counter()
        if not ensemble:
            base(prompt, width=size, height=size, num_inference_steps=steps, generator=generator, output_type="np")
        else:
            latents = base(
                prompt,
                width=size,
                height=size,
                num_inference_steps=steps,
                denoising_end=0.8,
                generator=generator,
                output_type="latent",
            ).images
            refiner(
                prompt,
                image=latents,
                num_inference_steps=steps,
                denoising_start=0.8,
                generator=generator,
                output_type="np",
            )
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        return round(time.perf_counter() - started, 2), round(peak, 2)

    for ensemble in (False, True):
        job(ensemble)  # warm-up: kernels, cuDNN choices
    for repeat in range(3):
        for ensemble in (False, True):
            seconds, peak = job(ensemble)
            log(
                step="job",
                kind="base + refiner (0.8)" if ensemble else "base only",
                size=size,
                steps=steps,
                repeat=repeat,
                seconds=seconds,
                peak_gpu_gib=peak,
            )


def main() -> None:
    work = Path(sys.argv[1])
    dev = "--dev" in sys.argv
    device = "cuda" if "--device" not in sys.argv else sys.argv[sys.argv.index("--device") + 1]
    if "--measure" in sys.argv:
        measure(work / "models" / "base", work / "models" / "refiner", device, dev)
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, dev)
    import torch

    log(step="versions", torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else device)
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
