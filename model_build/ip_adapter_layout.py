"""SDXL IP-Adapters as h94/IP-Adapter publishes them: the folder layout, what a file is by its tensor shapes, and
which image encoder it reads.

The layout (a snapshot of ``h94/IP-Adapter`` with ``--include "sdxl_models/*" "models/image_encoder/*"``)::

    sdxl_models/ip-adapter_sdxl.safetensors                 global image embedding of OpenCLIP ViT-bigG
    sdxl_models/ip-adapter_sdxl_vit-h.safetensors           the same from OpenCLIP ViT-H
    sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors      ViT-H patch embeddings through a Resampler ("plus")
    sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors the same, trained on cropped faces
    sdxl_models/image_encoder/                              CLIPVisionModelWithProjection, ViT-bigG
    models/image_encoder/                                   CLIPVisionModelWithProjection, ViT-H

A file holds ``image_proj.*`` (the image encoder's output projected to tokens the UNet's cross-attention reads) and
``ip_adapter.<id>.to_k_ip.weight`` / ``.to_v_ip.weight``, ids 1, 3, 5, ... one pair per cross-attention layer in
diffusers' ``attn_processors`` order (``UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers``). Its
kind is told as diffusers tells it (``_convert_ip_adapter_image_proj_to_diffusers``):

- ``ip-adapter``: ``image_proj.proj.weight`` (4 tokens x the cross-attention width, by the encoder's projection
  width): reads the encoder's image embedding (``image_embeds``);
- ``plus``: ``image_proj.latents``, ``proj_in``, ``layers.*`` (the Resampler): reads the encoder's penultimate
  hidden states (every patch), its width the encoder's ``hidden_size``.

Which encoder a file reads is decided by those widths, not by its name: ``ip-adapter_sdxl`` fits ViT-bigG's
projection (1280), the ``vit-h`` files ViT-H's (projection 1024, hidden 1280).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ADAPTER_SUBFOLDER = "sdxl_models"
ENCODER_FOLDER = "image_encoder"
# Where an adapter's image encoder may be, relative to the root: its own folder's image_encoder/ comes first.
ENCODER_FOLDERS = (f"{ADAPTER_SUBFOLDER}/{ENCODER_FOLDER}", f"models/{ENCODER_FOLDER}")
PLAIN, PLUS = "ip-adapter", "plus"
PLAIN_TOKENS = 4  # diffusers' ImageProjection for IP-Adapter files: num_image_text_embeds=4

# Other IP-Adapter kinds, by an image_proj tensor each has (diffusers' order of tests), and why they are refused.
FOREIGN_KINDS: tuple[tuple[str, str], ...] = (
    ("proj.3.weight", "an IP-Adapter full-face (an SD 1.5 kind, 257 CLIP tokens), which this worker does not run"),
    (
        "perceiver_resampler.proj_in.weight",
        "an IP-Adapter FaceID Plus: it reads InsightFace face-ID embeddings, which this worker does not compute",
    ),
    (
        "norm.weight",
        "an IP-Adapter FaceID: it reads InsightFace face-ID embeddings, which this worker does not compute",
    ),
)
FACE_ID_LORA = ".to_k_lora."  # FaceID files carry a LoRA in their ip_adapter part


@dataclass(frozen=True)
class AdapterShape:
    """What an IP-Adapter file needs, read from its tensor shapes alone."""

    kind: str  # PLAIN or PLUS
    num_tokens: int  # image tokens per image the UNet's cross-attention reads
    cross_attention_dim: int  # the text width its to_k_ip/to_v_ip read (the UNet's cross_attention_dim)
    layer_widths: tuple[int, ...]  # each cross-attention layer's width, in diffusers' attn_processors order
    encoder_key: str  # the image encoder config value it reads: "projection_dim" (PLAIN) or "hidden_size" (PLUS)
    encoder_width: int

    @property
    def output_hidden_states(self) -> bool:
        """Whether it reads the encoder's penultimate hidden states (diffusers' ``encode_image`` switch)."""
        return self.kind != PLAIN


def describe(shapes: Mapping[str, tuple[int, ...]]) -> AdapterShape:
    """The :class:`AdapterShape` of a file's tensors (name -> shape); ValueError saying what the file is instead."""
    foreign = sorted(key for key in shapes if not key.startswith(("image_proj.", "ip_adapter.")))
    if foreign or not shapes:
        shown = ", ".join(foreign[:3]) or "no tensors"
        raise ValueError(f"is not an IP-Adapter file (it has {shown}; one has image_proj.* and ip_adapter.* only)")
    projection = {key.removeprefix("image_proj."): shape for key, shape in shapes.items() if key.startswith("image_")}
    if "proj.weight" not in projection:
        if any(FACE_ID_LORA in key for key in shapes):
            raise ValueError(f"is {FOREIGN_KINDS[2][1]}")
        for key, why in FOREIGN_KINDS:
            if key in projection:
                raise ValueError(f"is {why}")
    layers = _layer_widths(shapes)
    inputs = {shape[1] for key, shape in shapes.items() if key.startswith("ip_adapter.")}
    if len(inputs) != 1:
        raise ValueError(f"has to_k_ip/to_v_ip weights of several input widths ({sorted(inputs)})")
    if "proj.weight" in projection:
        rows, width = projection["proj.weight"]
        shape = AdapterShape(PLAIN, PLAIN_TOKENS, rows // PLAIN_TOKENS, layers, "projection_dim", width)
    elif {"latents", "proj_in.weight", "proj_out.weight"} <= set(projection):
        tokens, cross = projection["latents"][1], projection["proj_out.weight"][0]
        shape = AdapterShape(PLUS, tokens, cross, layers, "hidden_size", projection["proj_in.weight"][1])
    else:
        raise ValueError("has an image_proj of no IP-Adapter kind diffusers loads (neither proj.weight nor latents)")
    if inputs != {shape.cross_attention_dim}:
        raise ValueError(
            f"makes image tokens of width {shape.cross_attention_dim} but its layers read width {inputs.pop()}"
        )
    return shape


def _layer_widths(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    ids: dict[int, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if not key.startswith("ip_adapter."):
            continue
        parts = key.split(".")
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in ("to_k_ip", "to_v_ip") or len(shape) != 2:
            raise ValueError(f"has the tensor {key} {list(shape)}, which no IP-Adapter layer has")
        if ids.setdefault(int(parts[1]), shape) != shape:
            raise ValueError(f"has to_k_ip and to_v_ip of different shapes in layer {parts[1]}")
    expected = list(range(1, 2 * len(ids), 2))
    if sorted(ids) != expected:
        raise ValueError(f"has layer ids {sorted(ids)[:6]}..., not 1, 3, 5, ... (diffusers' order)")
    return tuple(ids[key][0] for key in expected)


def fit_problem(shape: AdapterShape, unet_widths: list[int], cross_attention_dim: int) -> str | None:
    """Why the adapter does not fit a UNet with these cross-attention layer widths, or None."""
    if shape.cross_attention_dim != cross_attention_dim or len(shape.layer_widths) != len(unet_widths):
        sd15 = " (an SD 1.5 IP-Adapter: 16 layers, width 768)" if shape.cross_attention_dim == 768 else ""
        return (
            f"it has {len(shape.layer_widths)} cross-attention layers reading width {shape.cross_attention_dim}"
            f"{sd15}; this model has {len(unet_widths)} reading width {cross_attention_dim}"
        )
    wrong = [index for index, (a, b) in enumerate(zip(shape.layer_widths, unet_widths, strict=True)) if a != b]
    if wrong:
        return (
            f"{len(wrong)} of its layers have other widths than this model's (layer {wrong[0]}: "
            f"{shape.layer_widths[wrong[0]]}, the model's {unet_widths[wrong[0]]})"
        )
    return None


def cross_attention_layers(unet: Any) -> list[tuple[str, int]]:
    """The UNet's cross-attention processors and their widths, in the order IP-Adapter files number them (diffusers'
    ``_convert_ip_adapter_attn_to_diffusers``: attn2 of every transformer block, the width its block's)."""
    channels = list(unet.config.block_out_channels)
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            width = channels[-1]
        elif name.startswith("up_blocks"):
            width = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            width = channels[int(name[len("down_blocks.")])]
        layers.append((name, width))
    return layers
