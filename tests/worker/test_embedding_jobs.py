"""Embeddings through the RunPod handler on the dev model: a job naming embeddings in its prompts changes the image,
lists each embedding (name, file, sha256) in its metadata and its PNG's A1111 parameters (``TI hashes``); a job that
names none after it, or after a refused embedding, gives a fresh worker's bytes."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from core.settings import load_settings
from model_build.dev_embedding import model_widths, write_dev_embedding

JOB = {"prompt": "a lighthouse at dawn", "height": 128, "width": 128, "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def setup(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from worker.generation.engine import Engine
    from worker.handler import Worker

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the same rounding in every job compared byte for byte
    root = tmp_path_factory.mktemp("embeddings")
    widths = model_widths(dev_model_dir)
    files = {
        "dev-style": write_dev_embedding(root / "dev-style.safetensors", widths, vectors=4, seed=1),
        "OneVec": write_dev_embedding(root / "styles" / "OneVec.safetensors", widths, vectors=1, seed=2),
    }
    write_dev_embedding(root / "old-sd15.safetensors", sd15=True)
    settings = load_settings({"EMBEDDINGS_DIR": str(root)})
    worker = Worker(settings)
    worker.engine, worker.startup_error = Engine(dev_model_dir, settings=settings), None
    state = SimpleNamespace(handle=worker.handle, files=files)
    state.fresh = pixels(state.handle({"id": "fresh", "input": JOB}))
    yield state
    torch.set_num_threads(previous)


def image(out: dict[str, Any]) -> Image.Image:
    assert "error" not in out, out
    return Image.open(io.BytesIO(base64.b64decode(out["images"][0].split(",", 1)[1])))


def pixels(out: dict[str, Any]) -> bytes:
    return image(out).convert("RGB").tobytes()


def test_a_job_naming_embeddings_lists_them_and_the_next_job_is_a_fresh_workers(setup: SimpleNamespace) -> None:
    job = {**JOB, "prompt": "a (embedding:OneVec:1.1) lighthouse at dawn", "negative_prompt": "lowres, dev-style"}
    out = setup.handle({"id": "styled", "input": job})
    assert pixels(out) != setup.fresh
    listed = {entry["name"]: entry for entry in out["metadata"]["embeddings"]}
    assert set(listed) == {"dev-style", "OneVec"}
    for name, path in setup.files.items():
        assert listed[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert listed[name]["path"] == str(path)
    parameters = image(out).info["parameters"]
    assert 'TI hashes: "' in parameters
    for name, entry in listed.items():
        assert f"{name}: {entry['sha256'][:12]}" in parameters
    again = setup.handle({"id": "styled-again", "input": job})  # loaded and cached now: the same bytes
    assert pixels(again) == pixels(out)
    plain = setup.handle({"id": "plain", "input": JOB})
    assert pixels(plain) == setup.fresh and plain["metadata"]["embeddings"] == []
    assert "TI hashes" not in image(plain).info["parameters"]


def test_a_refused_embedding_is_a_clear_error_and_the_next_job_is_a_fresh_workers(setup: SimpleNamespace) -> None:
    out = setup.handle({"id": "sd15", "input": {**JOB, "negative_prompt": "old-sd15, lowres"}})
    assert set(out) == {"error"}, out
    message = out["error"]
    assert message.startswith("embedding: negative_prompt: 'old-sd15' names the embedding "), message
    assert "an SD 1.x embedding" in message and "clip_l and clip_g" in message
    missing = setup.handle({"id": "missing", "input": {**JOB, "prompt": "embedding:nowhere lighthouse"}})
    assert missing["error"].startswith("embedding: prompt: 'embedding:nowhere': no embedding named 'nowhere'")
    assert "available: OneVec, dev-style, old-sd15" in missing["error"]
    assert pixels(setup.handle({"id": "after", "input": JOB})) == setup.fresh
