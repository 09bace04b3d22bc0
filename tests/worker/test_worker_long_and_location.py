"""A 1,000-token prompt through the handler and the batch runner; model location and first-start conversion."""

from __future__ import annotations

import json
from pathlib import Path

from batch.cli import main as batch_main
from model_build.manifest import verify
from worker.handler import STATE, handler, start_engine
from worker.model_location import prepare_model_dir, resolve_model_dir

SENTENCE = "a castle on a hill, golden light over the valley, (tall towers:1.2), [mist], river and bridges"
WORDS = SENTENCE.split(" ")


def long_prompt(words: int = 1000) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def test_thousand_token_prompt_in_the_handler(dev_model_dir: Path) -> None:
    start_engine(dev_model_dir)
    assert STATE.startup_error is None
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


def test_model_dir_defaults(tmp_path: Path) -> None:
    assert resolve_model_dir({"MODEL_DIR": str(tmp_path / "m")}) == tmp_path / "m"
    assert resolve_model_dir({"MODEL_NAME": "base"}) in (Path("/runpod-volume/models/base"), Path("/models/base"))
    assert resolve_model_dir({"CHECKPOINT_PATH": "/runpod-volume/ckpt/my-model.safetensors"}) == Path(
        "/runpod-volume/models/my-model"
    )


def test_checkpoint_on_the_volume_is_converted_on_first_start_once(dev_checkpoint: Path, tmp_path: Path) -> None:
    env = {"CHECKPOINT_PATH": str(dev_checkpoint), "MODEL_DIR": str(tmp_path / "models" / "dev")}
    model_dir = prepare_model_dir(env)
    manifest = verify(model_dir, full=True)
    assert model_dir == tmp_path / "models" / "dev" and manifest["dev_model"]
    before = (model_dir / "manifest.json").stat().st_mtime_ns
    assert prepare_model_dir(env) == model_dir  # the second start finds it done
    assert (model_dir / "manifest.json").stat().st_mtime_ns == before
