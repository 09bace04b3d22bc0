"""The ControlNet field group: ``controlnets``, a list of units, each a converted ControlNet, a control image and how
strongly and when it steers.

Names follow diffusers' SDXL ControlNet pipelines (``controlnet_conditioning_scale`` -> ``conditioning_scale``,
``control_guidance_start``/``_end``), which most SDXL ControlNet APIs (fal, Replicate) expose as such; A1111's
sd-webui-controlnet calls the same things ``weight``, ``guidance_start``/``guidance_end``, ``module`` (here
``preprocessor``) and ``threshold_a``/``threshold_b`` (here ``low_threshold``/``high_threshold``, the canny labels of
its UI and of diffusers' and ComfyUI's canny). Bounds and defaults are sd-webui-controlnet's: weight 0..2 (1),
guidance 0..1 (0 and 1), preprocessor ``none``, canny thresholds 100 and 200 on 1..255.

Preprocessors that need no model run here (``canny``, ``none`` for a ready control image); those that need an
annotator model (depth, pose, line art, ...) are refused by name, with what to send instead.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.request.fields import GROUP, MAX_IMAGE_URL_CHARS, REQUEST_CONFIG, check_image_reference, number_from_int

MAX_CONTROLNETS = 4
PREPROCESSORS = ("none", "canny")
# sd-webui-controlnet's preprocessors that need an annotator model (or, like the reference and IP-Adapter units,
# are not ControlNets at all); refused by name so a client learns what to do instead of "unknown preprocessor".
MODEL_PREPROCESSORS = (
    "depth",
    "depth_midas",
    "depth_zoe",
    "depth_leres",
    "depth_leres++",
    "depth_anything",
    "depth_anything_v2",
    "depth_hand_refiner",
    "openpose",
    "openpose_full",
    "openpose_face",
    "openpose_faceonly",
    "openpose_hand",
    "dw_openpose_full",
    "animal_openpose",
    "lineart",
    "lineart_realistic",
    "lineart_coarse",
    "lineart_standard",
    "lineart_anime",
    "lineart_anime_denoise",
    "softedge_hed",
    "softedge_hedsafe",
    "softedge_pidinet",
    "softedge_pidisafe",
    "softedge_teed",
    "scribble_hed",
    "scribble_pidinet",
    "mlsd",
    "normal_bae",
    "normal_midas",
    "normal_dsine",
    "seg_ofade20k",
    "seg_ofcoco",
    "seg_ufade20k",
    "segmentation",
    "mediapipe_face",
    "reference_only",
    "reference_adain",
    "reference_adain+attn",
    "ip-adapter_clip_sdxl",
    "inpaint_only+lama",
)
# sd-webui-controlnet's preprocessors that need no model but are not implemented here.
OTHER_PREPROCESSORS = (
    "inpaint_only",
    "tile_resample",
    "tile_colorfix",
    "tile_colorfix+sharp",
    "recolor_luminance",
    "recolor_intensity",
    "shuffle",
    "scribble_xdog",
    "invert",
    "blur_gaussian",
    "threshold",
    "binary",
    "color",
)


class ControlNetUnit(BaseModel):
    """One ControlNet of a job: which net, its control image, and how strongly and over which part of the steps."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=255, description="a converted folder under CONTROLNET_DIR")]
    image: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_IMAGE_URL_CHARS,
            description="the control image (or the picture canny reads): http(s) URL, data URI or bare base64",
        ),
    ]
    conditioning_scale: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    control_guidance_start: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    control_guidance_end: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    preprocessor: Annotated[str, Field(min_length=1, max_length=64)] = "none"
    low_threshold: Annotated[int, Field(ge=1, le=255)] = 100
    high_threshold: Annotated[int, Field(ge=1, le=255)] = 200

    _floats_from_ints = field_validator(
        "conditioning_scale", "control_guidance_start", "control_guidance_end", mode="before"
    )(number_from_int)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith(".") or "\x00" in value:
            raise ValueError("a folder name under CONTROLNET_DIR (no path separators, not starting with '.')")
        return value

    @field_validator("image")
    @classmethod
    def _image_kind(cls, value: str) -> str:
        check_image_reference(value)
        return value

    @field_validator("preprocessor")
    @classmethod
    def _known_preprocessor(cls, value: str) -> str:
        name = value.strip().lower()
        if name in PREPROCESSORS:
            return name
        accepted = ", ".join(PREPROCESSORS)
        if name in MODEL_PREPROCESSORS:
            raise ValueError(
                f"{value!r} needs an annotator model, which this worker does not run; make the control image "
                f"yourself and send it with preprocessor 'none' (this worker runs: {accepted})"
            )
        if name in OTHER_PREPROCESSORS:
            raise ValueError(
                f"{value!r} is an sd-webui-controlnet preprocessor this worker does not run; prepare the control "
                f"image yourself and send it with preprocessor 'none' (this worker runs: {accepted})"
            )
        raise ValueError(f"unknown preprocessor; this worker runs: {accepted} ('none': image is the control image)")

    @model_validator(mode="after")
    def _consistent(self) -> ControlNetUnit:
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError(
                f"control_guidance_start {self.control_guidance_start:g} must be below control_guidance_end "
                f"{self.control_guidance_end:g} (the fraction of the steps the ControlNet acts on)"
            )
        thresholds = {"low_threshold", "high_threshold"} & self.model_fields_set
        if thresholds and self.preprocessor != "canny":
            raise ValueError(f"{' and '.join(sorted(thresholds))} apply to preprocessor 'canny' only")
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold {self.low_threshold} is above high_threshold {self.high_threshold}: edges start "
                "above the high one and continue above the low one"
            )
        return self


class ControlNetFields(BaseModel):
    """The request's ControlNet units (several at once: their residuals add up, as diffusers' MultiControlNet)."""

    model_config = REQUEST_CONFIG

    controlnets: Annotated[
        list[ControlNetUnit],
        GROUP,
        Field(
            max_length=MAX_CONTROLNETS,
            description='[{"name": folder under CONTROLNET_DIR, "image": URL/data URI/base64, "conditioning_scale": '
            '0..2 (1), "control_guidance_start"/"control_guidance_end": 0..1 (0, 1), "preprocessor": "none" | '
            '"canny", "low_threshold"/"high_threshold": 1..255 (100, 200, canny)}]',
        ),
    ] = []
