"""Inpainting and outpainting fields, named and defaulted as A1111 1.10's ``/sdapi/v1/img2img`` takes them.

A1111 1.10 builds its img2img API model from ``StableDiffusionProcessingImg2Img``'s own defaults
(``modules/processing.py``, ``modules/api/models.py``): ``mask`` (base64), ``mask_blur`` 4, ``inpainting_fill`` 0
(fill), ``inpaint_full_res`` true ("Only masked"), ``inpaint_full_res_padding`` 0, ``inpainting_mask_invert`` 0.
Its UI starts elsewhere (whole picture, padding 32, original content); a payload gets the API's defaults, so do
these. ``mask_url`` is the same as ``mask`` under the official worker's ``image_url`` naming; ``outpaint`` has no
A1111 API field (A1111 outpaints by scripts) and pads the canvas by pixels per side.

What the values do is :mod:`worker.generation.inpainting`'s; this module only declares and bounds them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.request.fields import GROUP, MAX_IMAGE_URL_CHARS, MAX_SIDE, REQUEST_CONFIG, check_image_reference

MAX_MASK_BLUR = 64  # A1111's slider; a Gaussian of sigma 64 already spans 320 pixels
FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # A1111's "Masked content" names
Pixels = Annotated[int, Field(ge=0, le=MAX_SIDE)]


def _flag_from_int(value: Any) -> Any:
    # A1111's clients send these flags as 0/1 (its API types inpainting_mask_invert as int) or as booleans.
    return bool(value) if type(value) is int and value in (0, 1) else value


class Outpaint(BaseModel):
    """Pixels added on each side of the input image; the new area is masked and pre-filled from the edge."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    left: Pixels = 0
    right: Pixels = 0
    top: Pixels = 0
    bottom: Pixels = 0

    @model_validator(mode="after")
    def _some_side(self) -> Outpaint:
        if not any((self.left, self.right, self.top, self.bottom)):
            raise ValueError("adds no pixels; give left, right, top or bottom a number of pixels (> 0)")
        return self

    def sides(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.right, self.bottom


class InpaintingFields(BaseModel):
    """Masked img2img: where to repaint (``mask``/``mask_url``, or the ``outpaint`` border), and how."""

    model_config = REQUEST_CONFIG

    mask: Annotated[
        str | None,
        GROUP,
        Field(
            max_length=MAX_IMAGE_URL_CHARS,
            description="inpainting (needs image_url): white = repaint, black = keep, grey = soft edge; an image with "
            "transparency masks its opaque part (A1111); URL, data URI or base64 as image_url; resized to the image "
            "when only the scale differs",
        ),
    ] = None
    mask_url: Annotated[
        str | None,
        GROUP,
        Field(max_length=MAX_IMAGE_URL_CHARS, description="the same as mask (give one of them)"),
    ] = None
    mask_blur: Annotated[
        int,
        GROUP,
        Field(ge=0, le=MAX_MASK_BLUR, description="Gaussian blur of the mask's edge, pixels (A1111's sigma)"),
    ] = 4
    inpainting_fill: Annotated[
        int,
        GROUP,
        Field(
            ge=0,
            le=3,
            description="what the masked area starts from: 0 its surroundings blurred in, 1 the original, 2 latent "
            "noise, 3 latent zeros (A1111's masked content)",
        ),
    ] = 0
    inpaint_full_res: Annotated[
        bool,
        GROUP,
        Field(
            description="true: generate only the masked area (with padding) at width x height and paste it back "
            "(A1111's 'only masked', its API default); false: the whole picture"
        ),
    ] = True
    inpaint_full_res_padding: Annotated[
        int,
        GROUP,
        Field(ge=0, le=MAX_SIDE, description="pixels of context around the masked area with inpaint_full_res"),
    ] = 0
    inpainting_mask_invert: Annotated[
        bool, GROUP, Field(description="repaint the black part of the mask instead (0/1 as A1111, or true/false)")
    ] = False
    outpaint: Annotated[
        Outpaint | None,
        GROUP,
        Field(
            description='extend the canvas (needs image_url): {"left": px, "right": px, "top": px, "bottom": px}, '
            "0..2048 each; the new area is repainted"
        ),
    ] = None

    _flags_from_ints = field_validator("inpaint_full_res", "inpainting_mask_invert", mode="before")(_flag_from_int)

    @field_validator("mask", "mask_url")
    @classmethod
    def _mask_kind(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None  # A1111's clients send "" or null for "no mask"
        check_image_reference(value)
        return value

    @model_validator(mode="after")
    def _one_mask(self) -> InpaintingFields:
        if self.mask is not None and self.mask_url is not None:
            raise ValueError("mask_url: the same field as mask under another name; give only one of them")
        return self

    @property
    def mask_source(self) -> tuple[str, str] | None:
        """(the field the mask came as, its value), or None without a mask."""
        if self.mask is not None:
            return "mask", self.mask
        if self.mask_url is not None:
            return "mask_url", self.mask_url
        return None

    @property
    def is_inpainting(self) -> bool:
        """Whether the job repaints a masked area: a mask, an outpaint border, or both."""
        return self.mask_source is not None or self.outpaint is not None

    @property
    def fill_name(self) -> str:
        return FILL_MODES[self.inpainting_fill]
