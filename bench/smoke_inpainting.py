"""The smoke's inpainting checks (bench/smoke.py): a base model inpainting and outpainting the square job's image, and
a 9-channel inpainting model that repaints a masked area and refuses a job without a mask.

Each returns the check's details with ``ok``; the pixels a job must keep (outside the blurred mask, where A1111's
overlay keeps the input's) are computed here from the mask and the blur the request gives, not read from the worker.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

BLUR = 4  # A1111's API default mask_blur, which these jobs use


def run_job(worker: Any, name: str, **fields: Any) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    output = worker.handle({"id": f"smoke-{name}", "input": fields})
    return output, time.perf_counter() - started


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def centred_mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size * 3 // 4, size * 3 // 4))
    return mask


def kept_outside(mask: Image.Image, result: np.ndarray, source: np.ndarray) -> bool:
    """Whether ``result`` holds ``source``'s pixels wherever the blurred ``mask`` is 0."""
    keep = np.asarray(mask.filter(ImageFilter.GaussianBlur(BLUR))) == 0
    return result.shape == source.shape and bool(np.array_equal(result[keep], source[keep]))


def inpaint_check(worker: Any, base: dict[str, Any], first: dict[str, Any], size: int) -> dict[str, Any]:
    """Inpaint a centred square of the first job's image (A1111's API defaults: only masked, fill, blur 4): one image
    of the input's size whose pixels outside the blurred mask are the input's."""
    if "error" in first:
        return {"ok": False, "error": "the square job failed"}
    mask = centred_mask(size)
    fields = {**base, "image_url": first["images"][0], "mask": png_base64(mask)}
    output, seconds = run_job(worker, "inpaint", **fields, seed=11)
    if "error" in output:
        return {"ok": False, "error": output["error"], "seconds": round(seconds, 2)}
    kept = kept_outside(mask, pixels(output["images"][0]), pixels(first["images"][0]))
    return {
        "ok": kept,
        "seconds": round(seconds, 2),
        "unmasked_pixels_kept": kept,
        "inpainting": output["metadata"].get("inpainting"),
        "timings": output["metadata"].get("timings"),
    }


def outpaint_check(worker: Any, base: dict[str, Any], first: dict[str, Any], size: int) -> dict[str, Any]:
    """Outpaint the first job's image by ``size // 8`` pixels left and right (128 at 1024²), the model running at
    the whole new canvas: an image of the canvas's size whose pixels away from the new borders (the mask reaches
    2 x mask_blur into the original, then blurs) are the input's, shifted right by the left border."""
    if "error" in first:
        return {"ok": False, "error": "the square job failed"}
    pad = size // 8
    width = size + 2 * pad
    outpaint = {"left": pad, "right": pad}
    fields = {**base, "width": width, "height": size, "image_url": first["images"][0], "outpaint": outpaint}
    output, seconds = run_job(worker, "outpaint", **fields, seed=12)
    if "error" in output:
        return {"ok": False, "error": output["error"], "seconds": round(seconds, 2)}
    result = pixels(output["images"][0])
    border = Image.new("L", (width, size), 255)
    border.paste(0, (pad + 2 * BLUR, 0, pad + size - 2 * BLUR, size))
    placed = np.zeros((size, width, 3), np.uint8)
    placed[:, pad : pad + size] = pixels(first["images"][0])
    sized = result.shape[:2] == (size, width)
    kept = sized and kept_outside(border, result, placed)
    return {
        "ok": kept and output["metadata"].get("mode") == "outpaint",
        "seconds": round(seconds, 2),
        "size": [result.shape[1], result.shape[0]],
        "expected_size": [width, size],
        "original_pixels_kept": kept,
        "outpaint": output["metadata"].get("inpainting", {}).get("outpaint"),
        "timings": output["metadata"].get("timings"),
    }


def inpaint_model_checks(
    worker: Any, base: dict[str, Any], image: str, size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a worker serving a 9-channel inpainting model, with ``image`` (a data URI of ``size``²): a masked job keeps
    the unmasked pixels and says the inpainting model ran; a job without a mask is refused naming ``mask``, and the
    masked job again gives the same bytes (the refusal changed nothing)."""
    mask = centred_mask(size)
    masked = {**base, "image_url": image, "mask": png_base64(mask)}
    output, seconds = run_job(worker, "inpaint-model", **masked, seed=11)
    info = output.get("metadata", {}).get("inpainting", {})
    kept = "error" not in output and kept_outside(mask, pixels(output["images"][0]), pixels(image))
    masked_job = {
        "ok": kept and info.get("model") == "inpainting",
        "seconds": round(seconds, 2),
        "error": output.get("error"),
        "unmasked_pixels_kept": kept,
        "inpainting": info,
        "timings": output.get("metadata", {}).get("timings"),
    }
    refused, refused_seconds = run_job(worker, "inpaint-model-unmasked", **base, image_url=image, seed=11)
    again, _ = run_job(worker, "inpaint-model-again", **masked, seed=11)
    names_mask = str(refused.get("error", "")).startswith("invalid input: mask:")
    same = "error" not in again and "error" not in output and again["images"] == output["images"]
    unmasked_job = {
        "ok": names_mask and same,
        "seconds": round(refused_seconds, 3),
        "error": refused.get("error"),
        "next_masked_job_equals_first": same,
    }
    return masked_job, unmasked_job
