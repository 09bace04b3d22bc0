"""A LoRA by URL through the handler and the batch runner, on the dev model: the image equals, byte for byte, the one
made with the same file from LORA_DIR; refusals are clear; the next job equals a fresh worker's.

The file is served by a real HTTP server on 127.0.0.1 (ALLOW_PRIVATE_URLS=1 lets the worker reach it; the default's
refusal is tested in test_lora_url_downloads.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from core.settings import load_settings
from tests.support.file_server import FileServer, Served

JOB = {"prompt": "a lighthouse at dawn", "height": 128, "width": 128, "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def setup(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from model_build.dev_lora import random_lora, save_diffusers_lora
    from worker.generation.engine import Engine
    from worker.handler import Worker

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the same rounding in every job compared byte for byte (and fast on a busy machine)
    root = tmp_path_factory.mktemp("lora-urls")
    settings = load_settings(
        {
            "LORA_DIR": str(root / "loras"),
            "ALLOW_LORA_DOWNLOAD": "1",
            "ALLOW_PRIVATE_URLS": "1",
            "LORA_DOWNLOAD_DIR": str(root / "downloads"),
        }
    )
    engine = Engine(dev_model_dir, settings=settings)
    worker = Worker(settings)
    worker.engine, worker.startup_error = engine, None
    state = SimpleNamespace(root=root, engine=engine, handle=worker.handle)
    state.fresh = pixels(state.handle({"id": "fresh", "input": JOB}))
    path = save_diffusers_lora(random_lora(engine.pipe, seed=5), root / "loras" / "dev-style.safetensors")
    state.data = path.read_bytes()
    state.sha256 = hashlib.sha256(state.data).hexdigest()
    state.server = FileServer()
    state.server.files["/files/dev-style.safetensors"] = Served(state.data)
    state.url = state.server.url("/files/dev-style.safetensors?token=SECRET")
    state.local = pixels(
        state.handle({"id": "local", "input": {**JOB, "loras": [{"name": "dev-style", "scale": 0.8}]}})
    )
    yield state
    state.server.close()
    torch.set_num_threads(previous)


def pixels(out: dict[str, Any]) -> bytes:
    assert "error" not in out, out
    png = base64.b64decode(out["images"][0].split(",", 1)[1])
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_a_url_lora_gives_the_local_files_image_byte_for_byte(setup: SimpleNamespace) -> None:
    assert setup.local != setup.fresh  # the LoRA does something
    lora = {"name": setup.url, "scale": 0.8, "sha256": setup.sha256}
    out = setup.handle({"id": "url", "input": {**JOB, "loras": [lora]}})
    assert pixels(out) == setup.local
    (entry,) = out["metadata"]["loras"]
    shown = setup.server.url("/files/dev-style.safetensors?...")
    assert entry["name"] == entry["url"] == shown and entry["sha256"] == setup.sha256[:12]
    assert "SECRET" not in json.dumps(out["metadata"])
    cached = setup.root / "downloads" / "sha256" / f"{setup.sha256}.safetensors"
    assert cached.read_bytes() == setup.data
    # Again, by another URL of the same file: from the cache, no request.
    requests = len(setup.server.requests)
    other = {**lora, "name": setup.server.url("/mirror/style.safetensors", host="localhost")}
    assert pixels(setup.handle({"id": "again", "input": {**JOB, "loras": [other]}})) == setup.local
    assert len(setup.server.requests) == requests


def test_refusals_name_the_field_and_the_next_job_is_a_fresh_workers(setup: SimpleNamespace) -> None:
    def error(lora: dict[str, Any]) -> str:
        out = setup.handle({"id": "bad", "input": {**JOB, "loras": [{"scale": 0.8, **lora}]}})
        assert set(out) == {"error"}, out
        return out["error"]

    missing = error({"name": setup.server.url("/files/dev-style.safetensors")})
    assert missing.startswith("lora: loras[0].sha256: required for a LoRA by URL: 127.0.0.1 is not a host")
    assert "LORA_URL_HOSTS" in missing
    wrong = "0" * 64
    mismatch = error({"name": setup.server.url("/files/dev-style.safetensors?v=2"), "sha256": wrong})
    assert mismatch.startswith("lora: loras[0].sha256: the file at ")
    assert f"has sha256 {setup.sha256}, not {wrong}" in mismatch
    malformed = error({"name": setup.url, "sha256": "abc"})
    assert malformed.startswith("invalid input: loras.0.sha256: 'abc' is not a sha256 (64 hex digits")
    local_pin = error({"name": "dev-style", "sha256": setup.sha256})
    assert "sha256: pins a LoRA given by http(s) URL" in local_pin
    assert pixels(setup.handle({"id": "after", "input": JOB})) == setup.fresh


def test_the_batch_runner_makes_the_same_images(setup: SimpleNamespace, tmp_path: Path) -> None:
    from batch.execute import run_shard
    from batch.options import LocalEngineOptions, RunOptions

    url_lora = {"name": setup.url, "scale": 0.8, "sha256": setup.sha256}
    lines = [
        {"id": "by-url", **JOB, "loras": [url_lora]},
        {"id": "by-name", **JOB, "loras": [{"name": "dev-style", "scale": 0.8}]},
        {"id": "unpinned", **JOB, "loras": [{"name": setup.url, "scale": 0.8}]},
    ]
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    summary = run_shard(
        RunOptions(source, out, progress=False), LocalEngineOptions(encode_workers=0, engine=setup.engine)
    )
    assert (summary.made, summary.failed) == (2, 1), summary
    made = {}
    for item in ("by-url", "by-name"):
        sidecar = json.loads((out / f"{item}.json").read_bytes())
        made[item] = Image.open(out / sidecar["images"][0]["file_name"]).convert("RGB").tobytes()
    assert made["by-url"] == made["by-name"] == setup.local
    errors = [json.loads(path.read_bytes())["error"] for path in (out / "errors").glob("*.json")]
    assert len(errors) == 1 and errors[0].startswith("lora: loras[0].sha256: required for a LoRA by URL")
