"""The request: one typed declaration of everything a job (or a batch line) may ask for.

Field names and defaults follow RunPod's official SDXL worker (`prompt`, `negative_prompt`,
`height`, `width`, `seed`, `scheduler`, `num_inference_steps`, `guidance_scale`, `num_images`)
so its clients work unchanged. Validation is strict: unknown keys are errors, every number has
bounds, and :func:`parse_request` turns pydantic's errors into one message that names each field,
the value given and what is allowed.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.schedulers import canonical_scheduler_name, scheduler_names

MAX_SEED = 2**63 - 1
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 8
MAX_PROMPT_CHARS = 20_000
# Pixels a single job may ask for across all its images (8 images of 1024x1024 by default).
MAX_JOB_PIXELS = int(os.environ.get("MAX_JOB_PIXELS", str(8 * 1024 * 1024)))

# Keys of the official worker that this one deliberately does not serve, with the reason.
_UNSUPPORTED_KEYS = {
    "refiner_inference_steps": "this worker runs no refiner (the base model alone, as most SDXL finetunes need)",
    "high_noise_frac": "this worker runs no refiner (the base model alone, as most SDXL finetunes need)",
    "strength": "img2img is not supported; send a text-to-image request",
    "image_url": "img2img is not supported; send a text-to-image request",
}


class LoraRequest(BaseModel):
    """One LoRA to apply: a file name under LORA_DIR (or hf://repo/file@revision) and its weight."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=512)]
    scale: Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)] = 1.0

    @field_validator("scale", mode="before")
    @classmethod
    def _int_scale_is_fine(cls, value: Any) -> Any:
        # strict mode would refuse `1`; a JSON integer is a perfectly good scale.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
OptionalText = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]


class GenerationRequest(BaseModel):
    """A RunPod job's `input`, or one JSONL line of the batch runner (minus its `id`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    negative_prompt: OptionalText = None
    prompt_2: OptionalText = None
    negative_prompt_2: OptionalText = None
    height: Side = 1024
    width: Side = 1024
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None
    scheduler: str = "DDIM"
    num_inference_steps: Annotated[int, Field(ge=1, le=150)] = 25
    guidance_scale: Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)] = 7.5
    num_images: Annotated[int, Field(ge=1, le=8)] = 1
    clip_skip: Annotated[int | None, Field(ge=0, le=10)] = None
    loras: Annotated[list[LoraRequest], Field(max_length=8)] = []
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: Annotated[int, Field(ge=1, le=100)] = 95
    return_type: Literal["base64", "s3"] = "base64"

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _int_guidance_is_fine(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        canonical = canonical_scheduler_name(value)
        if canonical is None:
            raise ValueError(f"unknown scheduler; use one of: {', '.join(scheduler_names())}")
        return canonical

    @model_validator(mode="after")
    def _pixel_budget(self) -> GenerationRequest:
        pixels = self.width * self.height * self.num_images
        if pixels > MAX_JOB_PIXELS:
            raise ValueError(
                f"width x height x num_images = {self.width}x{self.height}x{self.num_images} = {pixels} pixels "
                f"exceeds this worker's budget of {MAX_JOB_PIXELS}; lower the size or num_images"
            )
        return self

    @model_validator(mode="after")
    def _distinct_lora_names(self) -> GenerationRequest:
        names = [lora.name for lora in self.loras]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"loras: {', '.join(duplicates)} listed more than once; give each LoRA once")
        return self


class RequestError(ValueError):
    """The request is invalid; ``str()`` is a message for the caller naming every bad field."""


def _allowed_range(location: tuple) -> str:
    """'allowed LOW..HIGH' for a bounded top-level number field, from the schema itself."""
    if len(location) != 1 or location[0] not in GenerationRequest.model_fields:
        return ""
    low = high = None
    for constraint in GenerationRequest.model_fields[str(location[0])].metadata:
        low = getattr(constraint, "ge", low)
        high = getattr(constraint, "le", high)
    if low is None or high is None:
        return ""
    return f"; allowed {low:g}..{high:g}" if isinstance(high, float) else f"; allowed {low}..{high}"


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error.get("loc", ())) or "input"
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        reason = _UNSUPPORTED_KEYS.get(str(error["loc"][-1]), "unknown field")
        return f"{location}: {reason}"
    if error.get("type") == "missing":
        return f"{location}: required field is missing"
    if not error.get("loc"):
        return f"{location}: {message}"
    shown = repr(error.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{location}: {message} (got {shown}{_allowed_range(tuple(error['loc']))})"


def parse_request(payload: Any) -> GenerationRequest:
    """Validate a job input; raise :class:`RequestError` with a message naming every bad field."""
    if not isinstance(payload, dict):
        raise RequestError(f"input must be a JSON object with at least a 'prompt', got {type(payload).__name__}")
    try:
        return GenerationRequest.model_validate(payload)
    except ValidationError as error:
        errors = error.errors(include_url=False)
        problems = [_describe(item) for item in errors]
        if any(item.get("type") == "extra_forbidden" for item in errors):
            problems.append(f"allowed fields: {', '.join(GenerationRequest.model_fields)}")
        raise RequestError("invalid input: " + "; ".join(problems)) from None
