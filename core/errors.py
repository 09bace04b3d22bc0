"""One error contract for the worker, the batch runner and the converter.

Every failure a caller can see is a :class:`WorkerError` of one *kind*. The kind decides three
things once, here, instead of in every module that handles the error:

- ``code``: the stable prefix of the message (``"invalid input: ..."``), which is all RunPod's
  ``/runsync`` passes back to a client, so a remote caller can classify the error with
  :func:`error_kind_of` without knowing this code base;
- ``retriable``: whether another attempt (maybe on another worker) can succeed;
- ``refresh_worker``: whether the worker process must be replaced after the job (a broken CUDA context).

Messages say what is wrong and what to do, and never carry a traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import Any, ClassVar


def first_line(text: object, limit: int = 500) -> str:
    """The first non-empty line of ``text`` (an exception or a string), at most ``limit`` characters."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


# errno values that mean "no room to write": a full disk, a quota, a file size limit (the converter's output, the
# worker's model folder on the volume, the batch runner's outputs all report them as a storage problem).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class WorkerError(Exception):
    """Base of every error a job, a batch line or a conversion reports to its caller."""

    code: ClassVar[str] = "error"
    retriable: ClassVar[bool] = False
    refresh_worker: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if not self.message.startswith(self.code + ":") else self.message

    def to_output(self) -> dict[str, Any]:
        """The RunPod handler's return value for this error (``error`` is a string, as the SDK requires)."""
        output: dict[str, Any] = {"error": str(self)}
        if self.refresh_worker:
            output["refresh_worker"] = True
        return output


class InvalidRequest(WorkerError):
    """The request cannot run as asked (a field out of range, an option this model does not allow)."""

    code = "invalid input"


class ModelMissing(WorkerError):
    """The worker has no usable model folder; another worker (or a fixed deployment) may have one."""

    code = "worker has no model"
    retriable = True


class ModelFolderError(ModelMissing):
    """A converted model folder is missing, incomplete or altered; the message says what to run.

    Raised by ``model_build.manifest`` (the converter's check, the worker's and the batch runner's start-up). To a
    job it is :class:`ModelMissing` (same code: another worker's folder may be sound); the batch runner, whose
    folder is the one the user named, reports it as a configuration error.
    """


class ModelLoadFailed(WorkerError):
    """The model folder exists but could not be loaded."""

    code = "worker failed to load the model"
    retriable = True


class LoraFailed(InvalidRequest):
    """A LoRA the job names cannot be used (missing, a pickle, for another model, ...)."""

    code = "lora"


class ControlNetFailed(InvalidRequest):
    """A requested ControlNet could not be used (its folder is damaged or would not load)."""

    code = "controlnet"


class EmbeddingFailed(InvalidRequest):
    """A textual-inversion embedding a prompt names cannot be used (another model family, damaged, a pickle, ...)."""

    code = "embedding"


class IpAdapterFailed(InvalidRequest):
    """A requested IP-Adapter could not be used (its file or its image encoder is damaged or would not load)."""

    code = "ip-adapter"


class ImageQualityFailed(WorkerError):
    """The VAE produced NaN or an all-black image: an error, never an image."""

    code = "image quality"


class OutputTooLarge(InvalidRequest):
    """The encoded images exceed the payload limit and cannot be uploaded."""

    code = "output too large"


class UploadFailed(WorkerError):
    """Images could not be uploaded to the configured bucket (no silent base64 or local fallback)."""

    code = "upload failed"
    retriable = True


class CudaFailed(WorkerError):
    """A CUDA error other than out-of-memory: the context is unusable, the worker must be replaced."""

    code = "CUDA error"
    retriable = True
    refresh_worker = True


class OutOfMemory(WorkerError):
    """The GPU (or host) ran out of memory for this job; a smaller job, or a fresh worker, may succeed."""

    code = "out of GPU memory"
    retriable = True
    refresh_worker = True


class InternalError(WorkerError):
    """A bug or an unexpected failure; the message names the exception type."""

    code = "internal error"
    retriable = True


class RetriesExhausted(WorkerError):
    """A retriable failure came back on every attempt; trying the same item again automatically would loop."""

    code = "gave up"


class ConfigurationError(WorkerError):
    """A setting (environment variable or command-line option) is invalid; nothing can run until it is fixed."""

    code = "configuration"


class EndpointMisconfigured(ConfigurationError):
    """A batch run's endpoint refuses every request (HTTP 401/403/404: a wrong URL or API key); the run stops."""


class EndpointUnavailable(WorkerError):
    """A batch run's endpoint could not be reached or gave no usable answer (transport, 429/5xx, a bad output)."""

    code = "endpoint unavailable"
    retriable = True


class EndpointRefused(WorkerError):
    """A batch run's endpoint refused the request with an error this code base does not know (another worker)."""

    code = "endpoint error"


# Every kind, most specific first (error_kind_of matches prefixes in this order).
ERROR_KINDS: tuple[type[WorkerError], ...] = (
    LoraFailed,
    ControlNetFailed,
    EmbeddingFailed,
    IpAdapterFailed,
    OutputTooLarge,
    InvalidRequest,
    ModelMissing,
    ModelLoadFailed,
    ImageQualityFailed,
    UploadFailed,
    CudaFailed,
    OutOfMemory,
    InternalError,
    RetriesExhausted,
    ConfigurationError,
    EndpointUnavailable,
    EndpointRefused,
)
# Kinds that share a listed kind's code (a cause told apart in this code base, the same kind on the wire).
REFINED_KINDS: tuple[type[WorkerError], ...] = (ModelFolderError, EndpointMisconfigured)


def error_kind_of(message: object) -> type[WorkerError] | None:
    """The kind of an error message a worker sent back (``output["error"]``), or None when it is not ours.

    The RunPod SDK reports an uncaught exception as a JSON object (error_type, error_message,
    error_traceback); that is an internal error.
    """
    if isinstance(message, dict):
        return InternalError
    text = str(message).lstrip()
    if text.startswith("{"):
        return InternalError
    for kind in ERROR_KINDS:
        if text.startswith(kind.code + ":") or text.startswith(kind.code + " ("):
            return kind
    return None


def from_exception(error: BaseException) -> WorkerError:
    """Wrap any exception in its kind; CUDA failures are told apart by torch's types (and, for torch versions that
    raise a plain RuntimeError, its message).

    torch is not imported here: an error can only be torch's when torch is loaded already, so this module stays
    importable without it.
    """
    if isinstance(error, WorkerError):
        return error
    name = type(error).__name__
    text = first_line(error)
    torch = sys.modules.get("torch")
    out_of_memory = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    if isinstance(error, out_of_memory):
        return OutOfMemory(f"{text or name}; try a smaller size or num_images")
    if isinstance(error, getattr(torch, "AcceleratorError", ())) or (
        isinstance(error, RuntimeError) and any(word in str(error) for word in ("CUDA", "cuDNN", "cuBLAS"))
    ):
        return CudaFailed(text)
    return InternalError(f"{name}: {text}" if text else name)
