"""Worker start with a cold page cache, with and without the weight prefetch (``PREFETCH_WEIGHTS``), as JSON lines.

    python bench/cold_read.py --model-dir /tmp/full/sdxl-full-dir --rounds 3

Each run is a fresh process through ``worker.__main__.start_worker`` (the entry point RunPod runs) after the
folder's files were dropped from the page cache (``POSIX_FADV_DONTNEED``: no root needed), alternating
prefetch on and off. A line per run: seconds from process start to a loaded engine, the engine's start-up
phases and what the prefetch read. Where the disk is fast and the imports short, there is little to overlap;
the gain is largest on a network volume or a freshly pulled image, which this machine cannot reproduce.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.jsonlines import emit

CHILD = """
import json, time
started = time.perf_counter()
from core.settings import load_settings
from worker.__main__ import start_worker
worker = start_worker(load_settings())
assert worker.engine is not None, worker.startup_error
print(json.dumps({"engine_ready_s": round(time.perf_counter() - started, 2),
                  "phases": worker.engine.startup_phases,
                  "prefetch_report": vars(worker.prefetch) if worker.prefetch else None}))
"""


def drop_from_page_cache(folder: Path) -> int:
    """Ask the kernel to forget the folder's cached file pages; the bytes of the files it was asked about."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # dirty pages cannot be dropped
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
            total += path.stat().st_size
    return total


def run(model_dir: Path, prefetch: bool) -> dict:
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "PREFETCH_WEIGHTS": "1" if prefetch else "0"}
    environment.update(HF_HUB_OFFLINE="1", WARMUP="0", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", CHILD], env=environment, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a converted folder (full size to matter)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_index in range(args.rounds):
        for prefetch in (round_index % 2 == 0, round_index % 2 == 1):  # alternate which goes first
            dropped = drop_from_page_cache(args.model_dir)
            result = run(args.model_dir, prefetch)
            times[prefetch].append(result["engine_ready_s"])
            emit(bench="cold_read", round=round_index, prefetch=prefetch, dropped_bytes=dropped, **result)
    emit(
        bench="cold_read_summary",
        median_engine_ready_s={"prefetch": statistics.median(times[True]), "off": statistics.median(times[False])},
        cpus=os.cpu_count(),
    )


if __name__ == "__main__":
    main()
