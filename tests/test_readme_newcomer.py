"""The README's newcomer path, run as written: the fenced bash blocks between ``<!-- newcomer:start -->`` and
``<!-- newcomer:end -->`` (a model, a job, the server and a curl request, a LoRA job, a batch and its gallery).

Each block runs in bash, in order, in a fresh folder holding the files the commands name (``test_input.json`` shrunk
in size and steps for the CPU, as the drop-in tests shrink the official payloads; ``batch/examples/demo.jsonl``), with
``python`` this test environment's interpreter and the code on PYTHONPATH. A block after ``<!-- newcomer:background
-->`` is a server: it is started, waited for, and stopped at the end. The one rewrite is the server's port (8000 may
be taken, by a parallel test or a user's server), to a free one. When a README command stops working, this fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START, END, BACKGROUND = "<!-- newcomer:start -->", "<!-- newcomer:end -->", "<!-- newcomer:background -->"
FENCE = re.compile(r"(<!-- newcomer:background -->\s*)?```bash\n(.*?)```", re.S)


def newcomer_blocks(readme: str) -> list[tuple[bool, str]]:
    """(runs in the background, the block's text) for each bash block between the markers, in order."""
    assert readme.count(START) == 1 and readme.count(END) == 1, "the newcomer markers are missing from README.md"
    section = readme[readme.index(START) : readme.index(END)]
    blocks = [(bool(match.group(1)), match.group(2)) for match in FENCE.finditer(section)]
    assert blocks, "no bash block between the newcomer markers"
    return blocks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the README's server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the README's server did not listen on {port} within {timeout} s:\n{log.read_text()[-3000:]}")


def test_the_readme_newcomer_commands_work_as_written(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's server request cannot be run")
    blocks = newcomer_blocks((ROOT / "README.md").read_text())
    work = tmp_path / "checkout"
    (work / "batch" / "examples").mkdir(parents=True)
    demo_lines = [json.loads(line) for line in (ROOT / "batch" / "examples" / "demo.jsonl").read_text().splitlines()]
    for line in demo_lines:
        line["num_inference_steps"] = 2  # every other field kept: ids, sizes, schedulers, formats
    (work / "batch" / "examples" / "demo.jsonl").write_text("".join(json.dumps(line) + "\n" for line in demo_lines))
    job = json.loads((ROOT / "test_input.json").read_text())
    job["input"].update(width=256, height=256, num_inference_steps=4)  # every field kept, smaller for the CPU
    (work / "test_input.json").write_text(json.dumps(job, indent=2))
    # `python` in the blocks is this environment's interpreter: a script, not a symlink (a symlinked venv python
    # outside its venv would not find the venv's packages).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPOD_", "MODEL_", "LORA_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    servers: list[tuple[subprocess.Popen, Path]] = []
    outputs: list[str] = []
    started = time.monotonic()
    try:
        for background, text in blocks:
            script = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
                "--rp_api_port 8000", f"--rp_api_port {port}"
            )
            if background:
                log = tmp_path / f"server-{len(servers)}.log"
                with open(log, "wb") as handle:
                    server = subprocess.Popen(
                        ["bash", "-eu", "-c", script],
                        cwd=work,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: stopped as a whole below
                    )
                servers.append((server, log))
                wait_for_port(port, server, log)
                print(f"{time.monotonic() - started:.1f} s: server listening")
                continue
            done = subprocess.run(
                ["bash", "-eu", "-c", script],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"README block failed ({done.returncode}):\n{script}\n{done.stderr[-4000:]}"
            print(f"{time.monotonic() - started:.1f} s: block {len(outputs)} done")
            outputs.append(done.stdout)
    finally:
        for server, _ in servers:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already (a failed start)
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()

    # What each step must have left: the model, the job's image, the LoRA, the server's answers, the batch, the page.
    assert json.loads((work / "models" / "sdxl-dev" / "manifest.json").read_text())
    assert list((work / "outputs" / "one").glob("*.png"))
    assert (work / "loras" / "dev-style.safetensors").stat().st_size > 0
    served = outputs[-1]
    assert '"status": "COMPLETED"' in served or '"status":"COMPLETED"' in served, served[:2000]
    assert "'name': 'dev-style'" in served and "'active': True" in served, served[:2000]
    assert len(list((work / "outputs" / "first").glob("*.json"))) == 4  # demo.jsonl's four items, done
    page = (work / "outputs" / "first" / "index.html").read_text()
    assert "gallery-data" in page and len(list((work / "outputs" / "first" / "_gallery" / "thumbs").iterdir())) == 5
