"""Batch runner throughput (a benchmark, not a test: pytest never collects it). Prints JSON lines on stdout.

CPU overhead (default): the runner's time per item against the bare engine on the dev model::

    python bench/batch_throughput.py [--model DIR] [--lines 30] [--rounds 5] [--size 256 --steps 4] [--threads 1]

Rounds alternate ``engine.generate`` per line (the bare engine: no encoding, no files) and an in-process
``batch run --batch-size 1`` of the same lines into a fresh folder (line parsing, claims, PNG encoding and
fsynced writes in the writer thread, sidecars, metadata), so load on a shared machine hits both alike; the
overhead is the ratio of the median per-item times.

GPU throughput: images/s of full-size SDXL (random weights, fp16) for the same lines at several batch sizes::

    python bench/batch_throughput.py --full-size --device cuda [--lines 100] [--batch-sizes 1,4,8]
        [--size 1024 --steps 20] [--time-limit 55]

The pipeline is built on the GPU from ``model_build``'s shipped SDXL base config (bench/fullsize.py), saved as
a converted folder with a manifest and loaded by the real ``Engine``, so the runner is measured exactly as it
runs. Each batch size runs the lines into its own folder after one warm-up call; ``--time-limit`` stops a
batch size after that many seconds (the rate is over the images finished) to keep the whole run short. The
last line compares the images the batch sizes have in common (bytes, and the largest pixel difference).
``--config dev_tiny --device cpu --full-size`` is a dry run of the GPU path on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch.records import ShardSummary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def write_lines(path: Path, count: int, size: int, steps: int, guidance: float, scheduler: str) -> Path:
    subjects = ("a lighthouse", "a red fox", "a mountain lake", "a city street", "a bowl of fruit", "an old car")
    with open(path, "w") as handle:
        for n in range(count):
            line = {
                "id": f"bench-{n:04d}",
                "prompt": f"{subjects[n % len(subjects)]}, photograph number {n}, detailed, soft light",
                "negative_prompt": "blurry",
                "height": size,
                "width": size,
                "num_inference_steps": steps,
                "guidance_scale": guidance,
                "scheduler": scheduler,
                "seed": 1000 + n,
            }
            handle.write(json.dumps(line) + "\n")
    return path


def run_shard(source: Path, out: Path, engine: Any, batch_size: int, max_seconds: float | None = None) -> ShardSummary:
    """One in-process ``batch run`` of ``source`` into ``out`` on the loaded ``engine``; returns its summary."""
    from batch.execute import run_shard
    from batch.options import LocalEngineOptions, RunOptions

    options = RunOptions(source, out, progress=False, max_seconds=max_seconds)
    return run_shard(options, LocalEngineOptions(batch_size=batch_size, engine=engine))


def dev_model(workdir: Path) -> Path:
    from model_build.convert import convert
    from model_build.dev_model import write_dev_checkpoint

    checkpoint = write_dev_checkpoint(workdir / "sdxl-dev.safetensors")
    return convert(checkpoint, workdir / "sdxl-dev").path


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (the image encoder processes)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cpu_overhead(args: argparse.Namespace, workdir: Path) -> None:
    import logging

    import torch

    logging.getLogger("batch").setLevel(logging.ERROR)
    from batch.jobs import Shard, load_shard
    from core.settings import load_settings
    from worker.generation.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or dev_model(workdir)
    engine = Engine(model, settings=load_settings())  # COMPILE etc. from the environment, as the worker
    source = write_lines(workdir / "jobs.jsonl", args.lines, args.size, args.steps, args.guidance, args.scheduler)
    requests = [job.request for job in load_shard(source, Shard(0, 1)).jobs]
    engine.generate(requests[0])  # warm-up: first-call allocations

    rounds: dict[str, list[tuple[float, float]]] = {"bare": [], "runner": []}
    for round_index in range(args.rounds):
        wall, cpu = time.perf_counter(), cpu_seconds()
        for request in requests:
            engine.generate(request)
        rounds["bare"].append(((time.perf_counter() - wall) / len(requests), (cpu_seconds() - cpu) / len(requests)))
        out = workdir / f"out-{round_index}"
        wall, cpu = time.perf_counter(), cpu_seconds()
        summary = run_shard(source, out, engine, batch_size=1)
        rounds["runner"].append(((time.perf_counter() - wall) / len(requests), (cpu_seconds() - cpu) / len(requests)))
        assert summary.made == len(requests), summary
        shutil.rmtree(out)
        emit(
            round=round_index,
            **{f"{name}_s_per_item": [round(v, 4) for v in values[-1]] for name, values in rounds.items()},
        )

    # What the encoder processes take off the generating process: encoding one image, measured alone.
    from worker.output.images import a1111_parameters, encode_image

    result = engine.generate(requests[0])
    started = time.perf_counter()
    parameters = a1111_parameters(requests[0], result.seeds[0], engine.model_name, engine.model_hash, [])
    encode_image(result.images[0], "png", 95, parameters)
    encode_s = time.perf_counter() - started

    def stat(name: str, column: int, how: Any) -> float:
        return how(values[column] for values in rounds[name])

    record: dict[str, Any] = {
        "mode": "cpu-overhead",
        "model": str(model),
        "lines": len(requests),
        "rounds": args.rounds,
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "png_encode_s_per_image": round(encode_s, 4),
    }
    for label, column in (("wall", 0), ("cpu", 1)):
        for how_name, how in (("median", statistics.median), ("min", min)):
            bare, runner = stat("bare", column, how), stat("runner", column, how)
            record[f"{label}_{how_name}_bare_s"] = round(bare, 4)
            record[f"{label}_{how_name}_runner_s"] = round(runner, 4)
            record[f"{label}_{how_name}_overhead_percent"] = round(100 * (runner / bare - 1), 2)
    emit(**record)


def max_pixel_difference(a: bytes, b: bytes) -> int:
    import numpy as np
    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    second = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    return int(np.abs(first - second).max())


def full_size(args: argparse.Namespace, workdir: Path) -> None:
    import logging

    import torch

    logging.getLogger("batch").setLevel(logging.ERROR)
    from bench.fullsize import build_random_pipeline, save_as_model_dir
    from core.settings import load_settings
    from worker.generation.engine import Engine

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    started = time.perf_counter()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = build_random_pipeline(args.config, device=args.device, dtype=dtype)
    model = save_as_model_dir(pipe, workdir / f"random-{args.config}", "fp16" if dtype == torch.float16 else "fp32")
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    engine = Engine(model, settings=load_settings())  # COMPILE etc. from the environment, as the worker
    emit(stage="setup", seconds=round(time.perf_counter() - started, 1), device=engine.plan.device, model=str(model))

    source = write_lines(workdir / "jobs.jsonl", args.lines, args.size, args.steps, args.guidance, args.scheduler)
    from batch.jobs import Shard, load_shard

    requests = [job.request for job in load_shard(source, Shard(0, 1)).jobs]
    outputs: dict[int, Path] = {}
    for batch_size in args.batch_sizes:
        engine.generate_group([requests[0]] * batch_size)  # warm-up at this shape (kernels, allocator)
        out = workdir / f"out-bs{batch_size}"
        outputs[batch_size] = out
        summary = run_shard(source, out, engine, batch_size, args.time_limit)
        peak = None
        if args.device == "cuda":
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        emit(
            batch_size=batch_size,
            images=summary.images,
            lines=len(requests),
            stopped_by_time_limit=summary.remaining > 0,
            seconds=summary.seconds,
            images_per_s=summary.images_per_s,
            pipeline_calls=summary.pipeline_calls,
            padding_images=summary.padded_images,
            peak_gpu_gib=peak,
            size=args.size,
            steps=args.steps,
            device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        )

    # Alone vs inside a batch, at the same --batch-size: one line in a file of its own runs as a padded call.
    largest = max(args.batch_sizes)
    alone_source = workdir / "alone.jsonl"
    alone_source.write_text(source.read_text().splitlines(keepends=True)[1])
    alone_out = workdir / "out-alone"
    run_shard(alone_source, alone_out, engine, largest)
    (name,) = [path.name for path in (alone_out / "images").iterdir()]
    alone, batched = (alone_out / "images" / name).read_bytes(), (outputs[largest] / "images" / name).read_bytes()
    emit(
        compare=f"alone (padded) vs in a batch, both at bs{largest}",
        byte_identical=alone == batched,
        max_pixel_difference=max_pixel_difference(alone, batched),
    )

    # Across batch sizes the kernels differ (other shapes), so images may differ by float rounding.
    first = args.batch_sizes[0]
    for other in args.batch_sizes[1:]:
        folders = (outputs[first] / "images", outputs[other] / "images")
        names = sorted({p.name for p in folders[0].iterdir()} & {p.name for p in folders[1].iterdir()})
        pairs = [((folders[0] / name).read_bytes(), (folders[1] / name).read_bytes()) for name in names]
        emit(
            compare=f"bs{first} vs bs{other}",
            images=len(pairs),
            byte_identical=sum(a == b for a, b in pairs),
            max_pixel_difference=max((max_pixel_difference(a, b) for a, b in pairs[:8]), default=None),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="GPU throughput on full-size random SDXL")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default="sdxl_base", help="with --full-size: dev_tiny for a dry run on the CPU")
    parser.add_argument("--model", type=Path, help="CPU mode: a converted model folder (default: build the dev model)")
    parser.add_argument("--lines", type=int)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU mode: torch threads (default 1: the encoder process gets a core, as on an idle GPU host; "
        "0 = torch's own choice)",
    )
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default="Euler")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--time-limit", type=float, default=55.0, help="seconds per batch size (GPU mode)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, deleted afterwards")
    args = parser.parse_args()
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU numbers must come from the CPU even on a GPU machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    defaults = (100, 1024, 20) if args.full_size else (30, 256, 4)
    args.lines = args.lines or defaults[0]
    args.size = args.size or defaults[1]
    args.steps = args.steps or defaults[2]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="batch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        (full_size if args.full_size else cpu_overhead)(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
