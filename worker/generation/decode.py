"""Latents to images through the VAE (in tiles above a size, :mod:`.vae_tiling`), refusing what must not be
returned: NaN images and all-black ones, whether the VAE ran whole or tiled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from core.errors import ImageQualityFailed
from worker.adapters.lora.manager import AppliedLora
from worker.generation.vae_tiling import vae_tiling


def decode_latents(
    pipe: Any,
    latents: torch.Tensor,
    device: torch.device | None,
    loras: Sequence[AppliedLora] = (),
    tile_pixels: int = 0,
) -> tuple[list[Image.Image], bool]:
    """``latents`` -> (PIL images, whether the VAE decoded in tiles) with ``pipe``'s VAE (on ``device``, or where the
    latents are when offloading); images of more than ``tile_pixels`` pixels are decoded in tiles (0: never)."""
    vae = pipe.vae
    height, width = (side * pipe.vae_scale_factor for side in latents.shape[-2:])
    with torch.inference_mode(), vae_tiling(vae, width, height, tile_pixels) as tiled:
        latents = latents.to(device=device if device is not None else latents.device)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        decoded = vae.decode(latents, return_dict=False)[0]
    if torch.isnan(decoded).any():
        if loras:
            names = ", ".join(f"{lora.name} ({lora.scale:g})" for lora in loras)
            raise ImageQualityFailed(
                f"the image came out as NaN with LoRAs {names} active; no image was returned. The likeliest "
                "cause is a LoRA scale too high or a broken LoRA: try a smaller scale or the job without it"
            )
        raise ImageQualityFailed(
            "the VAE produced NaN values (fp16 overflow or broken weights); no image was returned. "
            "Use a VAE that is safe in fp16 (--vae with the fp16-fix VAE) or convert with --dtype fp32"
        )
    black = [i for i in range(decoded.shape[0]) if bool((decoded[i] <= -1.0).all())]
    if black:
        raise ImageQualityFailed(f"image(s) {black} came out all black; no image was returned")
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil"), tiled
