"""``COMPILE=aot`` start-ups, as JSON lines: the first builds the AOTInductor packages, the next ones load them.

    python bench/aot_start.py --model-dir models/sdxl-dev --warmup-sizes 64x64          # the CPU dev model
    python bench/aot_start.py --full-size --out results.jsonl   # a GPU: random full-size SDXL, 1024x1024

Each round is a fresh process that loads the engine (``worker.generation.engine.Engine``, warm-up included) with
``COMPILE=aot`` and one package folder, empty before the first round: a line per round with the engine's start,
its phases and each package's build or load seconds and its agreement with the eager UNet. Then one job, to show
that the loaded package serves (its packaged and eager UNet calls). Same call, same machine: compare its rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cold_start import drop_page_cache
from bench.jsonlines import emit, start

CHILD = """
import cProfile, json, logging, pstats, sys, time
import torch
started = time.perf_counter()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)7.0f ms %(name)s %(message)s")
from core.settings import load_settings
from worker.generation.engine import Engine
from worker.request.schema import GenerationRequest
model_dir, settings, size, profile = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
profiler = cProfile.Profile() if profile else None
if profiler:
    profiler.enable()
engine = Engine(model_dir, settings=load_settings(settings))
if profiler:
    profiler.disable()
ready = time.perf_counter() - started
report = engine.accelerator.report
job_started = time.perf_counter()
engine.generate(GenerationRequest(prompt="a lighthouse", width=size, height=size, num_inference_steps=4, seed=1))
aot = engine.accelerator.aot
vae_decode_ms = None
if engine.accelerator.aot_vae is not None and torch.cuda.is_available():  # COMPILE_VAE=1: packaged against eager
    decoder, vae = engine.pipe.vae.decoder, engine.pipe.vae
    latent = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=vae.dtype)
    from bench.engine_speed import milliseconds, timed
    def decode_ms():
        with torch.no_grad():
            return milliseconds(timed(lambda: vae.decode(latent, return_dict=False), 5, warmup=2))["median"]
    packaged_ms = decode_ms()
    decoder.forward = engine.accelerator.aot_vae.eager_forward
    vae_decode_ms = {"packaged": packaged_ms, "eager": decode_ms(), "dtype": str(vae.dtype)}
    decoder.forward = engine.accelerator.aot_vae
slowest = []
if profiler:
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])[:40]  # by cumulative time
    slowest = [[round(row[3], 2), f"{'/'.join(key[0].split('/')[-3:])}:{key[1]}({key[2]})"] for key, row in rows]
print(json.dumps({"engine_ready_s": round(ready, 2), "phases": engine.startup_phases,
                  "warm_up_s": round(report.seconds, 2), "error": report.error, "packages": report.aot_packages,
                  "job_s": round(time.perf_counter() - job_started, 2),
                  "packaged_calls": aot.packaged_calls, "eager_calls": aot.eager_calls,
                  "vae_decode_ms": vae_decode_ms, "profile": slowest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a converted folder")
    source.add_argument("--full-size", action="store_true", help="build a random full-size SDXL folder (CUDA, fp16)")
    parser.add_argument("--cache-dir", type=Path, help="the package folder's parent (default: a new temporary one)")
    parser.add_argument("--warmup-sizes", default="1024x1024", help="WARMUP_SIZES (the job uses the first)")
    parser.add_argument(
        "--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs")
    )
    parser.add_argument("--warmup-batch-sizes", default="1", help="WARMUP_BATCH_SIZES (one package serves them all)")
    parser.add_argument("--compile-vae", action="store_true", help="COMPILE_VAE=1 VAE_DTYPE=bf16 (its package)")
    parser.add_argument("--rounds", type=int, default=2, help="starts: the first builds, the rest load")
    parser.add_argument("--cold-rounds", type=int, default=0, help="then loads with the page cache dropped (root)")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine's start in the loading rounds")
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    args = parser.parse_args()
    start(args.out)
    if args.full_size:
        import torch

        from bench.fullsize import build_random_pipeline, save_as_model_dir

        pipe = build_random_pipeline("sdxl_base", "cuda", torch.float16)
        args.model_dir = save_as_model_dir(pipe, Path(tempfile.mkdtemp(prefix="aot-start-model-")) / "sdxl-random")
        del pipe
        torch.cuda.empty_cache()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="aot-start-"))
    settings = {
        "COMPILE": "aot",
        "COMPILE_MODE": args.compile_mode,
        "COMPILE_CACHE_DIR": str(cache),
        "WARMUP_SIZES": args.warmup_sizes,
        "WARMUP_BATCH_SIZES": args.warmup_batch_sizes,
        **({"COMPILE_VAE": "1", "VAE_DTYPE": "bf16"} if args.compile_vae else {}),
    }
    size = int(args.warmup_sizes.split(",")[0].split("x")[0])
    root = Path(__file__).resolve().parents[1]
    for round_number in range(1, args.rounds + args.cold_rounds + 1):
        cold = round_number > args.rounds
        page_cache = drop_page_cache() if cold else "kept"
        profile = "1" if args.profile and round_number > 1 else "0"
        command = [sys.executable, "-c", CHILD, str(args.model_dir), json.dumps(settings), str(size), profile]
        done = subprocess.run(command, capture_output=True, text=True, cwd=root)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        child = json.loads(lines[-1]) if lines else None
        log = [line[:220] for line in done.stderr.splitlines() if " ms " in line and "step " not in line][-25:]
        emit(
            bench="aot_start",
            round=round_number,
            page_cache=page_cache,
            cache_dir=str(cache),
            exit_code=done.returncode,
            **(child or {"stderr_tail": done.stderr[-1500:]}),
            log=log,
        )


if __name__ == "__main__":
    main()
