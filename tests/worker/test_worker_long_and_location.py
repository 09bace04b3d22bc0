"""A 1,000-token prompt through the handler and the batch runner (model location: test_model_location.py)."""

from __future__ import annotations

import json
from pathlib import Path

from batch.cli import main as batch_main
from core.settings import load_settings
from worker.handler import Worker

SENTENCE = "a castle on a hill, golden light over the valley, (tall towers:1.2), [mist], river and bridges"
WORDS = SENTENCE.split(" ")


def long_prompt(words: int = 1000) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def test_thousand_token_prompt_in_the_handler(dev_model_dir: Path) -> None:
    worker = Worker(load_settings({}))
    worker.start(dev_model_dir)
    assert worker.startup_error is None
    handler = worker.handle
    payload = {"prompt": long_prompt(), "width": 256, "height": 256, "num_inference_steps": 2, "seed": 4}
    out = handler({"id": "long", "input": payload})
    assert "error" not in out, out
    positive = out["metadata"]["prompt"]["positive"]
    assert out["metadata"]["prompt"]["num_chunks"] >= 13
    assert all(encoder["tokens"] >= 1000 for encoder in positive.values()), positive
    assert out["metadata"]["prompt"]["weighted"], "the (tall towers:1.2) and [mist] weights are reported"
    assert handler({"id": "long-again", "input": payload})["images"] == out["images"]


def test_thousand_token_prompt_in_the_batch_runner(dev_model_dir: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    line = {"id": "long", "prompt": long_prompt(), "width": 256, "height": 256, "num_inference_steps": 2}
    jobs.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out"
    assert batch_main(["run", str(jobs), "--out", str(out), "--model", str(dev_model_dir), "--no-progress"]) == 0
    sidecar = json.loads((out / "long.json").read_text())
    assert (out / "images" / "long-0.png").stat().st_size > 0
    assert sidecar["id"] == "long" and sidecar["request"]["prompt"] == line["prompt"]
    assert sidecar["metadata"]["prompt"]["num_chunks"] >= 13
