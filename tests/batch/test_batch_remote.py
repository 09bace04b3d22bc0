"""Remote mode against the worker's own local API server (``python -m worker --rp_serve_api``) on loopback:
real HTTP, the real handler and engine; the batch run starts before the server listens, so it retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_testing import SMALL, image_files, one_torch_thread, read_json, sidecars, stable, write_jsonl

from batch.execute import run_shard
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_USAGE
from batch.options import EndpointOptions, LocalEngineOptions, RunOptions
from tests.support.worker_api import serve_worker_api


@pytest.fixture(scope="module")
def engine(dev_model_dir: Path):
    from worker.generation.engine import Engine

    return Engine(dev_model_dir)


def test_remote_mode_makes_the_same_outputs_as_a_local_run(dev_model_dir: Path, engine, tmp_path: Path) -> None:
    lines = [
        {"prompt": "remote one", **SMALL},
        {"id": "remote-two", "prompt": "remote two", **SMALL, "seed": 11, "output_format": "jpeg"},
        {"prompt": "remote three", **SMALL, "negative_prompt": "fog", "guidance_scale": 2.0},
        {"prompt": "remote four", **SMALL, "num_images": 2},
        {"prompt": "invalid here", "height": 100},
        {"prompt": "refused there", **SMALL, "clip_skip": 5},
        {"prompt": "remote five", **SMALL, "scheduler": "Euler a"},
    ]
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    remote_out, local_out = tmp_path / "remote", tmp_path / "local"

    # A server of its own, started only now (after the engine fixture loaded), so the run surely begins before it
    # listens; the session's shared server may already be up when this test starts.
    with serve_worker_api(dev_model_dir, tmp_path / "worker.log") as server:
        summary = run_shard(
            RunOptions(source, remote_out, progress=False),
            EndpointOptions(server, concurrency=3, retries=12, backoff_s=0.5),
        )
    assert summary.exit_code == EXIT_INVALID_LINES, summary
    assert summary.made == 5 and summary.invalid_lines == 1 and summary.failed == 1
    refused = read_json(remote_out / "errors" / "line-00000006.json")
    assert refused["kind"] == "remote_error" and "clip_skip" in refused["error"] and not refused["retriable"]
    assert read_json(remote_out / "errors" / "line-00000005.json")["kind"] == "invalid_request"  # never sent
    remote = sidecars(remote_out)
    assert all(item["generation"]["mode"] == "remote" for item in remote.values())
    assert max(item["generation"]["attempts"] for item in remote.values()) > 1  # the server was not up at first

    with one_torch_thread():  # the server runs with one thread too
        local_summary = run_shard(RunOptions(source, local_out, progress=False), LocalEngineOptions(engine=engine))
    assert local_summary.made == 5
    local = sidecars(local_out)
    assert set(local) == set(remote)
    remote_images, local_images = image_files(remote_out), image_files(local_out)
    assert set(remote_images) == set(local_images)
    for item_id, item in remote.items():
        if item["request"]["num_images"] == 1:
            # One image: the worker's call and the local batch-size-1 call are the same computation.
            assert stable(item) == stable(local[item_id])
            name = item["images"][0]["file_name"]
            assert remote_images[name] == local_images[name]
        else:
            # The worker makes a request's images in one call, the local runner one by one: same seeds, and
            # the same pixels up to float rounding (see batch/planner.py), so only the layout is compared.
            assert [image["seed"] for image in item["images"]] == [image["seed"] for image in local[item_id]["images"]]


def test_remote_mode_stops_at_once_when_the_endpoint_refuses(worker_api_server: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": f"p{n}", **SMALL} for n in range(3)])
    summary = run_shard(
        RunOptions(source, tmp_path / "out", progress=False),
        # 404 on /runsync: a wrong URL, not a busy server
        EndpointOptions(worker_api_server + "/v2/no-such-endpoint", retries=12, backoff_s=0.5),
    )
    assert summary.exit_code == EXIT_USAGE and summary.made == 0
    assert not list((tmp_path / "out").glob("*.json"))


def test_a_workers_error_is_classified_by_its_kind_not_by_a_list_of_texts() -> None:
    """The worker's ``error`` string is read by core.errors.error_kind_of; the kind says whether to retry."""
    from batch.endpoint import worker_error
    from core.errors import (
        CudaFailed,
        EndpointRefused,
        InternalError,
        InvalidRequest,
        LoraFailed,
        ModelMissing,
        OutOfMemory,
    )

    cases = {
        "invalid input: clip_skip 5 is deeper than this model allows (at most 1)": (InvalidRequest, False),
        "lora: no LoRA named 'x' in /runpod-volume/loras": (LoraFailed, False),
        "out of GPU memory: CUDA out of memory; try a smaller size or num_images": (OutOfMemory, True),
        "CUDA error: an illegal memory access was encountered": (CudaFailed, True),
        "worker has no model: /runpod-volume/models/sdxl is missing": (ModelMissing, True),
        "internal error: ValueError: boom": (InternalError, True),
    }
    for text, (kind, retriable) in cases.items():
        error = worker_error(text)
        assert type(error) is kind and error.retriable is retriable and str(error) == text, text
    # Not one of ours (another worker image): final, and said to come from the endpoint.
    error = worker_error("something another worker says")
    assert isinstance(error, EndpointRefused) and not error.retriable
    assert str(error) == "endpoint error: something another worker says"
    # The RunPod SDK's report of an uncaught exception: retriable, and its message without the traceback.
    sdk = {"error_type": "<class 'KeyError'>", "error_message": "'x'", "error_traceback": "Traceback (most recent..."}
    error = worker_error(sdk)
    assert isinstance(error, InternalError) and error.retriable and "Traceback" not in str(error)
