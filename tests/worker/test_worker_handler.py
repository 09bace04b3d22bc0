"""The handler end to end on the dev model: in process, through --test_input, and over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.settings import load_settings
from worker.handler import Worker
from worker.output.images import read_parameters
from worker.request.fields import MAX_RANDOM_SEED
from worker.request.samplers import combined_name, split_combined

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"prompt": "a lighthouse at dawn", "height": 256, "width": 256, "num_inference_steps": 3}


def decode(uri: str) -> tuple[Image.Image, bytes]:
    _header, payload = uri.split(",", 1)
    data = base64.b64decode(payload)
    return Image.open(io.BytesIO(data)), data


WORKER = Worker(load_settings({}))  # no bucket, default limits, whatever the test machine's environment says


@pytest.fixture(scope="module")
def engine_loaded(dev_model_dir: Path):
    WORKER.start(dev_model_dir)
    assert WORKER.startup_error is None, WORKER.startup_error
    yield WORKER.engine


def run(payload: dict, worker: Worker = WORKER) -> dict:
    return worker.handle({"id": "test-job", "input": payload})


@pytest.mark.parametrize(("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_decode_at_the_asked_size_and_carry_parameters(engine_loaded, output_format, pil_format) -> None:
    out = run({**SMALL, "width": 320, "height": 256, "seed": 7, "output_format": output_format, "quality": 80})
    assert "error" not in out, out
    image, data = decode(out["images"][0])
    assert image.format == pil_format and image.size == (320, 256)
    assert out["image_url"] == out["images"][0] and out["seed"] == 7
    parameters = read_parameters(data)
    assert parameters.startswith("a lighthouse at dawn") and "Seed: 7" in parameters and "Size: 320x256" in parameters


def test_same_seed_same_bytes_and_metadata(engine_loaded) -> None:
    first = run({**SMALL, "seed": 1234, "num_images": 2})
    second = run({**SMALL, "seed": 1234, "num_images": 2})
    assert first["images"] == second["images"]
    assert first["metadata"]["seeds"] == [1234, 1235]
    metadata = first["metadata"]
    assert metadata["model"]["manifest_hash"] and "noise" in metadata["warning"]
    assert set(metadata["timings"]) >= {"text_encoding_s", "denoising_s", "vae_decode_s", "image_encoding_s", "total_s"}
    json.dumps(metadata)  # JSON-able all the way down


def test_random_seed_is_32_bit_and_reported(engine_loaded) -> None:
    out = run({**SMALL, "num_inference_steps": 1})
    assert 0 <= out["seed"] <= MAX_RANDOM_SEED and out["metadata"]["seeds"] == [out["seed"]]


def test_official_worker_values_that_used_to_be_refused_make_images(engine_loaded) -> None:
    """seed -1 (random), seeds past 2^63, an empty prompt and a side below 256 all run, as on the official worker."""
    random = run({**SMALL, "num_inference_steps": 1, "seed": -1})
    assert "error" not in random, random
    assert 0 <= random["seed"] <= MAX_RANDOM_SEED
    top = 2**64 - 1
    wrapped = run(
        {**SMALL, "prompt": "", "width": 128, "height": 64, "num_inference_steps": 1, "seed": top, "num_images": 2}
    )
    assert "error" not in wrapped, wrapped
    assert wrapped["metadata"]["seeds"] == [top, 0]  # image k uses seed + k, wrapping in torch's 64-bit range
    assert decode(wrapped["images"][0])[0].size == (128, 64)


# Every name builds a fresh scheduler (tests/worker/test_worker_schema.py); these run the engine for the kinds of
# noise handling: deterministic, ancestral (per-step noise from the generators), per-call noise (Brownian tree),
# multistep history, and the official worker's singlestep solver.
@pytest.mark.parametrize("scheduler", ["DDIM", "Euler a", "DPM++ SDE Karras", "DPM++ 2M Karras", "DPMSolverSinglestep"])
def test_schedulers_run_and_are_deterministic(engine_loaded, scheduler: str) -> None:
    payload = {**SMALL, "num_inference_steps": 2, "seed": 3, "scheduler": scheduler}
    first, second = run(payload), run(payload)
    assert "error" not in first, first
    assert first["images"] == second["images"]
    assert first["metadata"]["scheduler"] == combined_name(*split_combined(scheduler))


def test_invalid_input_is_an_error_string_never_a_traceback(engine_loaded) -> None:
    out = run({"prompt": "x", "num_inference_steps": 1000})
    assert set(out) == {"error"} and "num_inference_steps" in out["error"] and "1..500" in out["error"]


# The schema's own fuzz test covers arbitrary values; these few run the engine on what it accepts.
@settings(max_examples=6)
@given(
    st.dictionaries(
        st.sampled_from(["prompt", "width", "height", "seed", "num_images", "scheduler", "guidance_scale", "bogus"]),
        st.one_of(st.integers(-5, 5000), st.text(max_size=8), st.none(), st.floats(allow_nan=True)),
        max_size=6,
    )
)
def test_fuzzed_near_valid_inputs_never_raise(engine_loaded, fields: dict) -> None:
    payload = {"prompt": "x", "num_inference_steps": 1, "width": 256, "height": 256, **fields}
    out = run(payload)
    if "error" in out:
        assert isinstance(out["error"], str) and "Traceback" not in out["error"]
    else:
        image, _ = decode(out["images"][0])
        assert image.size == (payload["width"], payload["height"])


def test_model_dependent_limits_are_clear_errors(engine_loaded) -> None:
    out = run({**SMALL, "clip_skip": 5})
    assert "clip_skip" in out["error"] and "0..1" in out["error"]


def test_failed_jobs_leave_the_next_one_as_on_a_fresh_worker(engine_loaded, monkeypatch) -> None:
    good = {**SMALL, "seed": 99, "scheduler": "DPM++ 2M Karras"}
    reference = run(good)
    # A job that fails after denoising (no bucket for s3) ...
    assert "BUCKET_ENDPOINT_URL" in run({**good, "return_type": "s3", "scheduler": "Euler a"})["error"]
    # ... and one whose UNet fails mid-run with a CUDA-style error (fault injected into the real pipeline).
    unet = engine_loaded.pipe.unet
    original_forward = unet.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", failing_forward)
    failed = run({**good, "scheduler": "UniPC", "num_images": 2})
    monkeypatch.setattr(unet, "forward", original_forward)
    assert failed["refresh_worker"] is True and "CUDA error" in failed["error"]
    assert run(good)["images"] == reference["images"]


def test_oversized_output_without_a_bucket_is_a_clear_error(engine_loaded) -> None:
    small_limit = Worker(load_settings({"MAX_PAYLOAD_BYTES": "1000"}))
    small_limit.engine, small_limit.startup_error = engine_loaded, None
    out = run({**SMALL, "seed": 1}, small_limit)
    assert out["error"].startswith("output too large:") and "payload limit" in out["error"]
    assert "jpeg" in out["error"] and "BUCKET_ENDPOINT_URL" in out["error"]
    already_jpeg = run({**SMALL, "seed": 1, "output_format": "jpeg"}, small_limit)["error"]
    assert "'jpeg' or 'webp'" not in already_jpeg and "lower quality" in already_jpeg


def test_missing_model_folder_makes_every_job_an_error(tmp_path: Path) -> None:
    worker = Worker(load_settings({}))
    worker.start(tmp_path / "not-converted")
    out = run(SMALL, worker)
    assert out["error"].startswith("worker has no model:") and "python -m model_build convert" in out["error"]


def worker_env(model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    return {**env, "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_test_input(model_dir: Path, cwd: Path, job: dict) -> subprocess.CompletedProcess:
    """``python -m worker --test_input JOB``, exactly as RunPod's SDK defines the local test."""
    return subprocess.run(
        [sys.executable, "-m", "worker", "--test_input", json.dumps(job)],
        cwd=cwd,
        env=worker_env(model_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_test_input_subprocess_exits_0_on_success_and_1_on_error(dev_model_dir: Path, tmp_path: Path) -> None:
    done = run_test_input(dev_model_dir, tmp_path, {"input": {**SMALL, "num_inference_steps": 1, "seed": 5}})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "completed successfully" in done.stdout + done.stderr
    assert re.search(r"prefetched (\d+) of \1 weight files", done.stderr), done.stderr[-2000:]
    # Issue 22: no image as base64 in the log, no warnings a user cannot act on, the job's steps shown.
    assert re.search(r"data:image/png;base64,<[\d,]+ characters>", done.stdout + done.stderr)
    assert not re.search(r"base64,[A-Za-z0-9+/=]{80}", done.stdout + done.stderr)
    assert "requires torchvision" not in done.stderr and "torch_dtype" not in done.stderr, done.stderr[-2000:]
    assert "job local_test: step 1/1" in done.stderr
    failed = run_test_input(dev_model_dir, tmp_path, {"input": {"prompt": "x", "width": 100}})
    assert failed.returncode == 1 and "width" in failed.stdout + failed.stderr


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_local_api_server_runsync(worker_api_server: str) -> None:
    url = f"{worker_api_server}/runsync"
    deadline = time.monotonic() + 120
    while True:
        try:
            first = post(url, {"input": {**SMALL, "seed": 21, "output_format": "webp"}})
            break
        except OSError:
            assert time.monotonic() < deadline, "the API server did not answer in time"
            time.sleep(0.5)
    second = post(url, {"input": {**SMALL, "seed": 21, "output_format": "webp"}})
    assert first["status"] == "COMPLETED", first
    image, _ = decode(first["output"]["images"][0])
    assert image.format == "WEBP" and image.size == (256, 256)
    assert first["output"]["images"] == second["output"]["images"]
    bad = post(url, {"input": {"prompt": "x", "num_images": 0}})
    assert "num_images" in json.dumps(bad)


def test_images_encoded_in_parallel_equal_each_image_encoded_alone(engine_loaded) -> None:
    from worker.generation.seeds import image_seeds
    from worker.output.images import a1111_parameters, encode_image
    from worker.request.schema import parse_request

    output = run({**SMALL, "seed": 77, "num_images": 3})
    request = parse_request({**SMALL, "seed": 77, "num_images": 3})
    result = engine_loaded.generate(request)
    assert result.seeds == image_seeds(77, 3)
    for uri, image, seed in zip(output["images"], result.images, result.seeds, strict=True):
        parameters = a1111_parameters(request, seed, engine_loaded.model_name, engine_loaded.model_hash, [])
        alone = encode_image(image, request.output_format, request.quality, seed, parameters)
        assert decode(uri)[1] == alone.data


def test_start_up_warm_up_leaves_no_trace_in_the_next_job(engine_loaded) -> None:
    # The worker runs it at start-up on a GPU only (WARMUP=1); here it runs on the CPU engine directly.
    before = run({**SMALL, "seed": 5, "prompt": "a quiet harbour"})
    assert engine_loaded.warm_up(size=(256, 256)) > 0  # the worker's default is the first WARMUP_SIZES entry
    assert engine_loaded.prompt_encoder.cache_bytes == 0  # its prompts are forgotten
    after = run({**SMALL, "seed": 5, "prompt": "a quiet harbour"})
    assert after["images"] == before["images"]
    assert after["seed"] == before["seed"] == 5
    phases = engine_loaded.startup_phases
    assert {
        "import_pipelines_s",
        "verify_s",
        "cuda_init_s",
        "plan_s",
        "load_s",
        "to_device_s",
        "compile_s",
        "prompt_encoders_s",
    } <= set(phases)
    assert "warm_up_s" not in phases  # not on a CPU
    assert all(seconds >= 0 for seconds in phases.values())


def test_run_job_writes_beside_the_job_without_overwriting_it_and_logs_progress(
    dev_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22: `--out` the job's own folder overwrote the job file with the metadata; nothing showed progress."""
    from worker.run_job import main

    job = tmp_path / "job.json"
    text = json.dumps({"input": {**SMALL, "width": 64, "height": 64, "num_inference_steps": 4, "seed": 3}})
    job.write_text(text)
    with caplog.at_level("INFO", logger="worker.handler"):
        assert main([str(job), "--out", str(tmp_path), "--model", str(dev_model_dir)]) == 0
    assert job.read_text() == text
    metadata = json.loads((tmp_path / "job.metadata.json").read_text())
    assert metadata["seeds"] == [3] and (tmp_path / "job-0.png").is_file()
    steps = [record.getMessage() for record in caplog.records if ": step " in record.getMessage()]
    assert steps and steps[-1].startswith("job job: step 4/4"), steps


def test_progress_counts_steps_not_model_calls(engine_loaded) -> None:
    """Heun makes 2 model calls per step (7 for 4 steps): progress reported 7 of 4 (issue 24's helper noticed)."""
    from worker.request.schema import parse_request

    seen: list[tuple[int, int]] = []
    request = parse_request({**SMALL, "width": 64, "height": 64, "num_inference_steps": 4, "scheduler": "Heun"})
    engine_loaded.generate(request, progress=lambda step, total: seen.append((step, total)))
    assert len(seen) == 7 and seen[-1] == (4, 4) and all(step <= total for step, total in seen)
    assert [step for step, _ in seen] == sorted(step for step, _ in seen)


def test_prompt_weighting_setting_reaches_the_encoder(dev_model_dir: Path) -> None:
    """PROMPT_WEIGHTING=restore_mean is A1111 1.10's default emphasis ('Original'); multiply ('No norm') is ours."""
    from worker.generation.engine import Engine
    from worker.request.schema import parse_request

    original = Engine(dev_model_dir, settings=load_settings({"PROMPT_WEIGHTING": "restore_mean"}))
    assert original.prompt_encoder.weighting == "restore_mean"
    weighted = parse_request({"prompt": "a (red:1.6) house", "negative_prompt": "blurry"})
    plain = parse_request({"prompt": "a red house", "negative_prompt": "blurry"})
    no_norm = Engine(dev_model_dir, settings=load_settings({}))
    assert no_norm.prompt_encoder.weighting == "multiply"
    assert not original.encode(weighted).prompt_embeds.equal(no_norm.encode(weighted).prompt_embeds)
    assert original.encode(plain).prompt_embeds.equal(no_norm.encode(plain).prompt_embeds)  # unweighted: the same
