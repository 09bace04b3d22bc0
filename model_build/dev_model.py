"""The built-in dev model: SDXL's architecture with seeded random weights.

``python -m model_build dev-checkpoint OUT.safetensors`` writes a tiny model (3 UNet levels with
SDXL's block structure, 4 VAE levels, a CLIP-L-style and an OpenCLIP-bigG-style text encoder) as
one single-file checkpoint in the original SDXL key layout, so the real conversion, loading,
prompt and LoRA code runs on it in seconds. ``--full-size`` writes the real SDXL base
architecture (about 7 GB in fp16) for memory and speed measurements.

``--refiner`` writes the matching refiner instead (4 UNet levels with the refiner's block
structure, the same VAE and OpenCLIP-style encoder, in the refiner's key layout). A component's
seeded weights depend only on its tensor names, shapes and the seed, so with the same seed the dev
refiner's VAE and text encoder are exactly the dev base's: a pair shares one latent space, as the
real base and refiner do.

``--inpainting`` writes the dev inpainting model: the dev base with a 9-channel UNet input (the
noisy latents, the mask and the masked image's latents), in the same key layout as
diffusers/stable-diffusion-xl-1.0-inpainting-0.1's single file. Its VAE and text encoders are the
dev base's, its UNet differs from the base's only in that first convolution.

``--v-prediction`` adds the two marker tensors v-prediction SDXL files carry (``v_pred`` and ``ztsnr``,
empty, as ComfyUI writes them): the same weights, converted as a zero-terminal-SNR v-prediction model.

Its weights are random: every image it makes is noise. The file says so in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_build.architectures import empty_component, family_of_config, load_component_config
from model_build.layout import to_original_layout
from model_build.prediction import MARKER_KEYS

DEV_MODEL_NOTICE = "sdxl-worker dev model: seeded RANDOM weights, every image it makes is noise"
DEV_METADATA_KEY = "sdxl_worker.dev_model"
_NORM_NAMES = ("norm", "ln_", "layer_norm")


def _seeded_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A reproducible tensor for one parameter, scaled so activations stay finite and lively."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        return values / math.sqrt(math.prod(shape[1:]))  # fan-in scaling
    if leaf == "weight" and any(part in name for part in _NORM_NAMES):
        return 1.0 + 0.1 * values
    return 0.02 * values


def dev_state_dict(config_name: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every component of ``config_name`` with seeded weights, in the original layout of its family."""
    family = family_of_config(config_name)
    checkpoint: dict[str, torch.Tensor] = {}
    for component in family.components:
        module = empty_component(config_name, component)  # meta: names and shapes, no memory
        weights = {
            key: _seeded_tensor(f"{component}.{key}", tuple(t.shape), seed).to(dtype)
            for key, t in module.state_dict().items()
        }
        config = load_component_config(config_name, component)
        checkpoint.update(to_original_layout(component, weights, config, family.name))
    return {key: tensor.contiguous() for key, tensor in checkpoint.items()}


def dev_config_name(full_size: bool = False, refiner: bool = False, inpainting: bool = False) -> str:
    """The shipped config a dev checkpoint is built from."""
    if refiner and inpainting:
        raise ValueError("a dev checkpoint is a base, an inpainting model or a refiner: not both")
    if refiner:
        return "sdxl_refiner" if full_size else "dev_refiner"
    if inpainting:
        return "sdxl_inpaint" if full_size else "dev_inpaint"
    return "sdxl_base" if full_size else "dev_tiny"


def write_dev_checkpoint(
    output: Path,
    full_size: bool = False,
    seed: int = 0,
    refiner: bool = False,
    inpainting: bool = False,
    v_prediction: bool = False,
) -> Path:
    """Write the dev base (``refiner``: the dev refiner, ``inpainting``: the dev inpainting model; ``v_prediction``:
    with the v_pred and ztsnr markers) as one single-file checkpoint; the same bytes every time."""
    config_name = dev_config_name(full_size, refiner, inpainting)
    dtype = torch.float16 if full_size else torch.float32
    state_dict = dev_state_dict(config_name, dtype, seed)
    if v_prediction:
        state_dict |= {marker: torch.tensor([]) for marker in MARKER_KEYS}
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    save_file(
        state_dict,
        str(partial),
        # One metadata key only: safetensors writes several in hash order, which would break byte-identity.
        metadata={DEV_METADATA_KEY: json.dumps({"config": config_name, "notice": DEV_MODEL_NOTICE, "seed": seed})},
    )
    partial.replace(output)
    return output
