"""Conversion time and peak memory (RSS) for the dev model and, with --full-size, the real SDXL base size.

    python bench/convert_memory.py                                   # dev model only (seconds)
    python bench/convert_memory.py --full-size --workdir /tmp/bench  # + ~7 GB checkpoint (minutes, ~15 GB disk)

Each step runs as its own process (``python -m model_build ...``); its wall time and its peak RSS
come from ``os.wait4``, i.e. the kernel's own high-water mark for that process alone, so one
step's memory never hides in another's. The full-size checkpoint is the dev model at the real SDXL
base architecture (fp16, random weights, ~6.9 GB); it is written to --workdir and deleted after
the run, with the converted folder, unless --keep. Prints one JSON object.

This is a benchmark, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(args: list[str]) -> dict[str, float]:
    """Run ``python -m model_build ARGS``; return its wall seconds and peak RSS in MiB."""
    started = time.perf_counter()
    # The child's own messages go to stderr, so that stdout carries only this script's JSON.
    process = subprocess.Popen([sys.executable, "-m", "model_build", "-q", *args], stdout=sys.stderr)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"python -m model_build {' '.join(args)} failed with exit status {process.returncode}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is KiB


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(name: str, workdir: Path, full_size: bool, keep: bool) -> dict:
    checkpoint = workdir / f"{name}.safetensors"
    output = workdir / "models" / name
    try:
        write = run_measured(["dev-checkpoint", str(checkpoint), *(["--full-size"] if full_size else [])])
        convert = run_measured(["convert", str(checkpoint), "--output", str(output)])
        again = run_measured(["convert", str(checkpoint), "--output", str(output)])  # the no-op path
        verify_full = run_measured(["verify", str(output), "--full"])
        return {
            "checkpoint_bytes": checkpoint.stat().st_size,
            "output_bytes": folder_bytes(output),
            "convert": convert,  # fp16, the default: inspect, convert, save, reload + prove, hash, rename
            "convert_again_no_op": again,
            "verify_full": verify_full,
            "write_checkpoint": write,
        }
    finally:
        if not keep:
            checkpoint.unlink(missing_ok=True)
            shutil.rmtree(workdir / "models", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="also measure the ~7 GB SDXL base-size checkpoint")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints and outputs go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and converted folders")
    args = parser.parse_args()

    import psutil
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "dev": measure("sdxl-dev", workdir, full_size=False, keep=args.keep),
    }
    if args.full_size:
        report["full_size"] = measure("sdxl-base-size", workdir, full_size=True, keep=args.keep)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
