"""The dev ControlNet: SDXL's ControlNet architecture, scaled to the dev UNet, with seeded random weights.

``python -m model_build dev-controlnet OUT.safetensors`` writes it as one file in the original ControlNet layout
(``control_model.*``, lllyasviel's names), so converting it runs the converter's original-layout path, diffusers'
key map and the gap this project fills (:mod:`model_build.controlnet_layout`); ``--diffusers-layout`` writes
diffusers' names instead. ``--full-size`` writes the real SDXL ControlNet architecture (about 2.5 GB in fp16).

Unlike a freshly initialised ControlNet, whose zero convolutions make it do nothing, every tensor is random, so a
job with it differs from one without it. Its images are noise, as the dev model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_build.controlnet import DEV_CONTROLNET_METADATA_KEY
from model_build.controlnet_layout import controlnet_config, empty_controlnet, to_layout
from model_build.dev_model import DEV_MODEL_NOTICE, _seeded_tensor


def dev_controlnet_state_dict(full_size: bool = False, layout: str = "original", seed: int = 0) -> dict:
    """The dev (or full-size) ControlNet's seeded tensors under the names of ``layout``."""
    name = "sdxl_controlnet" if full_size else "dev_controlnet"
    dtype = torch.float16 if full_size else torch.float32
    weights = {
        key: _seeded_tensor(f"controlnet.{key}", tuple(t.shape), seed).to(dtype)
        for key, t in empty_controlnet(name).state_dict().items()
    }
    return {key: t.contiguous() for key, t in to_layout(weights, controlnet_config(name), layout).items()}


def write_dev_controlnet(output: Path, full_size: bool = False, layout: str = "original", seed: int = 0) -> Path:
    """Write the dev ControlNet as one single file; the same bytes every time."""
    state_dict = dev_controlnet_state_dict(full_size, layout, seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    notice = {"notice": DEV_MODEL_NOTICE, "seed": seed, "layout": layout}
    save_file(state_dict, str(partial), metadata={DEV_CONTROLNET_METADATA_KEY: json.dumps(notice)})
    partial.replace(output)
    return output
