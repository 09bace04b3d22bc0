"""SDXL ControlNets: the shipped configs, the two single-file layouts, and what every other ControlNet file is.

An SDXL ControlNet is the SDXL UNet's encoder half (``ControlNetModel.from_unet``) plus a conditioning-image
embedding and one zero convolution per residual. Two layouts of one file are in use, and diffusers 0.42.1's
``ControlNetModel.from_single_file`` reads both:

* ``diffusers``: the ``ControlNetModel`` state dict as saved by ``save_pretrained`` (``controlnet_cond_embedding.*``,
  ``down_blocks.*``, ``controlnet_down_blocks.*``...), which is how most SDXL ControlNets are published;
* ``original``: lllyasviel's ControlNet layout (``control_model.`` + the sgm UNet names, ``input_hint_block.*``,
  ``zero_convs.*``, ``middle_block_out.*``), or the same names without the ``control_model.`` prefix.

For the original layout diffusers' own key map (``convert_controlnet_checkpoint``) is used, with one gap filled:
it never maps ``label_emb`` (SDXL's text-time embedding) to ``add_embedding``, although the mapping table lists it,
so an SDXL ControlNet in that layout would lose those four tensors ("Cannot copy out of meta tensor").

Configs, like the checkpoint converter's, are chosen by exact tensor shapes: ``sdxl_controlnet`` (the SDXL base's
encoder, as diffusers/controlnet-canny-sdxl-1.0 and most community SDXL ControlNets) and ``dev_controlnet`` (the dev
UNet's, for tests). Each is ``ControlNetModel.from_unet``'s config for that UNet config, so its attention heads
(which no tensor shape shows) are the UNet's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from model_build.layout import _unet_key

CONTROLNET_FAMILY = "sdxl-controlnet"
ORIGINAL_PREFIX = "control_model."
# Shipped ControlNet config -> the shipped UNet config whose encoder it is.
CONTROLNET_CONFIGS: dict[str, str] = {"sdxl_controlnet": "sdxl_base", "dev_controlnet": "dev_tiny"}
LAYOUTS = ("diffusers", "original")

# What other ControlNet-like files are, by a tensor name each has (first match wins), and why they are refused.
FOREIGN_CONTROLNETS: tuple[tuple[str, str], ...] = (
    (
        "task_embedding",
        "a ControlNet-Union / ProMax (ControlNetUnionModel): diffusers 0.42.1's from_single_file loads only "
        "ControlNetModel-type files (it refuses ControlNetUnionModel), and a union net needs the separate union "
        "pipelines with a control type per image, which this worker does not run",
    ),
    ("lora_controlnet", "a Control-LoRA (Stability's LoRA-compressed ControlNet), which diffusers 0.42.1 cannot load"),
    ("lllite_", "a ControlNet-LLLite (kohya), a different architecture that diffusers 0.42.1 cannot load"),
    ("body.0.resnets.0.block1.weight", "a T2I-Adapter, not a ControlNet"),
    ("adapter.body.0.resnets.0.block1.weight", "a T2I-Adapter, not a ControlNet"),
)


@functools.cache
def controlnet_config(name: str) -> dict[str, Any]:
    """The ``ControlNetModel`` config of shipped ControlNet config ``name`` (from_unet of its UNet config)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    from model_build.architectures import config_dir

    if name not in CONTROLNET_CONFIGS:
        raise ValueError(f"unknown ControlNet config {name!r}; known: {', '.join(CONTROLNET_CONFIGS)}")
    unet_folder = config_dir(CONTROLNET_CONFIGS[name]) / "unet"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_folder))
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    config = {key: value for key, value in dict(net.config).items() if not key.startswith("_")}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def empty_controlnet(name: str) -> torch.nn.Module:
    """The ControlNet of config ``name`` on the meta device (names and shapes, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        return ControlNetModel.from_config(controlnet_config(name))


def original_key(key: str, config: Mapping[str, Any]) -> str:
    """The original-layout name (without ``control_model.``) of a diffusers ControlNet tensor name."""
    if key.startswith("add_embedding.linear_1."):
        return "label_emb.0.0." + key.removeprefix("add_embedding.linear_1.")
    if key.startswith("add_embedding.linear_2."):
        return "label_emb.0.2." + key.removeprefix("add_embedding.linear_2.")
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(.+)", key):
        return f"input_hint_block.0.{m[1]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"  # a SiLU between every two convolutions
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", key):
        blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
        return f"input_hint_block.{2 * (blocks + 1)}.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_mid_block\.(.+)", key):
        return f"middle_block_out.0.{m[1]}"
    # The encoder half shares the UNet's names; a ControlNet has no up blocks, so no upsampler index is asked for.
    return _unet_key(key, config["layers_per_block"], ())


def to_layout(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], layout: str) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict under the names of ``layout`` (works on meta tensors)."""
    if layout == "diffusers":
        return dict(state)
    return {ORIGINAL_PREFIX + original_key(key, config): tensor for key, tensor in state.items()}


@functools.cache
def expected_shapes(name: str, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a ControlNet file of config ``name`` in ``layout`` must hold, with its shape."""
    state = empty_controlnet(name).state_dict()
    return {key: tuple(t.shape) for key, t in to_layout(state, controlnet_config(name), layout).items()}


def strip_original_prefix(keys: Iterable[str]) -> dict[str, str]:
    """File key -> its ``control_model.``-prefixed name (files without the prefix are named as if they had it)."""
    keys = list(keys)
    if any(key.startswith(ORIGINAL_PREFIX) for key in keys):
        return {key: key for key in keys}
    return {key: ORIGINAL_PREFIX + key for key in keys}


def controlnet_layout(keys: Iterable[str]) -> str | None:
    """``diffusers`` or ``original`` for an SDXL-or-other ControlNet file, None when it is no ControlNet at all."""
    keys = set(keys)
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    if {"control_model.input_hint_block.0.weight", "input_hint_block.0.weight"} & keys:
        return "original"
    return None


def foreign_controlnet(keys: Iterable[str]) -> str | None:
    """What a ControlNet-like file that this converter refuses is (None for a plain ControlNet)."""
    keys = list(keys)
    for marker, description in FOREIGN_CONTROLNETS:
        if any(marker in key for key in keys):
            return description
    return None


def other_family(shapes: Mapping[str, tuple[int, ...]], layout: str) -> str | None:
    """An SD 1.x / 2.x ControlNet (no SDXL text-time embedding), named by its cross-attention width; None for SDXL."""
    embedding = "add_embedding.linear_1.weight" if layout == "diffusers" else "label_emb.0.0.weight"
    if any(key.endswith(embedding) for key in shapes):
        return None
    widths = {shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight") and len(shape) == 2}
    family = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(next(iter(widths), 0), "non-SDXL")
    width = f" (cross-attention width {sorted(widths)[0]})" if widths else ""
    return f"a {family} ControlNet{width}: it has no SDXL text-time embedding (add_embedding / label_emb)"


def to_diffusers_names(tensors: dict[str, torch.Tensor], config: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """The file's tensors under diffusers' names: diffusers' own key map, plus the ``label_emb`` tensors it drops."""
    if layout == "diffusers":
        return dict(tensors)
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    prefixed = {strip_original_prefix(tensors)[key]: tensor for key, tensor in tensors.items()}
    converted = convert_controlnet_checkpoint(prefixed, dict(config))
    for target, source in (("linear_1", "label_emb.0.0"), ("linear_2", "label_emb.0.2")):
        for leaf in ("weight", "bias"):
            key = f"add_embedding.{target}.{leaf}"
            if key not in converted and f"{ORIGINAL_PREFIX}{source}.{leaf}" in prefixed:
                converted[key] = prefixed[f"{ORIGINAL_PREFIX}{source}.{leaf}"]
    # diffusers fills names it expected but the file lacked with None; the accounting step has refused those already.
    return {key: tensor for key, tensor in converted.items() if tensor is not None}
