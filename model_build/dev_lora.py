"""Random LoRAs for a given SDXL pipeline, written as real LoRA files: the dev LoRA.

Real SDXL LoRAs do not fit the dev model, so ``python -m model_build dev-lora OUT.safetensors --model
models/sdxl-dev`` makes one that does, for trying the LoRA path (the worker's ``loras`` field, the batch runner)
on the dev model; the tests and the GPU benchmarks use the same functions on the dev and the full-size model.

:func:`random_lora` draws low-rank weights for a pipeline's attention projections (optionally its
feed-forward and projection layers, as real Kohya LoRAs have). :func:`save_diffusers_lora` writes
them the way diffusers' training scripts do (``save_lora_weights`` with the LoraConfig as
metadata); :func:`save_kohya_lora` writes the same weights the way Kohya's sd-scripts writes SDXL
LoRAs: original (sgm) UNet block names such as ``lora_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q``, ``lora_te1_``/``lora_te2_`` text-encoder names, ``lora_down``/``lora_up`` weights and
one ``alpha`` scalar per layer. Both files of one LoRA must give the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# What Kohya's default SDXL network adapts besides attention (transformer blocks only, no convolutions).
UNET_KOHYA_TARGETS = (*UNET_ATTENTION_TARGETS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_KOHYA_TARGETS = (*TEXT_ATTENTION_TARGETS, "fc1", "fc2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class RandomLora:
    """Per component, peft-format weights: ``{"<module path>.lora_A.weight": tensor, ...lora_B...}``."""

    rank: int
    alpha: float
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.layers.values() for t in part.values())


def adaptable_layers(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """``model``'s Linear and Conv2d layers whose path ends with one of ``suffixes``, with their paths."""
    found = []
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)  # a layer that already carries adapters: its base layer
        adaptable = isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)
        if adaptable and any(name == s or name.endswith("." + s) for s in suffixes):
            found.append((name, layer))
    return found


def _lora_shapes(module: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """lora_A's and lora_B's shapes and A's fan-in: a Conv2d LoRA (LoCon) is a k x k conv down, a 1 x 1 conv up."""
    if isinstance(module, torch.nn.Conv2d):
        kernel = tuple(module.kernel_size)
        fan_in = module.in_channels * kernel[0] * kernel[1]
        return (rank, module.in_channels, *kernel), (module.out_channels, rank, 1, 1), fan_in
    return (rank, module.in_features), (module.out_features, rank), module.in_features


def random_lora(
    pipe: Any,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    strength: float = 1.0,
    unet_targets: tuple[str, ...] = UNET_ATTENTION_TARGETS,
    text_targets: tuple[str, ...] = TEXT_ATTENTION_TARGETS,
    components: tuple[str, ...] = ("unet", *TEXT_ENCODERS),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> RandomLora:
    """Random weights shaped for ``pipe``'s layers; ``strength`` scales the update's size relative to the layer.

    lora_B is nonzero (unlike a freshly initialised LoRA), so the adapter visibly changes the output. The
    weights are drawn on ``device`` (fast on a GPU) and returned on the CPU, ready to save.
    """
    generator = torch.Generator(device).manual_seed(seed)
    lora = RandomLora(rank=rank, alpha=float(alpha if alpha is not None else rank))
    scaling = lora.alpha / rank
    for component in components:
        model = getattr(pipe, component)
        targets = adaptable_layers(model, unet_targets if component == "unet" else text_targets)
        part: dict[str, torch.Tensor] = {}
        for name, module in targets:
            shape_down, shape_up, fan_in = _lora_shapes(module, rank)
            down = torch.randn(shape_down, generator=generator, device=device, dtype=dtype)
            up = torch.randn(shape_up, generator=generator, device=device, dtype=dtype)
            # Make ||B A x|| * scaling about `strength` times a unit-variance input's norm per output channel.
            part[f"{name}.lora_A.weight"] = down.mul_(fan_in**-0.5).cpu()
            part[f"{name}.lora_B.weight"] = up.mul_(strength / (math.sqrt(rank) * scaling)).cpu()
        lora.layers[component] = part
    return lora


def save_diffusers_lora(lora: RandomLora, path: Path) -> Path:
    """Write like diffusers' training scripts: ``save_lora_weights`` with each component's LoraConfig as metadata."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    def config(part: dict[str, torch.Tensor]) -> dict | None:
        if not part:
            return None
        modules = sorted({key.split(".lora_")[0] for key in part})
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=modules).to_dict()

    layers = {component: lora.layers.get(component) or None for component in ("unet", *TEXT_ENCODERS)}
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=config(layers["unet"] or {}),
        text_encoder_lora_adapter_metadata=config(layers["text_encoder"] or {}),
        text_encoder_2_lora_adapter_metadata=config(layers["text_encoder_2"] or {}),
        weight_name=path.name,
    )
    return path


def kohya_name(pipe: Any, component: str, module: str) -> str:
    """The name Kohya's sd-scripts (and LyCORIS) give an SDXL layer: the original (sgm) module path for the UNet
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), transformers' for the text encoders."""
    from model_build.layout import to_original_layout

    if component == "unet":
        (key,) = to_original_layout("unet", {f"{module}.weight": torch.empty(0)}, pipe.unet.config)
        return "lora_unet_" + key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
    full = module if module.startswith("text_model.") else f"text_model.{module}"
    return ("lora_te1_" if component == "text_encoder" else "lora_te2_") + full.replace(".", "_")


def kohya_state_dict(lora: RandomLora, pipe: Any) -> dict[str, torch.Tensor]:
    """The LoRA under Kohya sd-scripts' SDXL names (lora_unet_input_blocks_..., lora_te1_text_model_...)."""
    state: dict[str, torch.Tensor] = {}
    for component, part in lora.layers.items():
        for key, tensor in part.items():
            module, kind = key.split(".lora_")
            name = kohya_name(pipe, component, module)
            state[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = tensor.contiguous()
            state[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=tensor.dtype)
    return state


def save_kohya_lora(lora: RandomLora, pipe: Any, path: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write like Kohya's sd-scripts (plus ``extra`` tensors, e.g. to build a broken file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.alpha),
    }
    save_file({**kohya_state_dict(lora, pipe), **(extra or {})}, str(path), metadata=metadata)
    return path


def load_dev_pipeline(model_dir: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)


def write_dev_lora(
    model_dir: Path, output: Path, kohya: bool = False, rank: int = 4, seed: int = 0, strength: float = 1.0
) -> Path:
    """A random LoRA fitted to the converted model in ``model_dir`` (UNet and both text encoders), saved to ``output``.

    Its images are as meaningless as the dev model's; it exists so the LoRA code path can be tried end to end.
    """
    pipe = load_dev_pipeline(model_dir)
    lora = random_lora(pipe, rank=rank, seed=seed, strength=strength)
    if kohya:
        return save_kohya_lora(lora, pipe, output)
    return save_diffusers_lora(lora, output)
