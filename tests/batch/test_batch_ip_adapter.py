"""IP-Adapter lines through the batch runner's local engine, at --batch-size 1 and 3.

Lines with the same image prompts share a call (the image embeddings repeated for every image of it); a line naming
an IP-Adapter that does not exist gets an error sidecar and the others are made; a line at scale 0 is the plain
line's image; both batch sizes give the same images.
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
PLAIN, PLUS = "ip-adapter_dev", "ip-adapter-plus_dev_vit-h"


def reference_image() -> str:
    """A 100x80 picture (not the encoders' square input: resized and cropped as CLIP's processor does)."""
    pixels = np.random.default_rng(5).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def lines() -> list[dict[str, Any]]:
    plus = {"name": PLUS, "image": reference_image(), "scale": 0.8}
    made = [
        {"id": f"plus-{n}", "prompt": f"a harbour, view {n}", **BASE, "seed": n, "ip_adapters": [plus]}
        for n in range(3)
    ]
    made[1]["num_images"] = 2
    made.append({"id": "plain", "prompt": "a harbour", **BASE, "seed": 9})
    made.append({"id": "silent", "prompt": "a harbour", **BASE, "seed": 9, "ip_adapters": [{**plus, "scale": 0}]})
    made.append(
        {"id": "both", "prompt": "a harbour", **BASE, "seed": 9, "ip_adapters": [plus, {**plus, "name": PLAIN}]}
    )
    made.append({"id": "missing", "prompt": "a harbour", **BASE, "ip_adapters": [{**plus, "name": "nowhere"}]})
    return made


@pytest.fixture(scope="module")
def runs(dev_model_dir: Path, dev_ip_adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from worker.generation.engine import Engine

    engine = Engine(dev_model_dir, settings=load_settings({"IP_ADAPTER_DIR": str(dev_ip_adapter_root)}))
    folder = tmp_path_factory.mktemp("batch-ip-adapter")
    source = write_jsonl(folder / "jobs.jsonl", lines())
    made = {}
    for batch_size, (summary, out) in run_at_batch_sizes(engine, source, folder).items():
        assert summary.made == 6 and summary.failed == 1, summary
        made[batch_size] = out
    return made


def _pixels(out: Path, item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(out / item["images"][0]["file_name"]))


def test_ip_adapter_lines_are_made_and_report_their_adapters(runs) -> None:
    made = sidecars(runs[3])
    assert set(made) == {"plus-0", "plus-1", "plus-2", "plain", "silent", "both"}
    entry = made["plus-1"]["metadata"]["ip_adapters"][0]
    assert (entry["name"], entry["kind"], entry["scale"], entry["input_size"]) == (PLUS, "plus", 0.8, [100, 80])
    assert entry["image_encoder"] == "models/image_encoder" and entry["applied_to"] == "base"
    assert len(made["plus-1"]["images"]) == 2 and made["plain"]["metadata"]["ip_adapters"] == []
    assert [e["name"] for e in made["both"]["metadata"]["ip_adapters"]] == [PLUS, PLAIN]
    error = read_json(runs[3] / "errors" / "line-00000007.json")
    assert "ip_adapters[0].name: no IP-Adapter named 'nowhere'" in error["error"] and PLUS in error["error"]


def test_scale_zero_is_the_plain_line_and_an_adapter_steers(runs) -> None:
    made = sidecars(runs[1])
    plain, silent, both = (_pixels(runs[1], made[name]) for name in ("plain", "silent", "both"))
    assert np.array_equal(plain, silent)
    assert np.abs(plain.astype(int) - both.astype(int)).max() > 32


def test_batch_size_1_and_3_give_the_same_images(runs) -> None:
    """Each line's images do not depend on its batch mates: the same at either batch size, up to the README's 1/255 on
    a few CPU pixels (batched kernels round differently)."""
    assert_batch_sizes_agree(runs[1], runs[3], 3, max_changed=0.001)
