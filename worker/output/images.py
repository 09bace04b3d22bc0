"""Encode PIL images to PNG/JPEG/WebP bytes carrying their generation parameters.

PNGs get an A1111-style ``parameters`` text chunk and JPEG/WebP the same text as EXIF
UserComment, so the files open with their settings in common UIs (A1111, ComfyUI readers,
Civitai). EXIF lives in one JPEG APP1 segment of at most 64 KiB, so for JPEG and WebP the embedded
text is cut to :data:`MAX_EXIF_PARAMETER_BYTES` (with a note saying so); the full text is always in
the job's metadata. PNG is written at compression level 1 (level 6 costs more time for a slightly
smaller file: ``bench/handler_overhead.py`` measures image encoding), on every core by :mod:`worker.output.png`
(Pillow's one-thread encoder for modes it does not write).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image, PngImagePlugin

from core.results import IMAGE_FORMATS, EncodedImage
from worker.output import png

PNG_COMPRESS_LEVEL = 1
# The UTF-16 parameters text in EXIF: a JPEG APP1 segment holds at most 65,533 bytes, with the EXIF header and
# IFD entries around the comment; 60,000 leaves room for them (Pillow refuses more: "EXIF data is too long").
MAX_EXIF_PARAMETER_BYTES = 60_000
TRUNCATION_NOTE = " … [truncated to fit the image format; the full text is in the job's metadata]"
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


def a1111_parameters(
    request: Any, seed: int, model_name: str, model_hash: str, loras: list[dict], embeddings: Sequence[dict] = ()
) -> str:
    """The settings text A1111 writes into its images (prompt, negative, then one settings line)."""
    settings = [
        f"Steps: {request.num_inference_steps}",
        f"Sampler: {request.sampling.sampler}",
        *_schedule_type(request),
        f"CFG scale: {request.guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model hash: {model_hash}",
        f"Model: {model_name}",
    ]
    if request.clip_skip:
        settings.append(f"Clip skip: {request.clip_skip + 1}")  # A1111 counts the default layer as 1
    if getattr(request, "enable_hr", False):
        settings += hires_parameters(request)
    if loras:
        settings.append("Lora weights: " + ", ".join(f"{lora['name']}: {lora['scale']:g}" for lora in loras))
    if embeddings:  # A1111's entry: quoted (it holds ", " and ": "), 12 hex digits of each file's sha256
        settings.append("TI hashes: " + json.dumps(", ".join(f"{e['name']}: {e['sha256'][:12]}" for e in embeddings)))
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return text + "\n" + ", ".join(settings)


def _schedule_type(request: Any) -> list[str]:
    """A1111 1.10 writes "Schedule type" beside the sampler (omitted for the sampler's Automatic)."""
    sampling = request.sampling
    if request.timesteps is not None or request.sigmas is not None:
        return ["Schedule type: custom"]
    if sampling.schedule == sampling.spec.automatic:
        return []
    return [f"Schedule type: {sampling.schedule}"]


def hires_parameters(request: Any) -> list[str]:
    """The hires fix's entries of A1111 1.10's settings line (its ``extra_generation_params`` for the pass)."""
    items = [f"Denoising strength: {request.denoising_strength:g}"]
    if request.hr_resize_x or request.hr_resize_y:
        items.append(f"Hires resize: {request.hr_resize_x}x{request.hr_resize_y}")
    else:
        items.append(f"Hires upscale: {request.hr_scale:g}")
    if request.hr_second_pass_steps:
        items.append(f"Hires steps: {request.hr_second_pass_steps}")
    items.append(f"Hires upscaler: {request.hr_upscaler}")
    if request.hr_sampler_name and request.hr_sampler_name != request.sampling.sampler:
        items.append(f"Hires sampler: {request.hr_sampler_name}")
    if request.hr_scheduler:
        items.append(f"Hires schedule type: {request.hr_scheduler}")
    for label, text in (("Hires prompt", request.hr_prompt), ("Hires negative prompt", request.hr_negative_prompt)):
        if text:
            items.append(f"{label}: {_quote(text)}")
    return items


def _quote(text: str) -> str:
    """A1111's infotext quoting (generation_parameters_copypaste.quote): JSON for text with , : or newlines."""
    return text if not any(mark in text for mark in ",:\n") else json.dumps(text, ensure_ascii=False)


# Control characters: the PNG spec forbids NUL in text chunks (strict decoders such as pngcheck reject the file)
# and discourages the rest; EXIF readers stop at NUL. A tab reads as a space; CR, other C0, DEL and C1 go.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def embeddable_text(parameters: str) -> str:
    """``parameters`` as an image file may carry it: newlines kept, tabs as spaces, other control characters dropped.

    Only the embedded copy changes; the job's metadata keeps the prompt exactly as sent.
    """
    return _CONTROL.sub("", parameters.replace("\t", " ").replace("\r\n", "\n"))


def fit_exif_parameters(parameters: str, limit: int = MAX_EXIF_PARAMETER_BYTES) -> str:
    """``parameters`` unchanged when its UTF-16 form fits ``limit`` bytes, else cut (on a character) with a note."""
    if len(parameters.encode("utf-16-be")) <= limit:
        return parameters
    room = limit - len(TRUNCATION_NOTE.encode("utf-16-be"))
    cut = parameters.encode("utf-16-be")[: room - room % 2].decode("utf-16-be", errors="ignore")
    return cut + TRUNCATION_NOTE


def encode_image(
    image: Image.Image, output_format: str, quality: int, seed: int, parameters: str | None = None
) -> EncodedImage:
    """One image as PNG/JPEG/WebP bytes with its parameters embedded."""
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format must be png, jpeg or webp, not {output_format!r}")
    parameters = embeddable_text(parameters) if parameters else parameters
    if output_format == "png" and png.supports(image):
        text = {"parameters": parameters} if parameters else None
        return EncodedImage(png.encode_png(image, text, PNG_COMPRESS_LEVEL), output_format, seed)
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    elif output_format in ("jpeg", "webp"):
        exif = Image.Exif()
        if parameters:
            # EXIF UserComment with the UNICODE character code, as A1111 writes it (UTF-16BE).
            text = fit_exif_parameters(parameters)
            exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
        save_format = "JPEG" if output_format == "jpeg" else "WEBP"
        image.save(buffer, format=save_format, quality=quality, exif=exif.tobytes())
    return EncodedImage(buffer.getvalue(), output_format, seed)


def read_parameters(data: bytes) -> str | None:
    """The embedded parameters text of an image made by :func:`encode_image` (for tests and tools)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return image.text.get("parameters")
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
        if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
            return comment[8:].decode("utf-16-be")
        return comment
