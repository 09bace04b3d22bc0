"""Mask arithmetic of inpainting, in pixels: blur, fill, the crop around the masked area, outpainting's canvas and
pasting the result back. A1111 1.10's ``modules/processing.py`` (``StableDiffusionProcessingImg2Img.init``),
``modules/masking.py`` and ``scripts/poor_mans_outpainting.py`` are the reference; what differs is said where.

Masks are 8-bit grey ``L`` images: 255 repaints, 0 keeps, levels between are a soft edge. The denoising reads the
mask cut at 50% (diffusers' mask processor binarizes it, as A1111 rounds its latent mask); the paste-back reads the
levels, so a grey edge blends the new pixels into the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from core.errors import InvalidRequest

LATENT_SCALE = 8  # SDXL's VAE: one latent cell per 8x8 pixels
HALF = 128  # diffusers binarizes v/255 >= 0.5, i.e. v >= 127.5


def blur(mask: Image.Image, sigma: int) -> Image.Image:
    """A Gaussian blur of standard deviation ``sigma`` pixels (A1111's ``mask_blur``).

    Pillow's Gaussian (three box passes of that deviation) rather than OpenCV's exact kernel, which A1111 uses and
    this worker does not ship: the two differ by a few grey levels inside the soft edge.
    """
    return mask.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else mask


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's ``masking.fill`` (``inpainting_fill`` 0): the masked area painted with its surroundings' colours,
    blurred in from ever smaller radii, so denoising starts from matching colours rather than from what was there."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def crop_region(mask: Image.Image, width: int, height: int, padding: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around every non-zero mask pixel, ``padding`` wider on each side and grown to the
    ``width`` / ``height`` aspect within the image: A1111 1.10's ``get_crop_region_v2`` + ``expand_crop_region``,
    which diffusers carries as ``VaeImageProcessor.get_crop_region``."""
    from diffusers.image_processor import VaeImageProcessor

    return tuple(int(v) for v in VaeImageProcessor.get_crop_region(mask, width, height, pad=padding))  # type: ignore[return-value]


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` where ``mask`` is 255, ``original`` where it is 0, mixed linearly between (A1111's overlay)."""
    return Image.composite(generated, original, mask)


def doubled(mask: Image.Image) -> Image.Image:
    """The whole-picture paste-back mask: A1111 doubles the blurred mask (clipped), so the repainted area is pasted
    fully from 50% on and only the outer half of the soft edge blends."""
    return mask.point(lambda value: min(255, 2 * value))


@dataclass(frozen=True)
class Canvas:
    """Outpainting's canvas: the image padded, the mask over the new area, where the original sits."""

    image: Image.Image
    mask: Image.Image
    offset: tuple[int, int]


def outpaint_canvas(
    image: Image.Image, mask: Image.Image | None, sides: tuple[int, int, int, int], overlap: int
) -> Canvas:
    """``image`` padded by ``sides`` (left, top, right, bottom) pixels, the new area pre-filled by repeating the edge
    pixels (a start that continues the image's colours; ``inpainting_fill`` decides what denoising makes of it).

    The mask covers the new area and reaches ``overlap`` pixels into the original on each extended side (A1111's
    poor man's outpainting overlaps by its mask blur), so the seam is repainted rather than blurred half-way; a
    given mask keeps its own pixels inside the original.
    """
    left, top, right, bottom = sides
    pixels = np.asarray(image.convert("RGB"))
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    height, width = padded.shape[:2]
    inner = np.zeros((image.height, image.width), np.uint8) if mask is None else np.asarray(mask, np.uint8)
    new = np.pad(inner, ((top, bottom), (left, right)), constant_values=255)
    # The overlap band inside the original, on the extended sides only.
    x1, y1 = left + (overlap if left else 0), top + (overlap if top else 0)
    x2, y2 = left + image.width - (overlap if right else 0), top + image.height - (overlap if bottom else 0)
    band = np.full((height, width), 255, np.uint8)
    band[max(y1, top) : max(y2, top), max(x1, left) : max(x2, left)] = 0
    return Canvas(Image.fromarray(padded), Image.fromarray(np.maximum(new, band)), (left, top))


def match_size(mask: Image.Image, size: tuple[int, int], field: str) -> tuple[Image.Image, str | None]:
    """``mask`` at the image's ``size``: resized when only the scale differs (a mask drawn on a preview), with a
    note for the metadata; refused when the aspect differs, since stretching would move the masked area."""
    if mask.size == size:
        return mask, None
    (mask_w, mask_h), (width, height) = mask.size, size
    # Same aspect when a side of the mask is within a pixel of the image's side at the mask's scale (a preview's
    # sides were rounded to whole pixels).
    if abs(mask_w - width * mask_h / height) > 1 and abs(mask_h - height * mask_w / width) > 1:
        raise InvalidRequest(
            f"{field}: the mask is {mask_w}x{mask_h} but the image is {width}x{height}, another aspect ratio; send a "
            "mask of the image's size (or of its aspect: it is then resized)"
        )
    # Bilinear, not A1111's Lanczos: Lanczos rings, and a faint halo around the mask would let the paste-back touch
    # pixels far from it.
    return mask.resize(size, Image.Resampling.BILINEAR), f"resized from {mask_w}x{mask_h} to {width}x{height}"


@dataclass(frozen=True)
class MaskStats:
    """What a mask asks for, for the metadata: shares of its pixels."""

    masked: float  # at least 50% (what denoising repaints)
    soft: float  # strictly between 0 and 255 (a soft edge or a grey mask)

    @classmethod
    def of(cls, mask: Image.Image) -> MaskStats:
        values = np.asarray(mask)
        return cls(float((values >= HALF).mean()), float(((values > 0) & (values < 255)).mean()))

    def describe(self) -> dict[str, float]:
        return {"masked_fraction": round(self.masked, 6), "soft_fraction": round(self.soft, 6)}


def latent_cells(mask: Image.Image) -> np.ndarray:
    """The mask as denoising reads it: cut at 50%, then one cell per 8x8 pixels by nearest neighbour (diffusers'
    ``prepare_mask_latents`` interpolates the binarized mask with torch's default, which picks each block's
    top-left pixel)."""
    return (np.asarray(mask) >= HALF)[::LATENT_SCALE, ::LATENT_SCALE]
