"""The hires fix's request fields, as A1111 1.10's txt2img API names them, and the size arithmetic they imply.

A1111 1.10 (``modules/processing.py``, ``StableDiffusionProcessingTxt2Img``; its API model is generated from that
class, so the API defaults are the class's): ``enable_hr`` runs a second pass after the text-to-image pass, at
``hr_scale`` times the size (``int(side x hr_scale)``), or at ``hr_resize_x`` x ``hr_resize_y`` (0 = unset: one
given keeps the aspect ratio; both given with another aspect ratio upscale to cover the target and crop the latents'
middle, A1111's ``truncate_x`` / ``truncate_y``). The second pass is img2img of ``hr_second_pass_steps`` steps
(0: the first pass's) at ``denoising_strength`` (API default 0.75; the web UI's slider starts at 0.7) over the
first pass's latents upscaled by ``hr_upscaler``: a latent interpolation ("Latent" and its variants), or the decoded
image resized ("Lanczos", "Nearest", "None" = one Lanczos resize) and encoded again. Sides that are not multiples of
8 end on the multiple of 8 below, as A1111's latents do (a 1331-pixel target gives 166 latents, 1328 pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

from worker.request.fields import GROUP, MAX_STEPS, MIN_SIDE, REQUEST, REQUEST_CONFIG, Fraction, OptionalText
from worker.request.samplers import (
    AUTOMATIC,
    MODEL_SCHEDULE,
    SAMPLERS,
    SCHEDULES,
    Sampling,
    combined_name,
    pair_problem,
    resolve,
    schedule_label,
    split_combined,
)

# A1111 1.10 shared.latent_upscale_modes: name -> (torch.nn.functional.interpolate mode, antialias).
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's built-in pixel upscalers (modules/upscaler.py): UpscalerNone, UpscalerLanczos, UpscalerNearest. Its model
# upscalers (ESRGAN, R-ESRGAN, SwinIR, DAT, ScuNET, LDSR) need their weight files; this worker runs none of them.
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode, what hr_upscaler null means there
DEFAULT_DENOISING_STRENGTH = 0.75  # StableDiffusionProcessingTxt2Img.denoising_strength, the API's default
SAME_SAMPLER, SAME_SCHEDULER = "Use same sampler", "Use same scheduler"  # what A1111's web UI sends for "none"
MAX_HR_SIDE = 4096  # 512 latent pixels; the pixel budget (MAX_JOB_PIXELS) usually binds first
LATENT_FACTOR = 8  # SDXL's VAE: one latent pixel per 8x8 image pixels (A1111's opt_f)


@dataclass(frozen=True)
class HiresSize:
    """Where A1111 1.10's ``calculate_target_resolution`` lands for a request."""

    upscale_to: tuple[int, int]  # hr_upscale_to_x / _y: the size the first pass is upscaled to
    truncate: tuple[int, int]  # truncate_x / _y: latent columns / rows cropped off (both hr_resize sides given)

    @property
    def latent_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the upscaled latents that the second pass keeps (A1111's middle crop)."""
        (width, height), (cut_x, cut_y) = self.upscale_to, self.truncate
        return (
            cut_x // 2,
            cut_y // 2,
            width // LATENT_FACTOR - (cut_x + 1) // 2,
            height // LATENT_FACTOR - (cut_y + 1) // 2,
        )

    @property
    def size(self) -> tuple[int, int]:
        """The second pass's, and the output's, width and height (multiples of 8)."""
        left, top, right, bottom = self.latent_box
        return (right - left) * LATENT_FACTOR, (bottom - top) * LATENT_FACTOR


def hires_size(width: int, height: int, hr_scale: float, hr_resize_x: int, hr_resize_y: int) -> HiresSize:
    """A1111 1.10's hires target for a first pass of ``width`` x ``height``, its integer arithmetic included."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        return HiresSize((int(width * hr_scale), int(height * hr_scale)), (0, 0))
    if hr_resize_y == 0:
        return HiresSize((hr_resize_x, hr_resize_x * height // width), (0, 0))
    if hr_resize_x == 0:
        return HiresSize((hr_resize_y * width // height, hr_resize_y), (0, 0))
    if width / height < hr_resize_x / hr_resize_y:
        upscale_to = (hr_resize_x, hr_resize_x * height // width)
    else:
        upscale_to = (hr_resize_y * width // height, hr_resize_y)
    truncate = ((upscale_to[0] - hr_resize_x) // LATENT_FACTOR, (upscale_to[1] - hr_resize_y) // LATENT_FACTOR)
    return HiresSize(upscale_to, truncate)


def _canonical_upscaler(value: str | None) -> str:
    if value is None:
        return DEFAULT_UPSCALER
    folded = {name.casefold(): name for name in UPSCALERS}.get(" ".join(value.split()).casefold())
    if folded is None:
        raise ValueError(
            f"unknown upscaler; use one of: {', '.join(UPSCALERS)}. Upscaler models (ESRGAN, R-ESRGAN, SwinIR, DAT, "
            "ScuNET, LDSR) are not available on this worker"
        )
    return folded


class HiresFields(BaseModel):
    """A1111's hires fix: a second, img2img pass at a larger size in the same job (text-to-image only)."""

    model_config = REQUEST_CONFIG

    enable_hr: Annotated[
        bool, GROUP, Field(description="hires fix: a second img2img pass at hr_scale (or hr_resize) after txt2img")
    ] = False
    hr_scale: Annotated[
        float,
        GROUP,
        Field(
            ge=1.0,
            le=4.0,
            allow_inf_nan=False,
            description="hires size: int(side x hr_scale), each side down to a multiple of 8",
        ),
    ] = 2.0
    hr_resize_x: Annotated[
        int,
        GROUP,
        Field(ge=0, le=MAX_HR_SIDE, description="hires width instead of hr_scale (0: from hr_resize_y's aspect)"),
    ] = 0
    hr_resize_y: Annotated[
        int,
        GROUP,
        Field(ge=0, le=MAX_HR_SIDE, description="hires height; both given: cover, then crop the middle (A1111)"),
    ] = 0
    hr_second_pass_steps: Annotated[
        int,
        GROUP,
        Field(ge=0, le=MAX_STEPS, description="steps the hires pass runs (0: num_inference_steps)"),
    ] = 0
    denoising_strength: Annotated[
        Fraction,
        GROUP,
        Field(description="the hires pass's strength (A1111's API default; its schedule is steps / strength long)"),
    ] = DEFAULT_DENOISING_STRENGTH
    hr_upscaler: Annotated[
        str | None,
        GROUP,
        Field(
            max_length=64,
            description="A1111's: Latent (bilinear), Latent (antialiased), Latent (bicubic), Latent (bicubic "
            "antialiased), Latent (nearest), Latent (nearest-exact); Lanczos, Nearest, None (a Lanczos resize) on "
            "the decoded image; null: Latent",
        ),
    ] = DEFAULT_UPSCALER
    hr_sampler_name: Annotated[
        str | None,
        GROUP,
        Field(max_length=64, description="the hires pass's sampler (as sampler_name; none: the first pass's)"),
    ] = None
    hr_scheduler: Annotated[
        str | None,
        GROUP,
        Field(max_length=64, description="the hires pass's schedule type (A1111 1.10; none: the first pass's)"),
    ] = None
    hr_prompt: Annotated[OptionalText, REQUEST, Field(description="the hires pass's prompt (none or '': prompt)")] = (
        None
    )
    hr_negative_prompt: Annotated[
        OptionalText, REQUEST, Field(description="the hires pass's negative prompt (none or '': negative_prompt)")
    ] = None

    @field_validator("hr_scale", "denoising_strength", mode="before")
    @classmethod
    def _float_from_int(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("hr_upscaler")
    @classmethod
    def _known_upscaler(cls, value: str | None) -> str:
        return _canonical_upscaler(value)

    @field_validator("hr_sampler_name")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        if value is None or value.strip() in ("", SAME_SAMPLER):
            return None
        parts = split_combined(value)  # A1111 1.10 splits "DPM++ 2M Karras" as it does for sampler_name
        if parts is None:
            raise ValueError(f"unknown sampler; use one of: {', '.join(SAMPLERS)} (or leave it out)")
        return combined_name(*parts)

    @field_validator("hr_scheduler")
    @classmethod
    def _known_schedule(cls, value: str | None) -> str | None:
        if value is None or value.strip() in ("", SAME_SCHEDULER):
            return None
        label = schedule_label(value)
        if label is None:
            raise ValueError(f"unknown schedule type; use one of: {', '.join(SCHEDULES)} (or leave it out)")
        return label

    @field_validator("hr_prompt", "hr_negative_prompt")
    @classmethod
    def _empty_is_first_pass(cls, value: str | None) -> str | None:
        return value or None  # A1111: '' means the first pass's prompt


def hires_sampling_fields(request: Any) -> tuple[str | None, str | None]:
    """The hires pass's ``(sampler_name, scheduler)`` as request fields (A1111 1.10: ``hr_sampler_name or
    sampler_name``, ``hr_scheduler`` defaulting to the first pass's schedule type); a ValueError names the fields
    when that pair does not exist."""
    if request.hr_sampler_name is None and request.hr_scheduler is None:
        return request.sampler_name, request.scheduler
    first = request.sampling
    sampler, suffix = split_combined(request.hr_sampler_name) if request.hr_sampler_name else (first.sampler, None)
    if request.hr_scheduler and suffix and request.hr_scheduler != suffix:
        raise ValueError(
            f"hr_sampler_name {request.hr_sampler_name!r} names the {suffix} schedule but hr_scheduler asks for "
            f"{request.hr_scheduler!r}; send the sampler alone with the hr_scheduler you want"
        )
    schedule = request.hr_scheduler or suffix or first.requested
    if schedule == MODEL_SCHEDULE:  # an official-style name without a schedule type: the model's own config
        return None, sampler
    problem = pair_problem(sampler, schedule)
    if problem:
        raise ValueError(
            f"hr_sampler_name/hr_scheduler: the hires pass would run {sampler} with {schedule}, which does not "
            f"exist ({problem}); pick another hr_sampler_name or hr_scheduler"
        )
    return sampler, schedule


def hires_sampling(request: Any) -> Sampling:
    """The sampler and schedule the hires pass runs."""
    sampler_name, scheduler = hires_sampling_fields(request)
    if sampler_name is None:
        sampler, schedule = split_combined(scheduler or "DDIM") or ("DDIM", None)
        return resolve(sampler, schedule) if schedule else Sampling(sampler, MODEL_SCHEDULE, MODEL_SCHEDULE)
    return resolve(sampler_name, scheduler or AUTOMATIC)


def check_hires_sampling(request: Any) -> None:
    """Refuse a hires sampler/schedule pair that does not exist (:func:`hires_sampling_fields` names the fields)."""
    hires_sampling_fields(request)


def resize_fields(request: Any) -> str:
    """The field(s) that set the hires size, for error messages."""
    given = [name for name in ("hr_resize_x", "hr_resize_y") if getattr(request, name)]
    return "/".join(given) if given else "hr_scale"


def largest_hr_scale(width: int, height: int, images: int, budget: int) -> float:
    """The largest hr_scale (in hundredths, at most 4) whose hires size fits ``budget`` pixels for ``images``."""

    def fits(scale: float) -> bool:
        w, h = hires_size(width, height, scale, 0, 0).size
        return w * h * images <= budget and max(w, h) <= MAX_HR_SIDE

    # The square root is close; the sizes' rounding down to multiples of 8 moves it a few hundredths (fits() only
    # grows with the scale, so walking from there finds the edge).
    scale = max(1.0, min(4.0, int(100 * (budget / (width * height * images)) ** 0.5) / 100))
    while scale > 1.0 and not fits(scale):
        scale = round(scale - 0.01, 2)
    while scale < 4.0 and fits(round(scale + 0.01, 2)):
        scale = round(scale + 0.01, 2)
    return scale


def check_hires_size(request: Any, budget: int) -> None:
    """Refuse a hires size that the pixel budget, the largest side or the smallest side does not allow."""
    width, height = request.hires.size
    field = resize_fields(request)
    made = f"{field} makes the hires pass {width}x{height}"
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"{made}; each side must be at least {MIN_SIDE}: raise {field}")
    if max(width, height) > MAX_HR_SIDE:
        raise ValueError(f"{made}; each side must be at most {MAX_HR_SIDE}: lower {field}")
    pixels = width * height * request.num_images
    if pixels <= budget:
        return
    first = f"{request.width}x{request.height} x {request.num_images} image(s)"
    if field == "hr_scale":
        largest = largest_hr_scale(request.width, request.height, request.num_images, budget)
        fix = f"the largest hr_scale for {first} is {largest:g}"
    else:
        k = (budget / (width * height * request.num_images)) ** 0.5
        fix = f"the largest at this aspect ratio is about {int(width * k) // 8 * 8}x{int(height * k) // 8 * 8}"
    raise ValueError(
        f"{made} x {request.num_images} image(s) = {pixels} pixels, over this worker's budget of {budget} "
        f"(MAX_JOB_PIXELS); {fix}, or lower num_images"
    )
