"""The request: one typed declaration of everything a job (or a batch line) may ask for.

Every field of RunPod's official SDXL worker (runpod-workers/worker-sdxl) is accepted with its
meaning and default (`prompt`, `negative_prompt`, `height`, `width`, `seed`, `scheduler`,
`num_inference_steps`, `refiner_inference_steps`, `guidance_scale`, `strength`, `image_url`,
`num_images`, `high_noise_frac`), so its clients work unchanged. Validation is strict: unknown keys
are errors, every number has bounds, and :func:`parse_request` turns pydantic's errors into one
:class:`core.errors.InvalidRequest` naming each field, the value given and what is allowed.
Limits that depend on the deployment (the pixel budget) come from the settings through pydantic's
validation context, never from the environment at import time.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.errors import InvalidRequest
from worker.schedulers import canonical_scheduler_name, scheduler_names

# Seeds a request may give: torch's whole generator range, as the official worker (torch.Generator.manual_seed) takes.
MAX_SEED = 2**64 - 1
RANDOM_SEED = -1  # A1111's (and its clients') "random": the same as leaving seed out
# Seeds this worker draws itself stay below 2^32: JavaScript's JSON.parse rounds integers above 2^53, so a larger
# seed sent back by a browser client would silently make another image.
MAX_RANDOM_SEED = 2**32 - 1
# 64: the smallest side SDXL's UNet takes (8 latent pixels, two downsamplings); below 512 images are poor but valid,
# and the official worker serves them (diffusers only asks for multiples of 8).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
MAX_STEPS = 500  # the official worker has no bound; 500 steps of 1024² are about 20 s on an H200 (eager ~35 s)
MAX_GUIDANCE = 100.0  # the official worker and A1111's API have no bound; past ~30 images burn, but that is a choice
MAX_PROMPT_CHARS = 20_000
DEFAULT_MAX_JOB_PIXELS = 8 * 1024 * 1024  # core.settings' MAX_JOB_PIXELS default
MAX_LORAS = 8
# A data URI of up to 15 MB still fits RunPod's 20 MB /runsync payload with the rest of the request.
MAX_IMAGE_URL_CHARS = 15_000_000


def draw_seed() -> int:
    """A fresh random seed for a request that gave none (0..2^32-1, safe in JavaScript clients)."""
    return secrets.randbelow(MAX_RANDOM_SEED + 1)


def _number_from_int(value: Any) -> Any:
    # strict mode would refuse `1` for a float field; a JSON integer is a perfectly good float.
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class LoraRequest(BaseModel):
    """One LoRA to apply: a file name under LORA_DIR (or hf://repo/file@revision) and its weight."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=512)]
    scale: Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)] = 1.0

    _int_scale_is_fine = field_validator("scale", mode="before")(_number_from_int)


Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
OptionalText = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


class GenerationRequest(BaseModel):
    """A RunPod job's `input`, or one JSONL line of the batch runner (minus its `id`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Not required, as in the official worker's schema and A1111's API: an empty prompt is unconditional generation.
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    negative_prompt: OptionalText = None
    prompt_2: OptionalText = None
    negative_prompt_2: OptionalText = None
    height: Side = 1024
    width: Side = 1024
    seed: Annotated[int | None, Field(ge=RANDOM_SEED, le=MAX_SEED)] = None  # -1 or None: random
    scheduler: str = "DDIM"
    num_inference_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 25
    guidance_scale: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)] = 7.5
    num_images: Annotated[int, Field(ge=1, le=8)] = 1
    # The upper bound depends on the model's text encoders: the prompt encoder checks it (the one place).
    clip_skip: Annotated[int | None, Field(ge=0)] = None
    loras: Annotated[list[LoraRequest], Field(max_length=MAX_LORAS)] = []
    # The official worker's refiner and img2img fields, with its defaults.
    refiner: bool | None = None  # None: use the refiner when one is loaded (the official worker always does)
    refiner_inference_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 50
    # 1.0 is the official worker's "base to the end, then refine at strength": what null means here.
    high_noise_frac: Annotated[float | None, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = None
    strength: Fraction = 0.3
    image_url: Annotated[str | None, Field(max_length=MAX_IMAGE_URL_CHARS)] = None
    # Outputs.
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: Annotated[int, Field(ge=1, le=100)] = 95
    return_type: Literal["base64", "s3"] | None = None  # None: uploaded when a bucket is configured, else base64

    _floats_from_ints = field_validator("guidance_scale", "high_noise_frac", "strength", mode="before")(
        _number_from_int
    )

    @field_validator("seed")
    @classmethod
    def _minus_one_is_random(cls, value: int | None) -> int | None:
        return None if value == RANDOM_SEED else value

    @field_validator("high_noise_frac")
    @classmethod
    def _whole_base_run_is_null(cls, value: float | None) -> float | None:
        return None if value == 1.0 else value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        canonical = canonical_scheduler_name(value)
        if canonical is None:
            raise ValueError(f"unknown scheduler; use one of: {', '.join(scheduler_names())}")
        return canonical

    @field_validator("image_url")
    @classmethod
    def _image_url_kind(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None  # the official samples send null; an empty string means the same
        if "://" in value[:16] and not value.lower().startswith(("http://", "https://")):
            raise ValueError("only http(s) URLs, data URIs or bare base64 are accepted; local paths are never read")
        return value

    @model_validator(mode="after")
    def _pixel_budget(self, info: ValidationInfo) -> GenerationRequest:
        budget = (info.context or {}).get("max_job_pixels", DEFAULT_MAX_JOB_PIXELS)
        pixels = self.width * self.height * self.num_images
        if pixels > budget:
            raise ValueError(
                f"width x height x num_images = {self.width}x{self.height}x{self.num_images} = {pixels} pixels "
                f"exceeds this worker's budget of {budget}; lower the size or num_images"
            )
        return self

    @model_validator(mode="after")
    def _distinct_lora_names(self) -> GenerationRequest:
        names = [lora.name for lora in self.loras]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"loras: {', '.join(duplicates)} listed more than once; give each LoRA once")
        return self

    @property
    def is_img2img(self) -> bool:
        return self.image_url is not None

    @property
    def size_given(self) -> bool:
        """Whether width or height was sent (img2img output follows the input image otherwise)."""
        return bool({"width", "height"} & self.model_fields_set)


def _allowed_range(model: type[BaseModel], location: tuple) -> str:
    """'allowed LOW..HIGH' for a bounded number field, from the schema itself."""
    if not location or location[-1] not in model.model_fields:
        return ""
    low = high = None
    for constraint in model.model_fields[str(location[-1])].metadata:
        low = getattr(constraint, "ge", getattr(constraint, "gt", low))
        high = getattr(constraint, "le", getattr(constraint, "lt", high))
    if low is None or high is None:
        return ""
    return f"; allowed {low:g}..{high:g}" if isinstance(high, float) else f"; allowed {low}..{high}"


def _describe(error: dict[str, Any]) -> str:
    location_parts = tuple(error.get("loc", ()))
    location = ".".join(str(part) for part in location_parts) or "input"
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    in_lora = len(location_parts) >= 2 and location_parts[0] == "loras"
    model = LoraRequest if in_lora else GenerationRequest
    if error.get("type") == "extra_forbidden":
        fields = ", ".join(model.model_fields)
        return f"{location}: unknown field (a {'LoRA entry' if in_lora else 'request'} takes: {fields})"
    if error.get("type") == "missing":
        return f"{location}: required field is missing"
    if not location_parts:
        return f"{location}: {message}"
    shown = repr(error.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{location}: {message} (got {shown}{_allowed_range(model, location_parts)})"


def parse_request(payload: Any, max_job_pixels: int = DEFAULT_MAX_JOB_PIXELS) -> GenerationRequest:
    """Validate a job input; raise :class:`core.errors.InvalidRequest` naming every bad field."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"input must be a JSON object with at least a 'prompt', got {type(payload).__name__}")
    try:
        return GenerationRequest.model_validate(payload, context={"max_job_pixels": max_job_pixels})
    except ValidationError as error:
        problems = [_describe(item) for item in error.errors(include_url=False)]
        raise InvalidRequest("; ".join(problems)) from None
