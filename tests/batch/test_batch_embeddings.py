"""Lines naming embeddings through the batch runner's local engine, at --batch-size 1 and 3.

Lines with and without embeddings share calls (their prompts differ, their shapes do not); each line's metadata
lists its own embeddings; a line naming an SD 1.x embedding gets an error sidecar and the others are made; both
batch sizes give the same images, and the plain line gives the image a fresh engine makes for it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from batch_testing import (
    assert_batch_sizes_agree,
    one_torch_thread,
    read_json,
    run_at_batch_sizes,
    sidecars,
    write_jsonl,
)

from batch.execute import run_shard
from batch.options import LocalEngineOptions, RunOptions
from core.settings import load_settings
from model_build.dev_embedding import model_widths, write_dev_embedding

BASE = {"height": 128, "width": 128, "num_inference_steps": 2, "guidance_scale": 3.0}


def lines() -> list[dict[str, Any]]:
    return [
        {"id": "styled-0", "prompt": "a harbour, dev-style", **BASE, "seed": 1},
        {"id": "styled-1", "prompt": "a harbour", "negative_prompt": "(onevec:1.2)", **BASE, "seed": 2},
        {"id": "plain", "prompt": "a harbour", **BASE, "seed": 3},
        {"id": "both", "prompt": "embedding:dev-style harbour", "negative_prompt": "OneVec", **BASE, "seed": 4},
        {"id": "sd15", "prompt": "a harbour", "negative_prompt": "old-sd15", **BASE, "seed": 5},
        {"id": "styled-2", "prompt": "a harbour at night, DEV-STYLE", **BASE, "seed": 6},
        {"id": "plain-2", "prompt": "a harbour at night", **BASE, "seed": 7},
    ]


@pytest.fixture(scope="module")
def runs(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Path]:
    from worker.generation.engine import Engine

    root = tmp_path_factory.mktemp("embeddings")
    widths = model_widths(dev_model_dir)
    write_dev_embedding(root / "dev-style.safetensors", widths, vectors=4, seed=1)
    write_dev_embedding(root / "OneVec.safetensors", widths, vectors=1, seed=2)
    write_dev_embedding(root / "old-sd15.safetensors", sd15=True)
    settings = load_settings({"EMBEDDINGS_DIR": str(root)})
    engine = Engine(dev_model_dir, settings=settings)
    folder = tmp_path_factory.mktemp("batch-embeddings")
    source = write_jsonl(folder / "jobs.jsonl", lines())
    made = {}
    for batch_size, (summary, out) in run_at_batch_sizes(engine, source, folder).items():
        assert summary.made == 6 and summary.failed == 1, summary
        made[batch_size] = out
    # The plain line alone, on an engine that never loaded an embedding.
    out = folder / "fresh"
    with one_torch_thread():
        run_shard(
            RunOptions(write_jsonl(folder / "plain.jsonl", [lines()[2]]), out, progress=False),
            LocalEngineOptions(batch_size=1, engine=Engine(dev_model_dir, settings=settings)),
        )
    made["fresh"] = out
    return made


def test_each_line_lists_its_own_embeddings(runs) -> None:
    made = sidecars(runs[3])
    names = {key: [entry["name"] for entry in made[key]["metadata"]["embeddings"]] for key in made}
    assert names == {
        "styled-0": ["dev-style"],
        "styled-1": ["OneVec"],
        "plain": [],
        "both": ["dev-style", "OneVec"],
        "styled-2": ["dev-style"],
        "plain-2": [],
    }
    error = read_json(runs[3] / "errors" / "line-00000005.json")
    assert "embedding: negative_prompt: 'old-sd15' names the embedding" in error["error"]
    assert "an SD 1.x embedding" in error["error"]


def test_batch_size_1_and_3_give_the_same_images_and_a_plain_line_a_fresh_engines(runs) -> None:
    assert_batch_sizes_agree(runs[1], runs[3], 3, max_changed=0.001)
    (fresh,) = sidecars(runs["fresh"]).values()
    (name,) = [image["file_name"] for image in fresh["images"]]
    assert (runs["fresh"] / name).read_bytes() == (runs[1] / name).read_bytes()
