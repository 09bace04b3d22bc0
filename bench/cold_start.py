"""Cold start through the real entry point: ``python -m worker --test_input ...`` from process start to its exit.

Each start is a fresh process with the page cache dropped first (``/proc/sys/vm/drop_caches``: root on the GPU
machine; without it the line says ``page_cache: "kept"``), as on a new serverless worker whose model sits on a
network volume or in the image. The parent timestamps every line the worker prints as it arrives, so the figures
need nothing from inside the worker but its own start-up log line (``start-up phases {...}``):

- ``engine_ready_s``: process start to the engine's "loaded ..." line (imports, weights read, placed, warmed up);
- ``first_image_s``: process start to the job's result line (the first image, as base64, delivered);
- ``exit_s``: process start to exit; ``phases``: the engine's own phases (``Engine.startup_phases``);
- ``imports_s``: the worker's own "libraries imported ... after the process started" line, by the kernel's clock
  for the process (interpreter start-up and every import before the engine starts; absent from older checkouts).

``--before-root DIR`` runs the same starts from another checkout (e.g. ``git archive`` of an earlier commit), in
alternating order, so a change's effect is measured in one call on one machine; ``--variant NAME:KEY=VALUE,...``
does the same for settings (``--variant no-libraries:PREFETCH_LIBRARIES=0``). ``--importtime`` adds one start under
``python -X importtime`` and reports the slowest top-level packages (cumulative seconds, cold page cache).

    python bench/cold_start.py --workdir /tmp/cold --rounds 2 [--model-dir DIR] [--before-root .cold/before]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import jsonlines  # noqa: E402
from bench.jsonlines import emit  # noqa: E402

PHASES = re.compile(r"start-up phases (\{.*\})")
IMPORTED = re.compile(r"libraries imported ([\d.]+) s after the process started")


def drop_page_cache() -> str:
    """Drop clean page-cache pages machine-wide (needs root); ``"all"``, or why not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "all"
    except OSError as error:
        return f"kept ({error.strerror})"


def build_model(workdir: Path) -> Path:
    """A full-size SDXL base with random fp16 weights, saved as a converted folder the worker accepts."""
    import torch

    from bench.fullsize import build_random_pipeline, save_as_model_dir

    folder = workdir / "sdxl-random"
    if not (folder / "model_index.json").is_file():
        pipe = build_random_pipeline("sdxl_base", "cuda" if torch.cuda.is_available() else "cpu", torch.float16)
        save_as_model_dir(pipe, folder)
        del pipe
        torch.cuda.empty_cache()
    return folder


def read_lines(stream: Any, started: float, lines: list[tuple[float, str]]) -> None:
    for line in stream:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))


def job(size: int, steps: int) -> dict:
    return {"input": {"prompt": "a lighthouse at dusk", "width": size, "height": size, "num_inference_steps": steps}}


def start_once(
    root: Path, model_dir: Path, extra_env: dict[str, str], importtime: bool, timeout: float, drop: bool, job: dict
) -> dict:
    """One start of ``python -m worker`` from ``root``; the parent's timeline of what it printed."""
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1", **extra_env}
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "worker"]
    command += ["--test_input", json.dumps(job)]
    page_cache = drop_page_cache() if drop else "kept (--keep-page-cache)"
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []
    readers = [
        threading.Thread(target=read_lines, args=(process.stdout, started, out), daemon=True),
        threading.Thread(target=read_lines, args=(process.stderr, started, err), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = -9
    exit_s = time.perf_counter() - started
    for reader in readers:
        reader.join(5)
    lines = sorted(out + err)
    ready = next(((t, m) for t, m in lines if PHASES.search(m)), None)
    result = next((t for t, m in lines if '"images"' in m or "'images'" in m or "data:image" in m), None)
    record = {
        "page_cache": page_cache,
        "exit_code": code,
        "first_line_s": round(lines[0][0], 2) if lines else None,
        "engine_ready_s": round(ready[0], 2) if ready else None,
        "first_image_s": round(result, 2) if result is not None else None,
        "exit_s": round(exit_s, 2),
        "phases": json.loads(PHASES.search(ready[1]).group(1)) if ready else None,
    }
    imported = next((float(found[1]) for _, m in lines if (found := IMPORTED.search(m))), None)
    if imported is not None:  # the worker's own clock: interpreter start-up and imports, before the engine
        record["imports_s"] = imported
    prefetched = [m.split("INFO ", 1)[-1][:160] for _, m in lines if "prefetched" in m]
    if prefetched:
        record["prefetch"] = prefetched if len(prefetched) > 1 else prefetched[0]
    if code != 0 or ready is None:
        record["tail"] = [m[:300] for _, m in lines if "import time:" not in m][-15:]
    if importtime:
        record["imports"] = slowest_packages([m for _, m in err])
    return record


def slowest_packages(stderr: list[str], top: int = 14) -> dict[str, float]:
    """Top-level packages by the import time of their own modules (``-X importtime``'s self column, microseconds,
    summed per top-level name: torch's time is torch's even when diffusers imported it)."""
    totals: dict[str, float] = {}
    for line in stderr:
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        own, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if own.isdigit():
            package = name.split(".")[0]
            totals[package] = totals.get(package, 0.0) + int(own) / 1e6
    largest = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return {name: round(seconds, 2) for name, seconds in largest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cold-start"))
    parser.add_argument("--model-dir", type=Path, help="a converted folder (default: build a random full-size one)")
    parser.add_argument("--rounds", type=int, default=2, help="measured starts per checkout")
    parser.add_argument("--before-root", type=Path, help="another checkout to start the same way, alternating")
    parser.add_argument("--importtime", action="store_true", help="one more start under python -X importtime")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the worker (repeatable)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="another start of this checkout with these settings added, alternating with the others (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--keep-page-cache", action="store_true", help="do not drop it (a shared machine)")
    parser.add_argument("--warm-rounds", type=int, default=0, help="then starts with the page cache kept (warm)")
    parser.add_argument("--size", type=int, default=1024, help="the job's width and height")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    args = parser.parse_args(argv)
    jsonlines.start(args.out)
    drop = not args.keep_page_cache
    the_job = job(args.size, args.steps)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = args.model_dir or build_model(args.workdir)
    emit(bench="cold_start_model", model_dir=str(model_dir), build_s=round(time.perf_counter() - started, 1))
    extra = dict(item.split("=", 1) for item in args.env)
    variants = {"after": (ROOT, extra)}
    if args.before_root:
        variants["before"] = (args.before_root.resolve(), extra)
    for item in args.variant:
        name, _, settings = item.partition(":")
        variants[name] = (ROOT, {**extra, **dict(pair.split("=", 1) for pair in settings.split(",") if pair)})
    roots = {name: root for name, (root, _) in variants.items()}
    for root in dict.fromkeys(roots.values()):  # unmeasured: writes each checkout's bytecode, as an image build does
        name = next(name for name, other in roots.items() if other == root)
        record = start_once(root, model_dir, variants[name][1], False, args.timeout, drop, the_job)
        emit(bench="cold_start_unmeasured", variant=name, exit_code=record["exit_code"], tail=record.get("tail"))
    for round_index in range(args.rounds):
        order = list(variants.items()) if round_index % 2 == 0 else list(reversed(variants.items()))
        for name, (root, settings) in order:
            record = start_once(root, model_dir, settings, False, args.timeout, drop, the_job)
            emit(bench="cold_start", variant=name, round=round_index, settings=settings, **record)
    for round_index in range(args.warm_rounds):  # the floor: every file already in memory (a restarted worker)
        for name, (root, settings) in variants.items():
            record = start_once(root, model_dir, settings, False, args.timeout, False, the_job)
            emit(bench="cold_start_warm_cache", variant=name, round=round_index, **record)
    if args.importtime:
        record = start_once(ROOT, model_dir, extra, True, args.timeout, drop, the_job)
        emit(bench="cold_start_importtime", variant="after", **record)


if __name__ == "__main__":
    main()
