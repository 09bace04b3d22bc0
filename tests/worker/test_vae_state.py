"""The shared VAE leaves a pipeline call as it entered: tiling and dtype.

diffusers' img2img and inpainting pipelines cast a ``force_upcast`` VAE to the latents' dtype after encoding (fp16 on
a GPU), for good. On the CPU the engine runs fp32, so no job shows it there; this test runs diffusers' own encode step
with fp16 latents on the dev model's fp32 VAE, which casts it exactly as a GPU job does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from tests.support.dev_pipes import load_dev_pipe
from worker.generation.vae_tiling import vae_tiling


def test_diffusers_encode_casts_the_vae_and_the_block_restores_it(dev_model_dir: Path) -> None:
    pipe = load_dev_pipe(dev_model_dir)
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    vae = img2img.vae
    vae.config.force_upcast = True  # the stock SDXL VAE's config (the engine keeps such a VAE in fp32)
    image = img2img.image_processor.preprocess(Image.new("RGB", (64, 64), (200, 80, 40)))

    def encode() -> None:
        img2img.prepare_latents(image, torch.tensor([999]), 1, 1, torch.float16, torch.device("cpu"), None)

    encode()
    assert vae.dtype == torch.float16, "diffusers 0.42.1 casts the VAE to the latents' dtype (the bug's cause)"
    vae.to(torch.float32)
    addresses = [parameter.data_ptr() for parameter in vae.parameters()]
    with vae_tiling(vae, 64, 64, 0) as tiled:
        encode()
    assert not tiled and not vae.use_tiling
    assert vae.dtype == torch.float32 and all(p.dtype == torch.float32 for p in vae.parameters())
    # the very tensors, not a cast back: a COMPILE=aot decoder package and its CUDA graphs read them
    assert [parameter.data_ptr() for parameter in vae.parameters()] == addresses
