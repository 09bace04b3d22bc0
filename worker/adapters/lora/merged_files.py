"""LoRA files that no peft layer runs faithfully, read, named and checked: they are merged into the weights instead.

Which files: LyCORIS LoHa and LoKr, LoCon with Tucker decomposition (``lora_mid``), Kohya/LyCORIS DoRA
(``dora_scale``) and diffusers/peft DoRA (``lora_magnitude_vector``). diffusers 0.42.1 refuses LoHa/LoKr, drops
Kohya ``dora_scale`` keys with a warning, and loads peft DoRA into the UNet but leaves the text encoders' magnitudes
at their initial values ("UNEXPECTED" keys with transformers 5.24, measured here); merging computes each layer's
new weight from the formulas in :mod:`.lycoris`, in the UNet and both text encoders alike.

A Kohya/LyCORIS layer name (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) is mapped to its module
by diffusers' own converter for Kohya LoRAs, the one every plain Kohya LoRA goes through, so both kinds of file land
on the same modules. Every layer is checked against the model (exists, is a Linear or Conv2d, the update's shape and
DoRA magnitudes fit) before anything is touched; a file that does not fit is one :class:`LoraError` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from core.errors import first_line
from worker.adapters.lora.files import LORA_TARGETS, LoraFile, detect_format, to_peft_keys
from worker.adapters.lora.lycoris import LayerUpdate, UpdateError, kohya_update, peft_update
from worker.adapters.lora.sources import LoraError

# A key holding one of these is a file for this module (the rest go through peft's layers, see .files).
MERGE_MARKERS = (".hada_", ".lokr_", ".lora_mid.", ".dora_scale", ".lora_magnitude_vector")
_MAX_EXAMPLES = 3
_CROSS_ATTENTION_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 4096: "a transformer model"}


@dataclass
class MergedLora:
    """A file's layer updates per component (``{"unet": {"down_blocks.1...to_q": LayerUpdate}}``), checked."""

    format: str  # "kohya" or "diffusers"
    layers: dict[str, dict[str, LayerUpdate]] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return [component for component in LORA_TARGETS if self.layers.get(component)]

    @property
    def layer_counts(self) -> dict[str, int]:
        return {component: len(self.layers[component]) for component in self.components}

    @property
    def nbytes(self) -> int:
        return sum(update.nbytes for part in self.layers.values() for update in part.values())

    @property
    def kind(self) -> str:
        """What the file is, for the metadata: "LoHa", "LoKr", "LoRA+DoRA", "LoCon (Tucker)+LoRA", ..."""
        updates = [update for part in self.layers.values() for update in part.values()]
        kinds = "+".join(sorted({update.kind for update in updates}))
        return kinds + ("+DoRA" if any(update.dora is not None for update in updates) else "")


def is_merged_only(keys: list[str]) -> bool:
    return any(marker in key for key in keys for marker in MERGE_MARKERS)


def prepare_merged(pipe: Any, lora_file: LoraFile, label: str) -> MergedLora:
    """Read ``lora_file``'s layers, map them to ``pipe``'s modules and check they fit; the pipeline is not modified."""
    keys = list(lora_file.tensors)
    lora_format = detect_format(keys, label)
    problems: list[str] = []
    if lora_format == "kohya":
        named = _kohya_layers(pipe, lora_file.tensors, label, problems)
    else:
        named = _diffusers_layers(pipe, lora_file, label, problems)
    if problems:
        raise LoraError(
            f"LoRA {label!r} cannot be merged: {'; '.join(problems[:_MAX_EXAMPLES])}"
            + (f" (and {len(problems) - _MAX_EXAMPLES} more)" if len(problems) > _MAX_EXAMPLES else "")
            + ". Use a complete LoRA, LoCon, LoHa, LoKr or DoRA file, as sd-scripts, LyCORIS or diffusers save them"
        )
    merged = MergedLora(format=lora_format)
    for component in LORA_TARGETS:
        part = {path: update for (owner, path), update in named.items() if owner == component}
        if not part:
            continue
        model = getattr(pipe, component, None)
        if model is None:
            problems.append(f"it adapts {component}, which this pipeline does not have")
            continue
        problems.extend(_check_component(model, component, part, label))
        device = next(model.parameters()).device
        merged.layers[component] = {path: update.to(device) for path, update in part.items()}
    if problems:
        raise LoraError(
            f"LoRA {label!r} does not fit this model: {'; '.join(problems)}{_family_hint(pipe, named)}. "
            "Use a LoRA trained for this model's architecture (SDXL)"
        )
    if not merged.components:
        raise LoraError(f"LoRA {label!r} adapts no layer of the UNet or the text encoders")
    return merged


def base_layer(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module at ``path``; under a peft wrapper (a plain LoRA on the same layer), the wrapped original."""
    module = model.get_submodule(path)
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if get_base is not None else module


def _kohya_layers(
    pipe: Any, tensors: dict[str, torch.Tensor], label: str, problems: list[str]
) -> dict[tuple[str, str], LayerUpdate]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = tensor
    updates: dict[str, LayerUpdate] = {}
    for name, parts in grouped.items():
        try:
            updates[name] = kohya_update(name, parts)
        except UpdateError as error:
            problems.append(str(error))
    if problems:
        return {}
    paths = kohya_module_paths(pipe, list(updates), label)
    unmapped = [name for name in updates if name not in paths]
    if unmapped:
        problems.append(
            f"{len(unmapped)} of its layer names are not SDXL module names (e.g. {', '.join(unmapped[:_MAX_EXAMPLES])})"
        )
    return {paths[name]: update for name, update in updates.items() if name in paths}


def kohya_module_paths(pipe: Any, names: list[str], label: str) -> dict[str, tuple[str, str]]:
    """Kohya layer name -> (component, module path), by diffusers' converter for Kohya LoRAs.

    The converter renames ``<name>.lora_down.weight`` keys; each name gets a placeholder pair carrying its index, so
    the converted key it ends up under tells its module (the converter moves tensors, it does not look into them).
    """
    placeholders: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        marker = torch.tensor([float(index)])
        placeholders[f"{name}.lora_down.weight"] = marker
        placeholders[f"{name}.lora_up.weight"] = marker
    try:
        state_dict, _ = type(pipe).lora_state_dict(placeholders, unet_config=pipe.unet.config)
    except (ValueError, KeyError, IndexError) as error:
        reason = first_line(error, limit=300) or type(error).__name__
        raise LoraError(f"LoRA {label!r} has layer names diffusers cannot map to SDXL modules: {reason}") from None
    paths: dict[str, tuple[str, str]] = {}
    for component in LORA_TARGETS:
        model = getattr(pipe, component, None)
        prefix = f"{component}."
        part = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        if model is None or not part:
            continue
        for key, marker in to_peft_keys(part, component, model).items():
            if key.endswith(".lora_A.weight"):
                paths[names[int(marker.item())]] = (component, key.removesuffix(".lora_A.weight"))
    return paths


def _diffusers_layers(
    pipe: Any, lora_file: LoraFile, label: str, problems: list[str]
) -> dict[tuple[str, str], LayerUpdate]:
    """diffusers/peft DoRA: ``<component>.<module>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector``."""
    lycoris = [key for key in lora_file.tensors if ".hada_" in key or ".lokr_" in key or ".lora_mid." in key]
    if lycoris:
        problems.append(
            f"its LyCORIS weights are in diffusers' key layout (e.g. {lycoris[0]}); LoHa/LoKr are read in the "
            "Kohya/LyCORIS layout (lora_unet_..., lora_te1_..., lora_te2_...) that A1111 and ComfyUI read"
        )
        return {}
    named: dict[tuple[str, str], LayerUpdate] = {}
    for component in LORA_TARGETS:
        prefix = f"{component}."
        part = {key.removeprefix(prefix): value for key, value in lora_file.tensors.items() if key.startswith(prefix)}
        model = getattr(pipe, component, None)
        if not part or model is None:
            continue
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in to_peft_keys(part, component, model).items():
            module, _, suffix = key.partition(".lora_")
            grouped.setdefault(module, {})["lora_" + suffix] = tensor
        for module, tensors in grouped.items():
            rank = int(tensors["lora_A.weight"].shape[0]) if "lora_A.weight" in tensors else 1
            try:
                scaling = _peft_scaling(lora_file.metadata, component, module, rank)
                named[(component, module)] = peft_update(f"{component}.{module}", tensors, scaling)
            except UpdateError as error:
                problems.append(str(error))
    return named


def _peft_scaling(metadata: dict[str, Any] | None, component: str, module: str, rank: int) -> float:
    """``lora_alpha / r`` as peft sets it from the LoraConfig diffusers saves (rsLoRA, per-module alpha_pattern).

    Without a saved config diffusers takes alpha = rank (scale 1) for diffusers-format files.
    """
    from peft.utils.other import get_pattern_key

    prefix = f"{component}."
    config = {key.removeprefix(prefix): value for key, value in (metadata or {}).items() if key.startswith(prefix)}
    if "lora_alpha" not in config:
        return 1.0
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_component(model: torch.nn.Module, component: str, updates: dict[str, LayerUpdate], label: str) -> list[str]:
    missing: list[str] = []
    mismatched: list[str] = []
    for path, update in updates.items():
        try:
            module = base_layer(model, path)
        except AttributeError:
            missing.append(path)
            continue
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            mismatched.append(f"{component}.{path} is a {type(module).__name__}, which an adapter cannot change here")
            continue
        if module.weight.device.type == "meta":
            raise LoraError(
                f"LoRA {label!r} ({update.kind}) is merged into the weights, but with OFFLOAD=sequential the weights "
                "are not in memory; use OFFLOAD=model or none for it"
            )
        try:
            problem = update.check_fits(module.weight.shape)
        except UpdateError as error:
            problem = str(error)
        if problem:
            mismatched.append(f"{component}.{path} {problem}")
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of its {len(updates)} {component} layers do not exist in this model "
            f"(e.g. {', '.join(sorted(missing)[:_MAX_EXAMPLES])})"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} {component} layers have the wrong shape (e.g. {', '.join(mismatched[:_MAX_EXAMPLES])})"
        )
    return problems


def _family_hint(pipe: Any, named: dict[tuple[str, str], LayerUpdate]) -> str:
    """'. It was made for SD 1.x (...)' when a cross-attention key projection's input width tells the family."""
    expected = pipe.unet.config.cross_attention_dim
    for (component, path), update in named.items():
        if component != "unet" or not path.endswith("attn2.to_k"):
            continue
        try:
            shape = update.shape()
        except UpdateError:
            continue
        if len(shape) == 2 and shape[1] != expected:
            family = _CROSS_ATTENTION_FAMILIES.get(int(shape[1]), "another model")
            return f". It was made for {family} (cross-attention width {shape[1]}, this model's is {expected})"
    return ""
