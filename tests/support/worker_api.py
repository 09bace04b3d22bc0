"""The worker's local RunPod API server (``python -m worker --rp_serve_api``) as a test process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serve_worker_api(model_dir: Path, log_path: Path) -> Iterator[str]:
    """Start the server on a free loopback port and yield its base URL at once, before it listens.

    A client must retry until it answers (the batch runner's remote mode is tested on exactly that). One torch
    thread, as every byte-for-byte comparison in the tests uses. The process is stopped on exit.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}  # no progress posts
    env.update(
        MODEL_DIR=str(model_dir),
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        UVICORN_LOG_LEVEL="warning",
    )
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "worker", "--rp_serve_api", "--rp_api_host", "127.0.0.1"]
        process = subprocess.Popen(
            [*command, "--rp_api_port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
