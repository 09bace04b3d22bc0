"""The request: one typed declaration of everything a job (or a batch line) may ask for.

Every field of RunPod's official SDXL worker (runpod-workers/worker-sdxl) is accepted with its
meaning and default (`prompt`, `negative_prompt`, `height`, `width`, `seed`, `scheduler`,
`num_inference_steps`, `refiner_inference_steps`, `guidance_scale`, `strength`, `image_url`,
`num_images`, `high_noise_frac`), so its clients work unchanged. Validation is strict: unknown keys
are errors, every number has bounds, and :func:`parse_request` turns pydantic's errors into one
:class:`core.errors.InvalidRequest` naming each field, the value given and what is allowed.
Limits that depend on the deployment (the pixel budget) come from the settings through pydantic's
validation context, never from the environment at import time.

A feature's fields (inpainting, hires fix, adapters ...) are declared in its own module of this package as a field
group: a ``BaseModel`` with ``model_config = REQUEST_CONFIG`` whose fields carry a :class:`Scope`, a bound and a
description like those here, and whose validators check only its own fields. :class:`GenerationRequest` inherits
every group, so a request stays one flat JSON object and one typed value; checks across groups live here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.errors import InvalidRequest
from worker.request.controlnet import ControlNetFields, ControlNetUnit
from worker.request.embeddings import EmbeddingFields, EmbeddingUrl
from worker.request.fields import (
    DEFAULT_MAX_JOB_PIXELS,
    GROUP,
    MAX_GUIDANCE,
    MAX_IMAGE_URL_CHARS,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    RANDOM_SEED,
    REQUEST,
    REQUEST_CONFIG,
    Fraction,
    OptionalText,
    Scope,
    Side,
    check_image_reference,
    number_from_int,
)
from worker.request.hires import HiresFields, HiresSize, check_hires_sampling, check_hires_size, hires_size
from worker.request.inpainting import InpaintingFields, Outpaint
from worker.request.ip_adapter import IpAdapterFields, IpAdapterUnit
from worker.request.loras import LoraRequest
from worker.request.sampling import SamplingFields

# A1111 1.10's img2img API default denoising_strength: a masked job that does not give strength gets it (the
# official worker's 0.3 is for its refiner pass and leaves a filled mask a blur).
INPAINT_STRENGTH = 0.75


class GenerationRequest(
    HiresFields, ControlNetFields, EmbeddingFields, IpAdapterFields, SamplingFields, InpaintingFields
):
    """A RunPod job's `input`, or one JSONL line of the batch runner (minus its `id`).

    Field groups are its bases (:class:`worker.request.inpainting.InpaintingFields`, ...); checks across them live
    here.

    Each field declares its bounds, its :class:`Scope` and its meaning (``description``), from which the README's
    request table is generated (``python -m worker.request.table --write README.md``; a test keeps them equal).
    """

    model_config = REQUEST_CONFIG

    prompt: Annotated[
        str,
        REQUEST,
        Field(
            max_length=MAX_PROMPT_CHARS,
            description="unlimited tokens, A1111 weighting and prompt editing; empty: unconditional (as the official "
            "worker and A1111 allow)",
        ),
    ] = ""
    negative_prompt: Annotated[OptionalText, REQUEST, Field(description="what to steer away from")] = None
    prompt_2: Annotated[OptionalText, REQUEST, Field(description="for the second text encoder (default: prompt)")] = (
        None
    )
    negative_prompt_2: Annotated[
        OptionalText, REQUEST, Field(description="for the second text encoder (default: negative_prompt)")
    ] = None
    height: Annotated[Side, GROUP, Field(description="pixels; img2img default: the input image's")] = 1024
    width: Annotated[Side, GROUP, Field(description="pixels; width x height x num_images <= MAX_JOB_PIXELS")] = 1024
    seed: Annotated[
        int | None,
        REQUEST,
        Field(
            ge=RANDOM_SEED,
            le=MAX_SEED,
            description="-1 or none: random below 2^32 (JavaScript-safe); image k uses seed + k",
        ),
    ] = None
    num_inference_steps: Annotated[int, GROUP, Field(ge=1, le=MAX_STEPS, description="denoising steps")] = 25
    guidance_scale: Annotated[
        float,
        GROUP,
        Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="classifier-free guidance; <= 1 turns it off"),
    ] = 7.5
    num_images: Annotated[int, REQUEST, Field(ge=1, le=8, description="images of this request")] = 1
    clip_skip: Annotated[
        int | None,
        REQUEST,
        # The upper bound depends on the model's text encoders: the prompt encoder checks it (the one place).
        Field(ge=0, description="text encoder layers to skip, up to the model's layers - 2; none: the penultimate"),
    ] = None
    loras: Annotated[
        list[LoraRequest],
        GROUP,
        Field(
            max_length=MAX_LORAS,
            description='[{"name": file under LORA_DIR, hf://…@commit or http(s) URL, "scale": -5..5, "sha256": a '
            "URL's file (64 hex; optional for LORA_URL_HOSTS)}]",
        ),
    ] = []  # noqa: RUF012 (pydantic copies field defaults; ruff cannot see the BaseModel behind a field group)
    # The official worker's refiner and img2img fields, with its defaults.
    refiner: Annotated[
        bool | None,
        GROUP,
        Field(description="none: refine when a refiner is loaded (as the official worker always does)"),
    ] = None
    refiner_inference_steps: Annotated[
        int, GROUP, Field(ge=1, le=MAX_STEPS, description="the refiner's schedule (the official default)")
    ] = 50
    high_noise_frac: Annotated[
        float | None,
        GROUP,
        Field(
            gt=0.0,
            le=1.0,
            allow_inf_nan=False,
            # 1.0 is the official worker's "base to the end, then refine at strength": what null means here.
            description="where the base hands over to the refiner (ensemble of experts); 1 or none: the base runs "
            "to the end and the refiner refines at strength",
        ),
    ] = None
    strength: Annotated[
        Fraction,
        GROUP,
        Field(
            description="img2img, and the refiner without high_noise_frac: how much to change; with a mask or "
            f"outpaint and not given: {INPAINT_STRENGTH} (A1111's img2img default)"
        ),
    ] = 0.3
    image_url: Annotated[
        str | None,
        REQUEST,  # lines with other pictures share a call when width/height fix its size (grouping.fields_key)
        Field(
            max_length=MAX_IMAGE_URL_CHARS,
            description="img2img input: an http(s) URL (public addresses unless ALLOW_PRIVATE_URLS=1), a data URI "
            "or bare base64 of a PNG, JPEG or WebP",
        ),
    ] = None
    # Outputs.
    output_format: Annotated[Literal["png", "jpeg", "webp"], REQUEST, Field(description="image file format")] = "png"
    quality: Annotated[int, REQUEST, Field(ge=1, le=100, description="JPEG/WebP quality")] = 95
    return_type: Annotated[
        Literal["base64", "s3"] | None,
        REQUEST,
        Field(description="none: uploaded when BUCKET_ENDPOINT_URL is set, else base64 data URIs"),
    ] = None

    _floats_from_ints = field_validator("guidance_scale", "high_noise_frac", "strength", mode="before")(number_from_int)

    @model_validator(mode="before")
    @classmethod
    def _inpainting_strength(cls, data: Any) -> Any:
        masked = isinstance(data, dict) and any(data.get(key) for key in ("mask", "mask_url", "outpaint"))
        if masked and "strength" not in data:
            return {**data, "strength": INPAINT_STRENGTH}
        return data

    @field_validator("seed")
    @classmethod
    def _minus_one_is_random(cls, value: int | None) -> int | None:
        return None if value == RANDOM_SEED else value

    @field_validator("high_noise_frac")
    @classmethod
    def _whole_base_run_is_null(cls, value: float | None) -> float | None:
        return None if value == 1.0 else value

    @field_validator("image_url")
    @classmethod
    def _image_url_kind(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None  # the official samples send null; an empty string means the same
        check_image_reference(value)
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
    def _one_custom_value_per_step(self) -> GenerationRequest:
        steps = self.num_inference_steps
        for name, wanted in (("timesteps", steps), ("sigmas", steps + 1)):
            values = getattr(self, name)
            if values is not None and len(values) != wanted:
                per = "one per step" if name == "timesteps" else "one per step and the final noise level"
                raise ValueError(
                    f"{name}: {len(values)} values for num_inference_steps {steps}; give {wanted} ({per}), "
                    f"or set num_inference_steps to {len(values) - (name == 'sigmas')}"
                )
        return self

    @model_validator(mode="after")
    def _hires(self, info: ValidationInfo) -> GenerationRequest:
        if self.enable_hr:
            if self.image_url is not None:
                raise ValueError(
                    "enable_hr: the hires fix follows a text-to-image pass (A1111's txt2img); with image_url, leave "
                    "enable_hr out and give img2img the width and height you want"
                )
            check_hires_size(self, (info.context or {}).get("max_job_pixels", DEFAULT_MAX_JOB_PIXELS))
            check_hires_sampling(self)
        elif self.image_url is not None and "denoising_strength" in self.model_fields_set:
            raise ValueError(
                "denoising_strength: is the hires pass's strength (with enable_hr); img2img's is strength (the "
                "official worker's name)"
            )
        return self

    @model_validator(mode="after")
    def _inpainting_needs_an_image(self) -> GenerationRequest:
        field = "outpaint" if self.mask_source is None else self.mask_source[0]
        if self.is_inpainting and self.image_url is None:
            raise ValueError(f"{field}: inpainting needs the image to paint into; send image_url with it")
        if self.is_inpainting and self.refiner:
            raise ValueError(
                "refiner: inpainting runs on the base model (A1111 1.10 would hand over to the refiner at "
                "refiner_switch_at, which this worker does not do); leave refiner out or set it false"
            )
        return self

    @model_validator(mode="after")
    def _distinct_lora_names(self) -> GenerationRequest:
        names = [lora.name for lora in self.loras]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"loras: {', '.join(duplicates)} listed more than once; give each LoRA once")
        return self

    @model_validator(mode="after")
    def _adapters_fit_the_base(self) -> GenerationRequest:
        for field, what in (("controlnets", "ControlNets"), ("ip_adapters", "IP-Adapters")):
            if getattr(self, field) and self.image_url is not None and self.refiner:
                raise ValueError(
                    f"{field}: img2img through the refiner (refiner: true) cannot use {what}, which fit the base "
                    f"model's UNet; leave refiner out to run img2img on the base with them"
                )
        return self

    @property
    def is_img2img(self) -> bool:
        return self.image_url is not None

    @property
    def hires(self) -> HiresSize:
        """The hires pass's size arithmetic (meaningful with ``enable_hr``)."""
        return hires_size(self.width, self.height, self.hr_scale, self.hr_resize_x, self.hr_resize_y)

    @property
    def hr_steps(self) -> int:
        """The steps the hires pass runs (A1111: hr_second_pass_steps, 0 meaning num_inference_steps)."""
        return self.hr_second_pass_steps or self.num_inference_steps

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


# List fields whose items are models of their own: an error inside one is described by that model's fields.
_NESTED: dict[str, tuple[type[BaseModel], str]] = {
    "loras": (LoraRequest, "LoRA entry"),
    "controlnets": (ControlNetUnit, "ControlNet entry"),
    "embeddings": (EmbeddingUrl, "embedding entry"),
    "ip_adapters": (IpAdapterUnit, "IP-Adapter entry"),
    "outpaint": (Outpaint, "outpaint object"),
}


def _describe(error: dict[str, Any]) -> str:
    location_parts = tuple(error.get("loc", ()))
    location = ".".join(str(part) for part in location_parts) or "input"
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    nested = _NESTED.get(str(location_parts[0])) if len(location_parts) >= 2 else None
    model, what = nested or (GenerationRequest, "request")
    if error.get("type") == "extra_forbidden":
        fields = ", ".join(field_names() if model is GenerationRequest else model.model_fields)
        article = "an" if what[0] in "aeiou" else "a"
        return f"{location}: unknown field ({article} {what} takes: {fields})"
    if error.get("type") == "missing":
        return f"{location}: required field is missing"
    if not location_parts:
        # Checks across fields name their fields first ("scheduler: ...", "sampler_name 'X' with scheduler ...").
        named = message.split(":")[0].split(" ")[0].rstrip(",") in GenerationRequest.model_fields
        return message if named else f"{location}: {message}"
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


def field_names() -> list[str]:
    """The request's fields in reading order: its own first, then each field group's (pydantic lists a base
    class's fields first)."""
    own = [name for name in GenerationRequest.model_fields if name in GenerationRequest.__annotations__]
    return own + [name for name in GenerationRequest.model_fields if name not in own]


def field_scope(name: str) -> Scope:
    """The :class:`Scope` a request field declares (exactly one; ``tests/worker/test_worker_schema.py`` checks)."""
    (scope,) = (item for item in GenerationRequest.model_fields[name].metadata if isinstance(item, Scope))
    return scope


GROUP_FIELDS: tuple[str, ...] = tuple(name for name in GenerationRequest.model_fields if field_scope(name) is GROUP)
