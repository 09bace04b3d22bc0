"""Helpers for the batch tests that run real ``python -m batch`` processes on the dev model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# One thread per process: on CPU the thread count changes float rounding (1/255 pixel differences seen on the
# dev model), and every run that is compared byte for byte must use the same; two runners also share 2 cores.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
SMALL = {"height": 256, "width": 256, "num_inference_steps": 1, "guidance_scale": 1.0}
COLOURS = ("red", "green", "blue", "yellow", "white")


def fifty_lines() -> list[dict[str, Any]]:
    """50 small requests that exercise ids, seeds, several images, formats, groups and a per-call-noise scheduler."""
    lines = []
    for n in range(50):
        line: dict[str, Any] = {"prompt": f"test image {n}: a small {COLOURS[n % 5]} house", **SMALL}
        if n % 5 == 1:
            line["id"] = f"item-{n:02d}"
        if n % 3 == 0:
            line["seed"] = 1000 + n
        if n % 7 == 2:
            line["num_images"] = 2
        if n % 11 == 4:
            line["scheduler"] = "Euler a"
        lines.append(line)
    lines[8]["output_format"] = "jpeg"
    lines[10].update(output_format="webp", quality=80)
    lines[12]["negative_prompt"] = "blurry, low quality"
    lines[13]["prompt"] = " ".join(["a very long prompt about a house"] * 14)  # > 75 tokens: 2 chunks
    lines[14].update(scheduler="DPM++ SDE", num_images=2, num_inference_steps=2)  # never grouped
    lines[15]["guidance_scale"] = 3.0  # classifier-free guidance: another group
    return lines


def write_jsonl(path: Path, lines: list[dict[str, Any] | str | bytes | None]) -> Path:
    """None writes a blank line (it keeps the numbering of the lines after it)."""
    chunks = []
    for line in lines:
        if line is None:
            chunks.append(b"\n")
        elif isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode())
        else:
            chunks.append(json.dumps(line).encode() + b"\n")
    path.write_bytes(b"".join(chunks))
    return path


def batch_command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "batch", *(str(arg) for arg in args)]


def spawn(*args: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        batch_command(*args),
        cwd=ROOT,
        env={**os.environ, **ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, dict[str, Any] | None, str]:
    """(exit code, the run's summary from its last stdout line, stderr)."""
    out, err = process.communicate(timeout=timeout)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    summary = json.loads(last) if last.startswith("{") else None
    return process.returncode, summary, err


def run(*args: Any, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, dict[str, Any] | None, str]:
    return finish(spawn(*args, env=env), timeout)


STABLE_SIDECAR_KEYS = ("format", "id", "line", "status", "request", "seed", "seed_source", "images", "metadata")


def stable(sidecar: dict[str, Any]) -> dict[str, Any]:
    """Everything but ``generation`` (timings, host, pid, batch size): what must not depend on how it ran."""
    return {key: sidecar[key] for key in STABLE_SIDECAR_KEYS}


def assert_batch_sizes_agree(single: Path, batched: Path, batch_size: int, max_changed: float) -> None:
    """The same lines made at ``--batch-size 1`` (into ``single``) and at ``batch_size`` (``batched``) agree: every
    stable sidecar field but the image hashes, and every pixel up to the README's 1/255, on at most ``max_changed`` of
    the pixels (batched kernels round differently on the CPU). First, each call of the batched run really held
    ``batch_size`` images: a run silently at batch 1 (the options' batch size passed as the model folder, once) would
    make this comparison vacuous."""
    import numpy as np
    from PIL import Image

    small, large = sidecars(single), sidecars(batched)
    assert set(small) == set(large)
    assert {item["generation"]["batch"]["images_in_call"] for item in small.values()} == {1}
    assert {item["generation"]["batch"]["images_in_call"] for item in large.values()} == {batch_size}
    for item_id, sidecar in small.items():
        other = large[item_id]
        files = [(image["file_name"], image["seed"]) for image in sidecar["images"]]
        assert files == [(image["file_name"], image["seed"]) for image in other["images"]], item_id
        assert {**stable(sidecar), "images": None} == {**stable(other), "images": None}, item_id
        for name, _ in files:
            one = np.asarray(Image.open(single / name)).astype(int)
            many = np.asarray(Image.open(batched / name)).astype(int)
            changed = float((one != many).mean())
            assert np.abs(one - many).max() <= 1 and changed <= max_changed, (item_id, changed)


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def sidecars(out: Path) -> dict[str, dict[str, Any]]:
    return {path.stem: read_json(path) for path in out.glob("*.json")}


def image_files(out: Path) -> dict[str, bytes]:
    return {f"images/{path.name}": path.read_bytes() for path in (out / "images").iterdir()}


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leftovers(out: Path) -> list[str]:
    """Temporary files and claims a finished run must not leave behind."""
    return sorted(p.name for folder in ("tmp", "claims") for p in (out / "_batch" / folder).iterdir())


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` refuses new entries while inside: permission bits, or for root (which writes through them) the
    immutable attribute."""
    import pytest

    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a folder read-only for this process")
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"running as root, and this filesystem has no immutable attribute: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """In-process runs compared byte for byte with subprocess runs must use their thread count too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_at_batch_sizes(
    engine: Any, source: Path, folder: Path, batch_sizes: tuple[int, ...] = (1, 3)
) -> dict[int, tuple[Any, Path]]:
    """``source`` run in-process by ``engine`` once per ``--batch-size``: (summary, output folder) per batch size,
    the outputs under ``folder``/out-N."""
    from batch.execute import run_shard
    from batch.options import LocalEngineOptions, RunOptions

    made = {}
    for batch_size in batch_sizes:
        out = folder / f"out-{batch_size}"
        with one_torch_thread():
            summary = run_shard(
                RunOptions(source, out, progress=False), LocalEngineOptions(batch_size=batch_size, engine=engine)
            )
        made[batch_size] = (summary, out)
    return made
