"""The dev IP-Adapters: SDXL's IP-Adapter architectures scaled to the dev UNet, with seeded random weights.

``python -m model_build dev-ip-adapter OUT_DIR`` writes an IP_ADAPTER_DIR in h94/IP-Adapter's layout
(:mod:`model_build.ip_adapter_layout`), every tensor under h94's names, so loading runs diffusers' own conversion:

- ``sdxl_models/ip-adapter_dev.safetensors``: the plain kind (``image_proj.proj``, 4 tokens), reading the
  projection of ``sdxl_models/image_encoder`` (a ViT-bigG-shaped encoder, scaled down);
- ``sdxl_models/ip-adapter-plus_dev_vit-h.safetensors``: the "plus" kind (the Resampler, 4 layers as diffusers
  builds it), reading the penultimate hidden states of ``models/image_encoder`` (ViT-H-shaped, scaled down), whose
  width the sibling encoder does not have, so the encoder is found as for h94's ``vit-h`` files.

``--full-size`` writes SDXL's: ``ip-adapter_sdxl_vit-h`` and ``ip-adapter-plus_sdxl_vit-h`` (fp16, about 0.7 and
0.85 GB) with a random OpenCLIP ViT-H image encoder built from its config (``models/image_encoder``, 1.3 GB).
Every tensor is random (none zero), so a job with an adapter differs from one without it; images are noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model_build.architectures import empty_component
from model_build.dev_model import DEV_MODEL_NOTICE, _seeded_tensor
from model_build.ip_adapter_layout import ADAPTER_SUBFOLDER, PLAIN_TOKENS, cross_attention_layers

DEV_IP_ADAPTER_METADATA_KEY = "sdxl_worker.dev_ip_adapter"
RESAMPLER_DEPTH = 4  # diffusers' IPAdapterPlusImageProjection is always built with 4 layers
HEAD_DIM = 64  # and with 64-wide heads (heads = to_q rows // 64)

# CLIPVisionConfig values: OpenCLIP ViT-H-14 and ViT-bigG-14 as h94 ships them, and their dev-sized stand-ins.
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "projection_dim": 1024}  # fmt: skip
DEV_VIT_H = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8, "projection_dim": 32}  # fmt: skip
DEV_VIT_BIGG = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                "image_size": 32, "patch_size": 8, "projection_dim": 40}  # fmt: skip


def _tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    return _seeded_tensor(name, shape, seed).to(dtype).contiguous()


def plain_projection(cross: int, encoder: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """h94's ``image_proj`` of the plain kind: one linear to 4 tokens, a LayerNorm."""
    width = encoder["projection_dim"]
    return {"proj.weight": (PLAIN_TOKENS * cross, width), "proj.bias": (PLAIN_TOKENS * cross,),
            "norm.weight": (cross,), "norm.bias": (cross,)}  # fmt: skip


def resampler_projection(cross: int, encoder: dict[str, Any], hidden: int, tokens: int) -> dict[str, tuple[int, ...]]:
    """h94's ``image_proj`` of the plus kind (its Resampler: PerceiverAttention + FeedForward per layer)."""
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, tokens, hidden),
        "proj_in.weight": (hidden, encoder["hidden_size"]),
        "proj_in.bias": (hidden,),
        "proj_out.weight": (cross, hidden),
        "proj_out.bias": (cross,),
        "norm_out.weight": (cross,),
        "norm_out.bias": (cross,),
    }
    for layer in range(RESAMPLER_DEPTH):
        prefix = f"layers.{layer}"
        for norm in (f"{prefix}.0.norm1", f"{prefix}.0.norm2", f"{prefix}.1.0"):
            shapes.update({f"{norm}.weight": (hidden,), f"{norm}.bias": (hidden,)})
        shapes.update({
            f"{prefix}.0.to_q.weight": (hidden, hidden),
            f"{prefix}.0.to_kv.weight": (2 * hidden, hidden),
            f"{prefix}.0.to_out.weight": (hidden, hidden),
            f"{prefix}.1.1.weight": (4 * hidden, hidden),
            f"{prefix}.1.3.weight": (hidden, 4 * hidden),
        })  # fmt: skip
    return shapes


def adapter_state_dict(unet_config: str, projection: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict:
    """An IP-Adapter file's tensors: ``projection`` as ``image_proj.*`` and to_k_ip/to_v_ip for every cross-attention
    layer of the shipped UNet config ``unet_config``."""
    unet = empty_component(unet_config, "unet")
    cross = unet.config.cross_attention_dim
    tensors = {}
    for key, shape in projection.items():
        # LayerNorm weights near 1: _seeded_tensor does that for names with "norm", and h94 names the Resampler's
        # feed-forward LayerNorm "layers.N.1.0"
        name = f"image_proj.{'ff_norm.' if key.endswith('.1.0.weight') else ''}{key}"
        tensors[f"image_proj.{key}"] = _tensor(name, shape, seed, dtype)
    for index, (_, width) in enumerate(cross_attention_layers(unet)):
        for part in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{2 * index + 1}.{part}.weight"
            tensors[key] = _tensor(key, (width, cross), seed, dtype)
    return tensors


def write_image_encoder(folder: Path, values: dict[str, Any], seed: int, dtype: torch.dtype) -> Path:
    """A ``CLIPVisionModelWithProjection`` folder (config.json, model.safetensors) with seeded weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**values, hidden_act="gelu", layer_norm_eps=1e-5)
    config.architectures = ["CLIPVisionModelWithProjection"]
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in CLIPVisionModelWithProjection(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tensors = {key: _tensor(f"image_encoder.{key}", shape, seed, dtype) for key, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _save(tensors: dict, output: Path, seed: int) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    notice = json.dumps({"notice": DEV_MODEL_NOTICE, "seed": seed})
    save_file(tensors, str(partial), metadata={DEV_IP_ADAPTER_METADATA_KEY: notice})
    partial.replace(output)


def write_dev_ip_adapters(output: Path, full_size: bool = False, seed: int = 0) -> list[Path]:
    """Write the dev (or full-size SDXL) IP-Adapter folder; the same bytes every time. Returns the adapter files."""
    dtype = torch.float16 if full_size else torch.float32
    unet_config = "sdxl_base" if full_size else "dev_tiny"
    cross = empty_component(unet_config, "unet").config.cross_attention_dim
    adapters = output / ADAPTER_SUBFOLDER
    vit_h = VIT_H if full_size else DEV_VIT_H
    write_image_encoder(output / "models" / "image_encoder", vit_h, seed, dtype)
    plus_hidden = vit_h["hidden_size"]  # h94's plus files: the Resampler as wide as ViT-H (1280 = 20 heads of 64)
    plus_tokens = 16 if full_size else 4
    plus = resampler_projection(cross, vit_h, math.ceil(plus_hidden / HEAD_DIM) * HEAD_DIM, plus_tokens)
    if full_size:
        files = {
            "ip-adapter_sdxl_vit-h": plain_projection(cross, vit_h),
            "ip-adapter-plus_sdxl_vit-h": plus,
        }
    else:
        write_image_encoder(adapters / "image_encoder", DEV_VIT_BIGG, seed, dtype)
        files = {"ip-adapter_dev": plain_projection(cross, DEV_VIT_BIGG), "ip-adapter-plus_dev_vit-h": plus}
    written = []
    for name, projection in files.items():
        path = adapters / f"{name}.safetensors"
        _save(adapter_state_dict(unet_config, projection, seed, dtype), path, seed)
        written.append(path)
    return written
