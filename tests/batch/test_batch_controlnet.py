"""ControlNet lines through the batch runner's local engine, at --batch-size 1 and 3.

Lines with the same ControlNets share a call (the control image repeated for every image of it); a line naming a
ControlNet that does not exist gets an error sidecar and the others are made; both batch sizes give the same images.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_testing import assert_batch_sizes_agree, read_json, run_at_batch_sizes, sidecars, write_jsonl
from PIL import Image

from core.settings import load_settings

BASE = {"height": 128, "width": 128, "num_inference_steps": 2, "guidance_scale": 3.0}


def control_image() -> str:
    """A 96x128 PNG with edges (another size than the output: fitted as sd-webui-controlnet does)."""
    pixels = np.zeros((128, 96), dtype=np.uint8)
    pixels[20:70, 10:60] = 255
    pixels[80:120, 40:90] = 128
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def lines() -> list[dict[str, Any]]:
    canny = {"name": "dev-controlnet", "image": control_image(), "preprocessor": "canny"}
    made = [
        {"id": f"canny-{n}", "prompt": f"a harbour, view {n}", **BASE, "seed": n, "controlnets": [canny]}
        for n in range(3)
    ]
    made[1]["num_images"] = 2
    made.append({"id": "plain", "prompt": "a harbour", **BASE, "seed": 9})
    made.append(
        {"id": "weak", "prompt": "a harbour", **BASE, "seed": 9, "controlnets": [{**canny, "conditioning_scale": 0.3}]}
    )
    made.append({"id": "missing", "prompt": "a harbour", **BASE, "controlnets": [{**canny, "name": "nowhere"}]})
    return made


@pytest.fixture(scope="module")
def runs(dev_model_dir: Path, dev_controlnet_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from worker.generation.engine import Engine

    engine = Engine(dev_model_dir, settings=load_settings({"CONTROLNET_DIR": str(dev_controlnet_root)}))
    folder = tmp_path_factory.mktemp("batch-controlnet")
    source = write_jsonl(folder / "jobs.jsonl", lines())
    made = {}
    for batch_size, (summary, out) in run_at_batch_sizes(engine, source, folder).items():
        assert summary.made == 5 and summary.failed == 1, summary
        made[batch_size] = out
    return made


def test_controlnet_lines_are_made_and_report_their_controlnets(runs) -> None:
    made = sidecars(runs[3])
    assert set(made) == {"canny-0", "canny-1", "canny-2", "plain", "weak"}
    entry = made["canny-1"]["metadata"]["controlnets"][0]
    assert entry["name"] == "dev-controlnet" and entry["preprocessor"] == "canny"
    assert entry["input_size"] == [96, 128] and entry["control_size"] == [128, 128] and "note" in entry
    assert len(made["canny-1"]["images"]) == 2 and made["plain"]["metadata"]["controlnets"] == []
    assert made["weak"]["metadata"]["controlnets"][0]["conditioning_scale"] == 0.3
    error = read_json(runs[3] / "errors" / "line-00000006.json")
    assert "controlnets[0].name: no ControlNet named 'nowhere'" in error["error"]


def test_batch_size_1_and_3_give_the_same_images(runs) -> None:
    """Each line's images do not depend on its batch mates: the same at either batch size, up to the README's 1/255 on
    a few CPU pixels (batched kernels round differently)."""
    assert_batch_sizes_agree(runs[1], runs[3], 3, max_changed=0.001)
