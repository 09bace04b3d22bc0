"""Images, masks and a base job for the inpainting tests (tests/worker/test_inpainting*.py)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

SIZE = (160, 128)  # not square: the crop grows to this aspect
BOX = (56, 40, 104, 88)  # the masked rectangle
JOB = {"prompt": "a red door", "num_inference_steps": 4, "seed": 21, "guidance_scale": 3.0, "negative_prompt": "blur"}


def picture(size: tuple[int, int] = SIZE) -> Image.Image:
    """An RGB image with structure everywhere, so a changed pixel shows."""
    y, x = np.indices((size[1], size[0]))
    return Image.fromarray(np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8))


def rectangle(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] = BOX, level: int = 255) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(level, box)
    return mask


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decoded(out: dict[str, Any], index: int = 0) -> np.ndarray:
    assert "error" not in out, out
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][index].split(",", 1)[1]))).convert("RGB"))
