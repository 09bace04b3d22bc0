"""A unit's control image at the output size: fitted as sd-webui-controlnet fits it, then preprocessed.

Fitting is sd-webui-controlnet's default resize mode, "Crop and Resize" (its ``INNER_FIT``): the image is scaled
until it covers the output, then centre-cropped, so nothing is stretched; an image of another size is resized that
way and the metadata says so. The preprocessor then runs on the fitted image at the output size, which is
sd-webui-controlnet's "Pixel Perfect" (the detector's resolution is the output's):

- ``none``: the image is the control image, used as sent (RGB);
- ``canny``: OpenCV's Canny edges (:mod:`.canny`) with the unit's thresholds, white edges on black as three equal
  channels, the map sd-webui-controlnet's canny makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from worker.adapters.controlnet.canny import canny


@dataclass(frozen=True)
class ControlImage:
    """A unit's control image at the output size, and how it got there (for the metadata)."""

    image: Image.Image
    input_size: tuple[int, int]
    resized: bool

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"input_size": list(self.input_size), "control_size": list(self.image.size)}
        if self.resized:
            info["note"] = (
                f"the control image ({self.input_size[0]}x{self.input_size[1]}) was scaled to cover "
                f"{self.image.size[0]}x{self.image.size[1]} and centre-cropped "
                "(sd-webui-controlnet's 'Crop and Resize')"
            )
        return info


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``size`` (width, height), keeping its aspect ratio, and crop the centre."""
    if image.size == size:
        return image
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def control_image(image: Image.Image, size: tuple[int, int], unit: Any) -> ControlImage:
    """``unit``'s (a :class:`worker.request.controlnet.ControlNetUnit`) control image for an output of ``size``."""
    fitted = fit(image.convert("RGB"), size)
    if unit.preprocessor == "canny":
        edges = canny(np.asarray(fitted), unit.low_threshold, unit.high_threshold)
        fitted = Image.fromarray(np.repeat(edges[..., None], 3, axis=2))
    return ControlImage(fitted, image.size, image.size != size)
