"""Inpainting and outpainting: from the request's image and mask to what the pipeline starts from, and back.

:func:`plan_inpainting` follows A1111 1.10's ``StableDiffusionProcessingImg2Img.init`` step for step: the mask is
read (:func:`worker.request.input_images.to_mask`), matched to the image, inverted when asked, padded for
``outpaint``, blurred; then either the whole picture is resized to the generation size, or (``inpaint_full_res``)
the masked area plus padding, grown to the generation size's aspect, is cropped and resized to it; the masked part
is pre-filled (``inpainting_fill``). :meth:`InpaintPlan.composite` pastes each generated image back: the crop
resized into its box, then the original everywhere the blurred mask is 0, blended where it is grey (A1111's
overlay; A1111 doubles the mask first for the whole picture, and so does this). So every pixel the blurred mask
leaves at 0 is the input's own pixel, at the output size (for the whole picture: the input resized to width x
height when they differ from its size).

The denoising itself is :meth:`worker.generation.stages.StageRunner.inpaint` (diffusers'
``StableDiffusionXLInpaintPipeline`` on the base's own modules).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from core.errors import ConfigurationError, InvalidRequest
from core.settings import Settings
from worker.generation import masks
from worker.request.fields import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from worker.request.input_images import load_input_image, load_input_mask
from worker.request.schema import GenerationRequest


@dataclass
class InpaintPlan:
    """What one inpainting call starts from (at the generation ``size``) and how its results go back."""

    image: Image.Image  # the start image, pre-filled per inpainting_fill
    mask: Image.Image  # the processed mask the pipeline reads (cut at 50%)
    size: tuple[int, int]  # generation width, height
    original: Image.Image  # the picture the results are pasted into, at the output size
    paste_mask: Image.Image  # where (and how much) a result replaces original, at the output size
    crop_box: tuple[int, int, int, int] | None  # inpaint_full_res: the area generated, in output pixels
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.original.size

    def composite(self, generated: Image.Image) -> Image.Image:
        """One generated image pasted back into the original (see the module docstring)."""
        if self.crop_box is not None:
            x1, y1, x2, y2 = self.crop_box
            canvas = self.original.copy()
            canvas.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            generated = canvas
        return masks.composite(self.original, generated, self.paste_mask)


def check_inpainting_model(is_inpainting_model: bool, settings: Settings) -> None:
    """Start-up: the speed-ups that warm up with a text-to-image call (COMPILE, COMPILE_VAE) cannot run on an
    inpainting model, which takes masked calls only; refused rather than left to fail inside the warm-up."""
    if is_inpainting_model and (settings.compile != "off" or settings.compile_vae):
        raise ConfigurationError(
            "COMPILE / COMPILE_VAE: compiling is not available with an SDXL inpainting model as MODEL_DIR yet (its "
            "warm-up runs text-to-image, which a 9-channel UNet does not take); set COMPILE=off and COMPILE_VAE=0"
        )


def warm_up_fields(width: int, height: int) -> dict[str, Any]:
    """The image and mask a start-up warm-up job sends to an inpainting model: grey, with the middle masked."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width * 3 // 4, height * 3 // 4))
    return {"image_url": _data_uri(Image.new("RGB", (width, height), (128, 128, 128))), "mask": _data_uri(mask)}


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def check_inpainting(request: GenerationRequest, model_name: str, is_inpainting_model: bool) -> None:
    """What the loaded model refuses: a 9-channel inpainting UNet takes only masked jobs; ControlNets do not run
    with a mask yet (diffusers' ControlNet inpainting pipeline is not wired in)."""
    if request.controlnets and request.is_inpainting:
        raise InvalidRequest(
            "controlnets: inpainting with ControlNets is not available yet; send the job without controlnets"
        )
    if is_inpainting_model and not request.is_inpainting:
        raise InvalidRequest(
            f"mask: this worker serves {model_name}, an SDXL inpainting model (9-channel UNet), which only repaints "
            "masked areas; send image_url with a mask (or outpaint), or use a normal SDXL checkpoint for "
            "text-to-image and img2img"
        )


def generation_size(request: GenerationRequest, picture: tuple[int, int], field: str) -> tuple[int, int]:
    """The size the model runs at: width x height when given, else the picture's rounded down to a multiple of 8."""
    if request.size_given:
        return request.width, request.height
    width, height = (side - side % SIDE_MULTIPLE for side in picture)
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        raise InvalidRequest(
            f"{field}: the picture to paint is {picture[0]}x{picture[1]}; without width/height the model runs at "
            f"its size, which must be {MIN_SIDE}..{MAX_SIDE} a side: give width and height"
        )
    return width, height


def _check_budget(output: tuple[int, int], num_images: int, budget: int, field: str) -> None:
    pixels = output[0] * output[1] * num_images
    if pixels > budget:
        raise InvalidRequest(
            f"{field}: the result would be {output[0]}x{output[1]} x {num_images} image(s) = {pixels} pixels, over "
            f"this worker's budget of {budget} (MAX_JOB_PIXELS); send a smaller image, fewer pixels or num_images"
        )


def _read_mask(request: GenerationRequest, size: tuple[int, int], settings: Settings) -> tuple[Any, dict]:
    """The request's mask at the image's size and inverted as asked (None with outpainting alone), and its notes."""
    source = request.mask_source
    if source is None:
        return None, {}
    name, value = source
    mask, note = masks.match_size(load_input_mask(value, settings, name), size, name)
    if request.inpainting_mask_invert:
        mask = Image.eval(mask, lambda level: 255 - level)
    if mask.getextrema()[1] == 0 and request.outpaint is None:
        colour = "white (inpainting_mask_invert repaints the black part)" if request.inpainting_mask_invert else "black"
        raise InvalidRequest(
            f"{name}: the mask is all {colour}: nothing to inpaint; paint white where the image should change, or "
            "leave the mask out for plain img2img"
        )
    return mask, {"resized": note} if note else {}


def plan_inpainting(
    request: GenerationRequest, settings: Settings, num_images: int, is_inpainting_model: bool
) -> InpaintPlan:
    """Download the image and mask and prepare the call (``num_images``: the most any request of the call asks)."""
    field = request.mask_source[0] if request.mask_source else "outpaint"
    source = load_input_image(request.image_url or "", settings)
    left, top, right, bottom = request.outpaint.sides() if request.outpaint else (0, 0, 0, 0)
    picture_size = (source.width + left + right, source.height + top + bottom)
    size = generation_size(request, picture_size, "outpaint" if request.outpaint else "image_url")
    # Before any pixel work: the output is the whole picture with inpaint_full_res, else the generation size.
    _check_budget(picture_size if request.inpaint_full_res else size, num_images, settings.max_job_pixels, field)
    mask, mask_notes = _read_mask(request, source.size, settings)
    picture, outpaint_info = source, None
    if request.outpaint is not None:
        canvas = masks.outpaint_canvas(source, mask, request.outpaint.sides(), overlap=2 * request.mask_blur)
        picture, mask = canvas.image, canvas.mask
        outpaint_info = {**request.outpaint.model_dump(), "canvas": list(picture.size), "offset": list(canvas.offset)}
    stats = masks.MaskStats.of(mask)
    blurred = masks.blur(mask, request.mask_blur)

    crop_box = None
    if request.inpaint_full_res:
        crop_box = masks.crop_region(blurred, size[0], size[1], request.inpaint_full_res_padding)
        original, paste_mask = picture, blurred
        image = picture.crop(crop_box).resize(size, Image.Resampling.LANCZOS)
        mask_at_size = blurred.crop(crop_box).resize(size, Image.Resampling.LANCZOS)
    else:
        original = picture if picture.size == size else picture.resize(size, Image.Resampling.LANCZOS)
        mask_at_size = blurred if blurred.size == size else blurred.resize(size, Image.Resampling.LANCZOS)
        image, paste_mask = original, masks.doubled(mask_at_size)

    cells = masks.latent_cells(mask_at_size)
    if not cells.any():
        raise InvalidRequest(
            f"{field}: after mask_blur {request.mask_blur} no 8x8 cell of the {size[0]}x{size[1]} generation reaches "
            "50% of the mask, so nothing would be repainted; widen the masked area, lower mask_blur, or set "
            "inpaint_full_res: true to generate the masked area at full size"
        )
    if request.inpainting_fill != 1:  # A1111 fills the pixels for the latent fills too (their edges encode it)
        image = masks.fill(image, mask_at_size)

    info: dict[str, Any] = {
        "mask": {
            "field": field if field != "outpaint" else None,
            **mask_notes,
            "inverted": request.inpainting_mask_invert,
            "blur": request.mask_blur,
            **stats.describe(),
            "repainted_latent_fraction": round(float(np.mean(cells)), 6),
        },
        "fill": request.fill_name,
        "inpaint_full_res": request.inpaint_full_res,
        "padding": request.inpaint_full_res_padding if request.inpaint_full_res else None,
        "crop_box": list(crop_box) if crop_box else None,
        "input_size": list(source.size),
        "generation_size": list(size),
        "outpaint": outpaint_info,
        "model": "inpainting" if is_inpainting_model else "base",
    }
    return InpaintPlan(image, mask_at_size, size, original, paste_mask, crop_box, info)


def latent_start(
    pipe: Any, plan: InpaintPlan, fill: int, seeds: list[int], generators: list[torch.Generator]
) -> dict[str, Any]:
    """The pipeline's ``image`` argument (and a 9-channel UNet's ``masked_image_latents``) for ``inpainting_fill``.

    Fills 0 and 1 are pixels: the pipeline encodes them. Fills 2 and 3 are A1111's latent fills: the masked cells of
    the image's latents become unit Gaussian noise (from each image's seed, as A1111 draws it) or zeros before
    denoising adds its noise at ``strength``; at strength 1 diffusers starts from pure noise, so the fills differ
    only below 1. The latents come from the pipeline's own VAE encoding (``_encode_vae_image``, the one a pixel
    input goes through) and cells from the mask as the pipeline reads it (cut at 50%, nearest per 8x8 cell).
    """
    if fill in (0, 1):
        return {"image": [plan.image] * len(seeds)}
    width, height = plan.size
    device, dtype = pipe._execution_device, pipe.unet.dtype
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(plan.image, height=height, width=width).to(device, dtype)
        pixels = pixels.repeat(len(seeds), 1, 1, 1)
        latents = pipe._encode_vae_image(pixels, generator=generators)
        binary = pipe.mask_processor.preprocess(plan.mask, height=height, width=width).to(device, dtype)
        cells = torch.nn.functional.interpolate(binary, size=latents.shape[-2:])
        latents = latents * (1 - cells)
        if fill == 2:
            noise = [
                randn_tensor((1, *latents.shape[1:]), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds
            ]
            latents = latents + torch.cat(noise).to(device, dtype) * cells
        start: dict[str, Any] = {"image": latents}
        if pipe.unet.config.in_channels == 9:  # the pipeline masks and encodes pixels only when given pixels
            start["masked_image_latents"] = pipe._encode_vae_image(pixels * (binary < 0.5), generator=generators)
    return start
