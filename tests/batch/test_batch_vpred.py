"""A v-prediction model (the dev v-pred checkpoint, converted) through the batch runner's local engine: lines with
different samplers run on the folder's v_prediction / zero-terminal-SNR config, which each sidecar records; a
sampler that cannot run it is an error record, the others still succeed; an image file equals the handler's
PNG for the same request, byte for byte (the batch runner and the worker share the engine)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from batch_testing import one_torch_thread, read_json, sidecars, write_jsonl
from PIL import Image

from batch.execute import run_shard
from batch.exit_codes import EXIT_INVALID_LINES
from batch.options import LocalEngineOptions, RunOptions

BASE = {"prompt": "a lighthouse at dawn", "negative_prompt": "fog", "width": 64, "height": 64, "seed": 11}
LINES: dict[str, dict[str, Any]] = {
    "ddim": {"scheduler": "DDIM", "num_inference_steps": 2},  # the official default: the folder's own config
    "euler-a": {"sampler_name": "Euler a", "num_inference_steps": 2},
    "dpm-sgm-rescale": {
        "sampler_name": "DPM++ 2M",
        "scheduler": "SGM Uniform",
        "guidance_rescale": 0.7,
        "num_inference_steps": 3,
        "seed": 12,
    },
    "heun": {"sampler_name": "Heun", "num_inference_steps": 2},  # no rescale_betas_zero_snr: refused by name
}


@pytest.fixture(scope="module")
def worker(dev_vpred_model_dir: Path) -> Any:
    from core.settings import load_settings
    from worker.handler import Worker

    with one_torch_thread():
        made = Worker(load_settings({}))
        made.start(dev_vpred_model_dir)
    assert made.startup_error is None, made.startup_error
    return made


@pytest.fixture(scope="module")
def run(worker: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("vpred")
    source = write_jsonl(folder / "jobs.jsonl", [{"id": name, **BASE, **fields} for name, fields in LINES.items()])
    out = folder / "out"
    with one_torch_thread():
        summary = run_shard(
            RunOptions(source, out, progress=False), LocalEngineOptions(batch_size=1, engine=worker.engine)
        )
    return summary, out


def test_each_sampler_runs_the_v_prediction_config_and_a_refused_one_fails_alone(run) -> None:
    summary, out = run
    assert (summary.made, summary.failed, summary.invalid_lines, summary.exit_code) == (3, 1, 0, EXIT_INVALID_LINES)
    made = sidecars(out)
    assert set(made) == {"ddim", "euler-a", "dpm-sgm-rescale"}
    for item_id, sidecar in made.items():
        sampling = sidecar["metadata"]["sampling"]
        assert sampling["prediction_type"] == "v_prediction", item_id
        assert sampling["rescale_betas_zero_snr"] is True, item_id
        assert sidecar["metadata"]["stages"][0]["timesteps"][0] == 999, item_id  # zero terminal SNR: from the end
    assert [made[name]["metadata"]["sampling"]["sampler"] for name in ("euler-a", "dpm-sgm-rescale")] == [
        "Euler a",
        "DPM++ 2M",
    ]
    assert made["dpm-sgm-rescale"]["metadata"]["sampling"]["spacing"] == "trailing"
    (error,) = [read_json(path) for path in (out / "errors").glob("*.json")]
    assert error["id"] == "heun"
    assert error["error"].startswith("invalid input: sampler_name: sampler 'Heun' cannot run this model")
    assert "rescale_betas_zero_snr" in error["error"]


@pytest.mark.parametrize("item_id", ["euler-a", "dpm-sgm-rescale"])
def test_a_line_gives_the_handlers_image_for_the_same_request(worker: Any, run, item_id: str) -> None:
    _, out = run
    (image,) = sidecars(out)[item_id]["images"]
    with one_torch_thread():
        handled = worker.handle({"id": item_id, "input": {**BASE, **LINES[item_id]}})
    assert "error" not in handled, handled
    assert handled["metadata"]["sampling"]["prediction_type"] == "v_prediction"
    png = base64.b64decode(handled["images"][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    # The same PNG file, parameters text included: the batch and the worker share the engine and the image encoder.
    assert (out / image["file_name"]).read_bytes() == png
