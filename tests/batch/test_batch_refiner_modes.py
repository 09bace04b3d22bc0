"""Every generation mode through the batch runner's local engine, with a refiner loaded, at --batch-size 1 and 3.

Issue 24: a line with ``image_url`` and ``"refiner": true`` failed with ``zip() argument 2 is shorter than argument 1``
whenever a call held two or more requests (every call at --batch-size >= 2, because the planner pads), and no batch
test used the refiner. Here text-to-image without the refiner, img2img on the base, the refiner at strength, the
ensemble of experts and img2img through the refiner each run as groups of three lines (one group of four, so a call
is also padded), in process on the real engine.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_testing import assert_batch_sizes_agree, run_at_batch_sizes, sidecars, write_jsonl
from PIL import Image

from batch.exit_codes import EXIT_OK

BASE = {"height": 256, "width": 256, "num_inference_steps": 2, "guidance_scale": 3.0, "negative_prompt": "blurry"}
PROMPTS = ("a lighthouse", "a [red:blue:0.5] barn", "a windmill, (dusk: 1.2)", "a [fox|owl] in a field")


def input_image() -> str:
    """A 256x256 PNG with some structure, as bare base64."""
    pixels = (np.indices((256, 256)).sum(axis=0) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels, pixels[::-1], pixels.T], axis=-1)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MODES: dict[str, dict[str, Any]] = {
    "text": {"refiner": False},
    "img2img": {"image_url": None, "strength": 0.5},
    "refine": {"refiner_inference_steps": 4, "strength": 0.5},
    "ensemble": {"refiner_inference_steps": 4, "high_noise_frac": 0.5},
    "img2img-refiner": {"image_url": None, "refiner": True, "refiner_inference_steps": 4, "strength": 0.5},
}


def lines() -> list[dict[str, Any]]:
    image = input_image()
    made = []
    for mode, fields in MODES.items():
        fields = {key: image if key == "image_url" else value for key, value in fields.items()}
        count = 4 if mode == "ensemble" else 3  # 4: a call of 3 and a padded call of 1 at --batch-size 3
        for n in range(count):
            made.append({"id": f"{mode}-{n}", "prompt": PROMPTS[n], **BASE, **fields, "seed": 100 + n})
    made[-1]["num_images"] = 2  # a request of two images in the last call of img2img through the refiner
    return made


@pytest.fixture(scope="module")
def engine(dev_model_dir: Path, dev_refiner_dir: Path):
    from worker.generation.engine import Engine

    return Engine(dev_model_dir, refiner_dir=dev_refiner_dir)


@pytest.fixture(scope="module")
def runs(engine, tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[dict[str, Any], Path]]:
    """The same lines at --batch-size 1 and 3: (summary, output folder) per batch size."""
    folder = tmp_path_factory.mktemp("refiner-modes")
    source = write_jsonl(folder / "jobs.jsonl", lines())
    return run_at_batch_sizes(engine, source, folder)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_mode_runs_without_errors(runs, batch_size: int) -> None:
    summary, out = runs[batch_size]
    expected = lines()
    assert summary.exit_code == EXIT_OK and summary.made == len(expected), summary
    assert not (out / "errors").exists() or not any((out / "errors").iterdir())
    made = sidecars(out)
    assert set(made) == {line["id"] for line in expected}
    for line in expected:
        sidecar = made[line["id"]]
        assert len(sidecar["images"]) == line.get("num_images", 1)
        for image in sidecar["images"]:
            assert Image.open(out / image["file_name"]).size == (256, 256)


def counts(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert all(len(stage["timesteps"]) == stage["model_calls"] for stage in stages)
    return [{key: stage[key] for key in ("model", "num_inference_steps", "steps", "model_calls")} for stage in stages]


def test_each_mode_reports_what_ran(runs) -> None:
    made = sidecars(runs[3][1])
    text, img2img = made["text-0"]["metadata"], made["img2img-0"]["metadata"]
    assert text["refiner"]["used"] is False and counts(text["stages"]) == [
        {"model": "base", "num_inference_steps": 2, "steps": 2, "model_calls": 2}
    ]
    assert img2img["img2img"] == {
        "strength": 0.5,
        "input_size": [256, 256],
        "model": "base",
        "num_inference_steps": 2,
        "steps": 1,
    }
    refine, ensemble = made["refine-0"]["metadata"], made["ensemble-0"]["metadata"]
    assert refine["refiner"]["mode"] == "refine" and refine["refiner"]["steps"] == 2  # int(4 x 0.5)
    assert ensemble["refiner"]["mode"] == "ensemble" and [s["model"] for s in ensemble["stages"]] == ["base", "refiner"]
    through = made["img2img-refiner-2"]["metadata"]
    assert through["img2img"]["model"] == "refiner" and through["refiner"]["mode"] == "img2img"
    assert counts(through["stages"]) == [{"model": "refiner", "num_inference_steps": 4, "steps": 2, "model_calls": 2}]
    # The edited prompt's schedule goes on through both stages of the ensemble.
    calls = made["ensemble-1"]["metadata"]["prompt"]["schedule"]["calls"]
    assert [stage["model"] for stage in calls] == ["base", "refiner"]


def test_batch_size_1_and_3_give_the_same_images(runs) -> None:
    """The same lines give the same sidecars and images at either batch size, up to the README's 1/255 on a few CPU
    pixels (batched kernels round differently; measured: under 0.04 % of the values, one level each)."""
    assert_batch_sizes_agree(runs[1][1], runs[3][1], 3, max_changed=0.001)
