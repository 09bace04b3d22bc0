"""The RunPod handler: job input -> validated request -> engine -> encoded images and metadata.

Errors go back as a string in ``error`` (RunPod's convention), never as a traceback; CUDA
failures also set ``refresh_worker`` so RunPod replaces the worker after the job.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from typing import Any

import torch

from worker.engine import Engine, EngineError, GenerationResult
from worker.images import a1111_parameters, encode_image, to_data_uri
from worker.schema import GenerationRequest, RequestError, parse_request

log = logging.getLogger(__name__)

# RunPod refuses larger results (/run allows 10 MB, /runsync 20 MB); keep under the smaller one.
MAX_PAYLOAD_BYTES = int(os.environ.get("MAX_PAYLOAD_BYTES", str(10 * 1000 * 1000)))
PROGRESS_EVERY_STEPS = 5


class WorkerState:
    """The engine, or the start-up error that every job reports until the worker is fixed."""

    engine: Engine | None = None
    startup_error: str | None = None


STATE = WorkerState()


def start_engine(model_dir: os.PathLike | str | None = None, offload: str | None = None) -> None:
    """Load the engine once; on failure remember a message for every job (logged once)."""
    from model_build.convert import ConversionError
    from model_build.manifest import ModelFolderError
    from worker.model_location import prepare_model_dir

    try:
        folder = model_dir if model_dir is not None else prepare_model_dir()
        STATE.engine = Engine(folder, offload=offload or os.environ.get("OFFLOAD", "auto"))
        STATE.startup_error = None
    except (ModelFolderError, ConversionError, ValueError, OSError) as error:
        STATE.engine, STATE.startup_error = None, f"worker has no model: {error}"
        log.error(STATE.startup_error)
    except Exception as error:  # anything else at start-up: still answer jobs with a clear error
        STATE.engine, STATE.startup_error = None, f"worker failed to load the model: {type(error).__name__}: {error}"
        log.error("%s\n%s", STATE.startup_error, traceback.format_exc())


def _on_runpod() -> bool:
    return bool(os.environ.get("RUNPOD_POD_ID") or os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))


def _progress_reporter(job: dict[str, Any]):
    if not _on_runpod():
        return None  # locally (--test_input, --rp_serve_api) there is nobody to report to

    from runpod.serverless import progress_update

    def report(step: int, total: int) -> None:
        if step % PROGRESS_EVERY_STEPS == 0 or step == total:
            progress_update(job, {"step": step, "total_steps": total})

    return report


def _upload(job_id: str, payloads: list[bytes], output_format: str) -> list[str]:
    from runpod.serverless.utils.rp_upload import upload_in_memory_object

    extension = "jpg" if output_format == "jpeg" else output_format
    return [
        upload_in_memory_object(f"{job_id}-{k}-{uuid.uuid4().hex[:8]}.{extension}", data, prefix=job_id)
        for k, data in enumerate(payloads)
    ]


def render_output(job_id: str, result: GenerationResult, engine: Engine) -> dict[str, Any]:
    """Encode the images and build the RunPod output (``images``, ``image_url``, ``seed``, ``metadata``)."""
    request: GenerationRequest = result.request
    started = time.perf_counter()
    payloads = [
        encode_image(
            image,
            request.output_format,
            request.quality,
            a1111_parameters(request, seed, engine.model_name, engine.model_hash, result.metadata["loras"]),
        )
        for image, seed in zip(result.images, result.seeds, strict=True)
    ]
    metadata = dict(result.metadata)
    metadata["timings"] = dict(metadata["timings"], image_encoding_s=round(time.perf_counter() - started, 4))
    metadata["output_format"] = request.output_format

    bucket = os.environ.get("BUCKET_ENDPOINT_URL")
    if request.return_type == "s3":
        if not bucket:
            raise EngineError("return_type: 's3' needs BUCKET_ENDPOINT_URL (and bucket keys) set on the worker")
        images, metadata["returned_as"] = _upload(job_id, payloads, request.output_format), "s3"
    else:
        images = [to_data_uri(data, request.output_format) for data in payloads]
        size = sum(len(uri) for uri in images)
        metadata["returned_as"] = "base64"
        if size > MAX_PAYLOAD_BYTES:
            if not bucket:
                raise EngineError(
                    f"the {len(images)} image(s) take {size / 1e6:.1f} MB as base64, over RunPod's "
                    f"{MAX_PAYLOAD_BYTES / 1e6:.0f} MB payload limit; ask for output_format 'jpeg' or 'webp', "
                    "fewer images, or set BUCKET_ENDPOINT_URL so images are uploaded"
                )
            images, metadata["returned_as"] = _upload(job_id, payloads, request.output_format), "s3 (over size limit)"
    return {"images": images, "image_url": images[0], "seed": result.seeds[0], "metadata": metadata}


def _is_cuda_failure(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("CUDA" in str(error) or "cuDNN" in str(error))
    )


# The batch runner's remote mode tells retriable from final errors by these prefixes (RunPod's /runsync passes
# only `error` through): "out of GPU memory", "CUDA error", "internal error", "worker has no model",
# "worker failed to load". Keep them stable.
def handler(job: dict[str, Any]) -> dict[str, Any]:
    job_id = str(job.get("id", "local"))
    try:
        request = parse_request(job.get("input"))
    except RequestError as error:
        return {"error": str(error)}
    engine = STATE.engine
    if engine is None:
        return {"error": STATE.startup_error or "worker has no model loaded; set MODEL_DIR to a converted folder"}
    started = time.perf_counter()
    try:
        result = engine.generate(request, progress=_progress_reporter(job))
        output = render_output(job_id, result, engine)
    except (EngineError, RequestError) as error:
        return {"error": str(error)}
    except Exception as error:
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        if _is_cuda_failure(error):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            kind = "out of GPU memory" if isinstance(error, torch.cuda.OutOfMemoryError) else "CUDA error"
            return {
                "error": f"{kind}: {str(error).splitlines()[0]}; try a smaller size or num_images",
                "refresh_worker": True,
            }
        return {"error": f"internal error ({type(error).__name__}): {str(error).splitlines()[0] if str(error) else ''}"}
    output["metadata"]["timings"]["total_s"] = round(time.perf_counter() - started, 4)
    return output
