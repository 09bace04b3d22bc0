"""Tiled VAE decode and encode for large images, with diffusers' own ``AutoencoderKL`` tiling.

Above ``VAE_TILE_PIXELS`` pixels per image the VAE works in tiles of its config's ``sample_size`` (1024 px for SDXL:
128 latent pixels) that overlap by a quarter and are blended linearly (diffusers 0.42.1 ``tiled_decode`` /
``_tiled_encode``), so its memory follows the tile, not the image. diffusers tiles only an image with a side longer
than one tile, so images up to 1024 a side are never tiled whatever the setting. Tiling changes the result a little
(each tile's GroupNorm statistics and mid-block attention see only that tile; ``bench/vae_tiling.py`` measures by how
much), which is why it is a threshold and not always on.

``use_tiling`` is state on the shared VAE module: :func:`vae_tiling` sets it for one call and restores it, so one
job's tiling never reaches the next job. So is the VAE's dtype: diffusers' img2img and inpainting pipelines (0.42.1,
``prepare_latents`` / ``_encode_vae_image``) upcast a ``force_upcast`` VAE to fp32 to encode and then cast it to the
latents' dtype, fp16 on the GPU, for good; every later decode would then run in fp16, where the stock SDXL VAE
overflows (NaN, black images; on the H200 smoke run of 2026-12-03 a plain job after an inpainting job no longer
matched its earlier bytes). The block restores the dtype the engine chose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def tile_side(vae: Any) -> int:
    """The VAE's tile side in pixels (diffusers' ``tile_sample_min_size``: its config's ``sample_size``)."""
    side = vae.tile_sample_min_size
    return int(side[0] if isinstance(side, list | tuple) else side)


def tiles(vae: Any, width: int, height: int, threshold_pixels: int) -> bool:
    """Whether an image of ``width`` x ``height`` goes through the VAE in tiles: over the threshold (0: never), and
    with a side longer than one tile (diffusers' own condition; otherwise it decodes whole anyway)."""
    if threshold_pixels <= 0 or width * height <= threshold_pixels:
        return False
    return max(width, height) > tile_side(vae)


@contextlib.contextmanager
def vae_tiling(vae: Any, width: int, height: int, threshold_pixels: int) -> Iterator[bool]:
    """Tile ``vae``'s decodes and encodes inside the block when an image of this size should be; yields whether.
    Its tiling and dtype are what they were before the block once it ends: its very weight tensors, put back when
    a cast replaced them (not cast back: a ``COMPILE=aot`` VAE decoder package reads those tensors, and its CUDA
    graphs their addresses)."""
    tiled = tiles(vae, width, height, threshold_pixels)
    before, dtype = vae.use_tiling, vae.dtype
    weights = {name: parameter.data for name, parameter in vae.named_parameters()}
    vae.use_tiling = tiled
    try:
        yield tiled
    finally:
        vae.use_tiling = before
        for name, parameter in vae.named_parameters():
            if parameter.data_ptr() != weights[name].data_ptr():  # cast (maybe there and back) inside the block
                parameter.data = weights[name]
        if vae.dtype != dtype:  # anything a cast reached that the weights above are not (none in SDXL's VAE)
            vae.to(dtype=dtype)
