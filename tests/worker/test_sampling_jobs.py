"""Sampler + schedule type, few-step and v-prediction jobs on the dev model: through the handler and the batch
runner, what the metadata says ran, refusals, and the next job equal to a fresh worker's."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from batch.execute import run_shard
from batch.options import LocalEngineOptions, RunOptions
from core.errors import InvalidRequest
from core.settings import load_settings
from tests.batch.batch_testing import one_torch_thread, read_json, sidecars, write_jsonl
from worker.handler import Worker
from worker.output.images import read_parameters
from worker.request.schema import parse_request

SMALL = {"prompt": "a lighthouse at dawn", "negative_prompt": "fog", "width": 64, "height": 64, "seed": 11}
PLAIN = {**SMALL, "num_inference_steps": 2}
LIGHTNING = {"sampler_name": "Euler", "scheduler": "SGM Uniform", "num_inference_steps": 4, "guidance_scale": 0}
# One job per new mode (guidance on where the mode allows it, so the negative prompt and rescale take part).
MODES: dict[str, dict[str, Any]] = {
    "lightning": LIGHTNING,
    "a1111 automatic": {"sampler_name": "DPM++ 2M", "num_inference_steps": 3},
    "karras combined": {"scheduler": "DPM++ 2M SDE Karras", "num_inference_steps": 3},
    "align your steps": {"sampler_name": "DPM++ 2M", "scheduler": "Align Your Steps", "num_inference_steps": 3},
    "beta": {"sampler_name": "Euler", "scheduler": "Beta", "num_inference_steps": 3},
    "simple, second order": {"sampler_name": "Heun", "scheduler": "Simple", "num_inference_steps": 2},
    "custom sigmas": {"sampler_name": "Euler", "sigmas": [14.6, 3.0, 0.0], "num_inference_steps": 2},
    "custom timesteps": {"scheduler": "DPM++ 2M", "timesteps": [999, 600, 200], "num_inference_steps": 3},
    "lcm": {"sampler_name": "LCM", "num_inference_steps": 4, "guidance_scale": 1.0},
    "tcd": {"sampler_name": "TCD", "eta": 0.5, "num_inference_steps": 2, "guidance_scale": 0},
    "ddim eta, rescale": {"sampler_name": "DDIM", "eta": 0.4, "guidance_rescale": 0.7, "num_inference_steps": 2},
}


def run(worker: Worker, payload: dict[str, Any]) -> dict[str, Any]:
    return worker.handle({"id": "sampling-job", "input": payload})


def image_bytes(out: dict[str, Any]) -> bytes:
    return base64.b64decode(out["images"][0].split(",", 1)[1])


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path) -> Any:
    """A worker on the dev model and its first job: what a fresh worker makes of PLAIN."""
    with one_torch_thread():
        made = Worker(load_settings({}))
        made.start(dev_model_dir)
        assert made.startup_error is None, made.startup_error
        first = run(made, PLAIN)
        assert "error" not in first, first
        yield made, image_bytes(first)


def test_the_lightning_recipe_runs_the_published_timesteps_through_the_handler(worker) -> None:
    handler, _ = worker
    with one_torch_thread():
        out = run(handler, {**SMALL, **LIGHTNING})
        official = run(handler, {**SMALL, "scheduler": "K_EULER", "num_inference_steps": 4, "guidance_scale": 0})
    metadata = out["metadata"]
    assert metadata["stages"][0]["timesteps"] == [999, 749, 499, 249]  # SDXL-Lightning's 4-step schedule
    assert metadata["sampling"] == {
        "sampler": "Euler",
        "schedule": "SGM Uniform",
        "schedule_requested": "SGM Uniform",
        "spacing": "trailing",
        "eta": None,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
    }
    assert "Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 0" in read_parameters(image_bytes(out))
    # The official worker's K_EULER keeps its meaning: the model folder's own (leading) spacing.
    train = 1000
    assert official["metadata"]["stages"][0]["timesteps"] == [train // 4 * k + 1 for k in (3, 2, 1, 0)]
    assert official["metadata"]["sampling"]["schedule"] == "model config" and official["images"] != out["images"]


def test_every_mode_runs_says_what_ran_and_leaves_the_next_job_a_fresh_workers(worker) -> None:
    handler, fresh = worker
    seen = set()
    with one_torch_thread():
        for mode, fields in MODES.items():
            out = run(handler, {**SMALL, **fields})
            assert "error" not in out, (mode, out)
            metadata = out["metadata"]
            stage = metadata["stages"][0]
            assert len(stage["timesteps"]) == stage["model_calls"] >= fields["num_inference_steps"], mode
            assert stage["timesteps"] == sorted(stage["timesteps"], reverse=True), mode
            assert metadata["guidance_rescale"] == fields.get("guidance_rescale", 0.0)
            seen.add(hashlib.sha256(image_bytes(out)).hexdigest())
            for kind in ("timesteps", "sigmas"):
                if kind in fields:
                    assert metadata["sampling"]["schedule"] == f"custom {kind}", mode
            if "timesteps" in fields:
                assert stage["timesteps"] == fields["timesteps"]
        again = run(handler, PLAIN)
    assert len(seen) == len(MODES)  # each mode made its own image
    assert image_bytes(again) == fresh  # no scheduler, spacing, eta or rescale carried over


def test_what_a_mode_records(worker) -> None:
    handler, _ = worker
    with one_torch_thread():
        automatic = run(handler, {**SMALL, **MODES["a1111 automatic"]})["metadata"]
        tcd = run(handler, {**SMALL, **MODES["tcd"], "eta": None})["metadata"]
        ays = run(handler, {**SMALL, **MODES["align your steps"]})["metadata"]
    assert automatic["sampling"]["schedule"] == "Karras" and automatic["sampling"]["schedule_requested"] == "Automatic"
    assert automatic["sampling"]["spacing"] == "karras" and automatic["stages"][0]["timesteps"][0] == 999
    assert tcd["sampling"]["eta"] == 0.3 and tcd["sampling"]["spacing"] == "TCD's own"  # TCD's gamma default
    assert ays["sampling"]["spacing"] == "Align Your Steps timesteps"  # DPM++ 2M takes timesteps, not sigmas


def png_data_uri(size: int = 64) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((size, size)).convert("RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_img2img_runs_the_tail_of_the_schedule_type_or_the_custom_list(worker) -> None:
    handler, fresh = worker
    image = {"image_url": png_data_uri(), "strength": 0.5, "guidance_scale": 3.0, "guidance_rescale": 0.5}
    with one_torch_thread():
        lightning = run(handler, {**SMALL, **image, **LIGHTNING, "guidance_scale": 0})
        custom = run(
            handler,
            {**SMALL, **image, "scheduler": "Euler", "timesteps": [999, 600, 300, 100], "num_inference_steps": 4},
        )
        after = run(handler, PLAIN)
    assert lightning["metadata"]["stages"][0]["timesteps"] == [499, 249]  # strength 0.5: the last 2 of 4
    assert custom["metadata"]["stages"][0]["timesteps"] == [300, 100]
    assert custom["metadata"]["mode"] == "img2img" and custom["metadata"]["guidance_rescale"] == 0.5
    assert image_bytes(after) == fresh


def test_guidance_rescale_changes_the_guided_image(worker) -> None:
    handler, _ = worker
    job = {**SMALL, "scheduler": "Euler", "num_inference_steps": 2, "guidance_scale": 6.0}
    with one_torch_thread():
        plain, rescaled = run(handler, job), run(handler, {**job, "guidance_rescale": 0.7})
    assert plain["images"] != rescaled["images"] and rescaled["metadata"]["guidance_rescale"] == 0.7


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"sampler_name": "Euler a", "scheduler": "Karras"},
            "invalid input: sampler_name 'Euler a' with scheduler 'Karras': this pair does not exist",
        ),
        ({"scheduler": "Beta"}, "invalid input: scheduler: unknown scheduler 'Beta'; 'Beta' is a schedule type"),
        (
            {"sampler_name": "Euler", "timesteps": [999, 500], "num_inference_steps": 3},
            "invalid input: timesteps: 2 values for num_inference_steps 3",
        ),
        ({"sampler_name": "UniPC", "eta": 0.1}, "invalid input: eta: sampler 'UniPC' takes no eta"),
    ],
)
def test_bad_sampling_input_is_a_clear_error_and_harms_no_later_job(worker, fields, message) -> None:
    handler, fresh = worker
    with one_torch_thread():
        out = run(handler, {**PLAIN, **fields})
        after = run(handler, PLAIN)
    assert out["error"].startswith(message), out
    assert image_bytes(after) == fresh


# ---- v-prediction / zero terminal SNR --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vpred_worker(dev_vpred_model_dir: Path) -> Worker:
    """The dev v-pred model: the dev base's weights converted from a file with the v_pred and ztsnr markers, so its
    scheduler config says v_prediction, rescale_betas_zero_snr and trailing spacing (see test_mb_vpred.py)."""
    with one_torch_thread():
        made = Worker(load_settings({}))
        made.start(dev_vpred_model_dir)
        assert made.startup_error is None, made.startup_error
        yield made


def test_a_v_prediction_model_keeps_its_config_for_every_sampler_the_request_names(worker, vpred_worker) -> None:
    handler, _ = worker
    with one_torch_thread():
        for fields in (
            {"scheduler": "DDIM"},  # the official default: the folder's own config, trailing spacing included
            {"sampler_name": "Euler a"},
            {"sampler_name": "DPM++ 2M", "scheduler": "SGM Uniform", "guidance_rescale": 0.7},
            {"sampler_name": "Euler", "scheduler": "Karras"},
        ):
            job = {**PLAIN, **fields}
            out = run(vpred_worker, job)
            assert "error" not in out, (fields, out)
            sampling = out["metadata"]["sampling"]
            assert sampling["prediction_type"] == "v_prediction" and sampling["rescale_betas_zero_snr"] is True
            config = vpred_worker.engine.pipe.scheduler.config
            assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
            assert out["metadata"]["stages"][0]["timesteps"][0] == 999  # zero terminal SNR: it starts at the end
            assert out["images"] != run(handler, job)["images"]  # the v-prediction config changed the sampling
        refused = run(vpred_worker, {**PLAIN, "sampler_name": "Heun"})
        again = run(vpred_worker, {**PLAIN, "scheduler": "DDIM"})
    assert refused["error"].startswith("invalid input: sampler_name: sampler 'Heun' cannot run this model")
    assert "rescale_betas_zero_snr" in refused["error"] and "use one of: Euler, Euler a, DPM++ 2M" in refused["error"]
    assert "error" not in again


def test_the_refiner_runs_the_schedule_type_and_refuses_a_custom_list(dev_model_dir: Path, dev_refiner_dir: Path):
    from worker.generation.engine import Engine

    with one_torch_thread():
        engine = Engine(dev_model_dir, refiner_dir=dev_refiner_dir)
        job = {**SMALL, "sampler_name": "DPM++ 2M", "num_inference_steps": 2, "refiner_inference_steps": 4}
        result = engine.generate(parse_request({**job, "high_noise_frac": 0.5}))
    base, refiner = result.metadata.to_dict()["stages"]
    assert base["spacing"] == refiner["spacing"] == "karras" and len(refiner["timesteps"]) == refiner["model_calls"]
    custom = parse_request({**SMALL, "scheduler": "Euler", "timesteps": [999, 499], "num_inference_steps": 2})
    with pytest.raises(InvalidRequest, match="timesteps: a custom list is for the base model's num_inference_steps"):
        engine.check_request(custom)
    engine.check_request(custom.model_copy(update={"refiner": False}))


# ---- the batch runner ------------------------------------------------------------------------------------------------


def test_the_batch_runner_runs_each_mode_and_writes_an_error_for_a_pair_that_does_not_exist(worker, tmp_path):
    handler, _ = worker
    lines = [{"id": mode.replace(" ", "-").replace(",", ""), **SMALL, **fields} for mode, fields in MODES.items()]
    lines.append({"id": "lightning-2", **SMALL, **LIGHTNING, "seed": 12})  # shares the lightning line's call
    lines.append({"id": "no-such-pair", **PLAIN, "sampler_name": "LCM", "scheduler": "Karras"})
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    with one_torch_thread():
        summary = run_shard(
            RunOptions(source, out, progress=False), LocalEngineOptions(batch_size=2, engine=handler.engine)
        )
    assert summary.made == len(MODES) + 1, summary
    made = sidecars(out)
    for line in lines[:-1]:
        request = parse_request({key: value for key, value in line.items() if key != "id"})
        assert made[line["id"]]["metadata"]["sampling"]["sampler"] == request.sampling.sampler
    lightning = made["lightning-2"]["metadata"]
    assert lightning["stages"][0]["timesteps"] == [999, 749, 499, 249]
    assert made["tcd"]["metadata"]["sampling"]["eta"] == 0.5
    (error,) = [read_json(path) for path in (out / "errors").glob("*.json")]
    assert error["id"] == "no-such-pair" and "sampler_name 'LCM' with scheduler 'Karras'" in error["error"]
