"""Write requirements-lock-<build>.txt: the image's whole runtime closure, every file by sha256 (``nox -s lock``).

    python docker/lock.py [--uv UV] [--build cpu --build cu130 ...] [--find-links DIR] [--check]

One lock per CUDA build of torch, resolved with ``uv pip compile --generate-hashes`` for the image's platform
(CPython 3.11, x86_64 manylinux on Debian 12's glibc 2.36), whatever machine runs this:

- ``cu130``: PyPI only. PyPI's Linux x86_64 torch wheel *is* a CUDA 13.0 build (it requires the nvidia-*-cu13
  wheels and cuda-toolkit 13.0), so this lock pins torch==X from PyPI and every CUDA wheel with it.
- ``cpu``: torch==X+cpu, from https://download.pytorch.org/whl/cpu, or from ``--find-links DIR`` where that
  index cannot be reached (the hash is then the local file's: check it against the index where you can).
- ``cu126``/``cu128``: torch==X+cuNNN from https://download.pytorch.org/whl/cuNNN; only where that index is
  reachable. Without its lock the Dockerfile installs that build from the index at the cu130 lock's versions.

``--check`` rewrites nothing and exits 1 if a lock differs from what would be written (the index moved on, or
requirements.txt changed). Standard library only; uv comes from the nox session.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
PYTORCH_INDEX = "https://download.pytorch.org/whl/{build}"
PLATFORM = ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_36")
DEFAULT_BUILDS = ("cpu", "cu130")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def lock_path(build: str) -> Path:
    return ROOT / f"requirements-lock-{build}.txt"


def requirements_for(build: str, requirements: str) -> str:
    """requirements.txt with torch narrowed to ``build``'s local version (cu130: PyPI's own torch, unchanged)."""
    if build == "cu130":
        return requirements
    pinned, count = re.subn(r"^torch==([^\s#;+]+)", rf"torch==\1+{build}", requirements, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit("requirements.txt must pin torch==VERSION exactly once")
    return pinned


def header(build: str, sources: Sequence[str]) -> str:
    return (
        f"# The image's runtime closure for CUDA={build}, every file by sha256: written by `nox -s lock`\n"
        f"# (docker/lock.py) from requirements.txt for CPython 3.11 on x86_64 manylinux_2_36 (Debian 12).\n"
        f"# Sources: {', '.join(sources)}. Do not edit: change requirements.txt and run `nox -s lock`.\n"
    )


def compile_lock(uv: str, build: str, find_links: Sequence[str]) -> str:
    requirements = requirements_for(build, (ROOT / "requirements.txt").read_text())
    sources = ["--index-url", PYPI]
    described = ["PyPI"]
    if build != "cu130":
        if find_links:
            for folder in find_links:
                sources += ["--find-links", folder]
            described.append("torch from a local folder of wheels (the PyTorch index was not used)")
        else:
            sources += ["--extra-index-url", PYTORCH_INDEX.format(build=build)]
            described.append(PYTORCH_INDEX.format(build=build))
    with tempfile.TemporaryDirectory(prefix="sdxl-lock-") as scratch:
        source = Path(scratch) / "requirements.in"
        source.write_text(requirements)
        command = [uv, "pip", "compile", str(source), *PLATFORM, *sources, "--index-strategy", "unsafe-best-match"]
        command += ["--generate-hashes", "--no-header", "--no-annotate", "--quiet", "--no-cache"]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"uv pip compile for {build} failed:\n{done.stderr.strip()}")
    return header(build, described) + done.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s lock --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uv", default=shutil.which("uv") or "uv", help="the uv executable")
    parser.add_argument("--build", action="append", help=f"cpu, cu126, cu128, cu130 (default: {DEFAULT_BUILDS})")
    parser.add_argument("--find-links", action="append", default=[], help="a folder with torch's non-PyPI wheels")
    parser.add_argument("--check", action="store_true", help="compare with the locks on disk; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for build in args.build or DEFAULT_BUILDS:
        text = compile_lock(args.uv, build, args.find_links)
        path = lock_path(build)
        old = path.read_text() if path.is_file() else ""
        packages = sum(1 for line in text.splitlines() if PIN.match(line))
        if args.check:
            if old != text:
                stale.append(path.name)
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), path.name))
            print(f"{path.name}: {'differs' if old != text else 'up to date'} ({packages} packages)")
        else:
            path.write_text(text)
            print(f"wrote {path.name}: {packages} packages{' (unchanged)' if old == text else ''}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
