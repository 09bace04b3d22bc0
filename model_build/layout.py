"""Names of SDXL tensors in the original (Stability "sgm") single-file layout.

diffusers only maps original -> diffusers. This module maps the other way, from a Diffusers
state dict to original key names, for any SDXL-shaped config (any widths and depths, the SDXL
block structure). Two users:

* the dev model, which is built as Diffusers modules and exported in the original layout, and
* the converter's pre-flight check, which derives the exact set of keys (and shapes) that a
  checkpoint for a given config must contain, so a missing or unknown tensor is named before
  diffusers turns it into "Cannot copy out of meta tensor" or a silent random initialisation.

Three families share these names: the SDXL base (UNet, VAE, CLIP-L and OpenCLIP-bigG), the SDXL
inpainting model (the base's components; its UNet takes 9 input channels: the noisy latents, the
mask and the masked image's latents) and the SDXL refiner (UNet, VAE and OpenCLIP-bigG only). Their
tensors are named alike, except that the refiner's single text encoder sits where the base keeps
CLIP-L, at ``conditioner.embedders.0``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

BASE_FAMILY = "sdxl-base"
REFINER_FAMILY = "sdxl-refiner"
INPAINT_FAMILY = "sdxl-inpaint"

# The original checkpoint's top-level prefix of each pipeline component of an SDXL base.
COMPONENT_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
# The refiner has no CLIP-L: its OpenCLIP-bigG encoder (the pipeline's text_encoder_2) is embedder 0.
REFINER_COMPONENT_PREFIXES: dict[str, str] = {
    "unet": COMPONENT_PREFIXES["unet"],
    "vae": COMPONENT_PREFIXES["vae"],
    "text_encoder_2": "conditioner.embedders.0.model.",
}
FAMILY_PREFIXES: dict[str, dict[str, str]] = {
    BASE_FAMILY: COMPONENT_PREFIXES,
    REFINER_FAMILY: REFINER_COMPONENT_PREFIXES,
    INPAINT_FAMILY: COMPONENT_PREFIXES,
}


def component_prefixes(family: str) -> dict[str, str]:
    """The components of ``family`` (in pipeline order) and each one's original-layout prefix."""
    try:
        return FAMILY_PREFIXES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILY_PREFIXES)}") from None


_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_key(key: str, layers_per_block: int, up_attention: tuple[bool, ...]) -> str:
    """``up_attention[level]``: whether up block ``level`` has attentions (its upsampler's index follows them)."""
    for diffusers_prefix, original_prefix in _UNET_TOP.items():
        if key.startswith(diffusers_prefix):
            return original_prefix + key[len(diffusers_prefix) :]

    def resnet_tail(tail: str) -> str:
        for diffusers_part, original_part in _UNET_RESNET.items():
            if tail.startswith(diffusers_part):
                return original_part + tail[len(diffusers_part) :]
        raise KeyError(key)

    stride = layers_per_block + 1  # input/output block indices used per level
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level, j, tail = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{level * stride + j + 1}.0.{resnet_tail(tail)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        level, j, tail = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{level * stride + j + 1}.1.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet_tail(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level, j, tail = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{level * stride + j}.0.{resnet_tail(tail)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        level, j, tail = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{level * stride + j}.1.{tail}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        # The upsampler sits after the resnet and, in levels that have one, the attention. Which
        # levels have one differs: the base's last up level has none, the refiner's first and last.
        return f"output_blocks.{level * stride + layers_per_block}.{2 if up_attention[level] else 1}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet tensor {key!r}")


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _vae_key(key: str, num_levels: int) -> str:
    key = key.replace("conv_shortcut.", "nin_shortcut.")
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # Decoder levels run in the opposite order in the original layout.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        tail = m[2]
        for diffusers_part, original_part in _VAE_ATTENTION.items():
            if tail.startswith(diffusers_part):
                return f"{m[1]}.mid.attn_1.{original_part}{tail[len(diffusers_part) :]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", key) or re.fullmatch(
        r"(post_)?quant_conv\.(weight|bias)", key
    ):
        return key
    raise KeyError(f"no original-layout name for VAE tensor {key!r}")


def _openclip_key(key: str) -> str:
    key = key.removeprefix("text_model.")
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
        "text_projection.weight": "text_projection",
    }
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(f"no original-layout name for text_encoder_2 tensor {key!r}")
    tail = m[2]
    for diffusers_part, original_part in {
        "layer_norm1.": "ln_1.",
        "layer_norm2.": "ln_2.",
        "mlp.fc1.": "mlp.c_fc.",
        "mlp.fc2.": "mlp.c_proj.",
        "self_attn.out_proj.": "attn.out_proj.",
    }.items():
        if tail.startswith(diffusers_part):
            return f"transformer.resblocks.{m[1]}.{original_part}{tail[len(diffusers_part) :]}"
    raise KeyError(f"no original-layout name for text_encoder_2 tensor {key!r}")


_QKV_KEY = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def to_original_layout(
    component: str, state_dict: Mapping[str, torch.Tensor], config: Mapping, family: str = BASE_FAMILY
) -> dict[str, torch.Tensor]:
    """Rename (and where the layouts differ, reshape or fuse) one component's Diffusers tensors.

    Works on meta tensors too, so it can describe the expected checkpoint of a config without
    allocating it. ``family`` decides the prefix (the refiner's text encoder is embedder 0).
    """
    prefixes = component_prefixes(family)
    if component not in prefixes:
        raise ValueError(f"a {family} model has no {component}; its components: {', '.join(prefixes)}")
    prefix = prefixes[component]
    out: dict[str, torch.Tensor] = {}
    if component == "unet":
        up_attention = tuple(block_type.startswith("CrossAttn") for block_type in config["up_block_types"])
        for key, tensor in state_dict.items():
            out[prefix + _unet_key(key, config["layers_per_block"], up_attention)] = tensor
    elif component == "vae":
        levels = len(config["block_out_channels"])
        for key, tensor in state_dict.items():
            new_key = _vae_key(key, levels)
            if ".mid.attn_1." in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # original VAE attention uses 1x1 convs
            out[prefix + new_key] = tensor
    elif component == "text_encoder":
        # The original layout keeps transformers' `text_model.` level (transformers 5 drops it).
        for key, tensor in state_dict.items():
            out[prefix + "text_model." + key.removeprefix("text_model.")] = tensor
    elif component == "text_encoder_2":
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            if m := _QKV_KEY.fullmatch(key):
                qkv.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
                continue
            new_key = _openclip_key(key)
            if new_key == "text_projection":
                tensor = tensor.T  # OpenCLIP multiplies x @ P; a Linear stores P transposed
            out[prefix + new_key] = tensor
        for fused_key, parts in qkv.items():
            out[prefix + fused_key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    else:
        raise ValueError(f"unknown component {component!r}")
    return out
