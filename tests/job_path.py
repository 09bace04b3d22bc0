"""One job's path through the production files: which module each call runs in, in order, on the dev model.

    python -m tests.job_path MODEL_DIR      # e.g. models/sdxl-dev (nox -s convert makes it)

A job runs through the RunPod handler (``Worker.handle``) with a profiler that records every call made in a
production module (core, model_build, worker, batch) from another production module (a library calling back
into ours, as a step callback does, is the library's path); consecutive calls in one file count as one stay. It prints
the stays in order, how many return to a file already left (to the engine: the orchestrator taking control back after
each part it calls), which files call into the engine (only the handler, once), and the engine's own calls in order.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model_build", "worker", "batch")
ENGINE = "worker/generation/engine.py"
JOB = {"prompt": "a (red:1.2) lighthouse, [day:night:0.5]", "negative_prompt": "blurry", "width": 256, "height": 256,
       "num_inference_steps": 2, "seed": 7}  # fmt: skip


def production_file(frame) -> str | None:
    """The frame's file relative to the repository, if it is in a production package."""
    try:
        relative = Path(frame.f_code.co_filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(relative) if relative.parts[0] in PACKAGES else None


@dataclass
class JobPath:
    stays: list[str]  # the production files a job's calls ran in, consecutive repeats collapsed
    entries: Counter[tuple[str, str]]  # (caller file, callee file) -> calls
    engine_calls: list[str]  # the files the engine called into, in order, consecutive repeats collapsed

    def calls_into(self, target: str) -> dict[str, int]:
        return {caller: n for (caller, callee), n in self.entries.items() if callee == target}


def job_path(model_dir: Path, job: dict) -> JobPath:
    """Run ``job`` through the handler under a profiler and return its path through the production files."""
    from core.settings import load_settings
    from worker.handler import Worker

    worker = Worker(load_settings(None, model_dir=str(model_dir), warmup=False))
    worker.start(model_dir)
    stays: list[str] = []
    entries: Counter[tuple[str, str]] = Counter()
    engine_calls: list[str] = []

    def profile(frame, event, arg) -> None:
        if event != "call" or frame.f_back is None:
            return
        relative, caller = production_file(frame), production_file(frame.f_back)
        # A call our code makes; a library calling back into ours (a step callback) is the library's path, not ours.
        if relative and caller and (not stays or stays[-1] != relative):
            stays.append(relative)
        if relative and caller and caller != relative:
            entries[(caller, relative)] += 1
            if caller == ENGINE and (not engine_calls or engine_calls[-1] != relative):
                engine_calls.append(relative)

    sys.setprofile(profile)
    try:
        output = worker.handle({"id": "job-path", "input": job})
    finally:
        sys.setprofile(None)
    if "error" in output:
        raise SystemExit(f"the job failed: {output['error']}")
    return JobPath(stays, entries, engine_calls)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1])
        return 2
    path = job_path(Path(sys.argv[1]), JOB)
    seen: set[str] = set()
    returns: Counter[str] = Counter()
    for index, stay in enumerate(path.stays):
        print(f"{index + 1:3d} {stay}")
        if stay in seen:
            returns[stay] += 1
        seen.add(stay)
    print(f"{len(path.stays)} stays in {len(seen)} files; {sum(returns.values())} returns to a file already left, "
          f"{returns[ENGINE]} of them to {ENGINE}")  # fmt: skip
    print(f"calls into {ENGINE} from other files: {path.calls_into(ENGINE)}")
    print(f"the engine's calls, in order: {' -> '.join(Path(name).stem for name in path.engine_calls)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
