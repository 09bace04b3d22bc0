"""What is inside a LoRA file, and whether it fits this pipeline, decided before anything is loaded.

diffusers' loaders accept a lot and complain little: a LoRA for another base model loads its
matching layers and drops the rest with a log warning, a shape mismatch fails half-way through
injection, keys of an unknown prefix are ignored, and Kohya DoRA scales are silently discarded. This
module reads the file once (bytes -> sha256 + tensors, never pickle), converts Kohya/A1111 keys
with diffusers' own converters, and checks every target layer's existence and shapes against the
pipeline, so an unusable LoRA is a :class:`LoraError` naming it, and the model is never touched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import first_line
from core.safetensors_files import SNIFF_BYTES, SafetensorsDamage, foreign_format, parse_header
from worker.adapters.lora.sources import LoraError

# The pipeline parts a LoRA may adapt (model_build.architectures.COMPONENTS are the four model parts).
LORA_TARGETS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")
# SD 1.x/2.x LoRAs name their one text encoder lora_te_; diffusers would apply it to SDXL's first text encoder.
SINGLE_TEXT_ENCODER_PREFIX = "lora_te_"
DIFFUSERS_PREFIXES = tuple(f"{component}." for component in LORA_TARGETS)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps the LoraConfig
_MAX_EXAMPLES = 3
# Key fragments of adapter types this worker does not apply (LoHa, LoKr, Tucker LoCon and DoRA are merged into the
# weights instead of loaded here: .merged_files).
_UNSUPPORTED_FRAGMENTS = {
    ".diff": "a full-weight difference (LyCORIS 'full')",
    ".oft_": "OFT",
}
# What a plain Kohya LoRA/LoCon layer holds (the other adapter types go to .merged_files).
_KOHYA_LORA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}
# Width of the UNet's cross-attention input in other Stable Diffusion families: a hint for the error message.
_CROSS_ATTENTION_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 4096: "a transformer model"}


@dataclass
class LoraFile:
    """A LoRA file's tensors, as stored, with its sha256 and diffusers' LoRA metadata if any."""

    tensors: dict[str, torch.Tensor]
    sha256: str
    size_bytes: int
    metadata: dict[str, Any] | None


@dataclass
class PreparedLora:
    """A LoRA converted, checked against one pipeline and cast to its dtypes, ready for diffusers' loaders."""

    format: str  # "kohya" or "diffusers"
    # "<component>.<module path>.lora_A.weight" (UNet) or "...lora_linear_layer.down.weight" (text encoders)
    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # per component, prefixed keys
    layers: dict[str, int] = field(default_factory=dict)  # component -> number of layers it adapts

    @property
    def components(self) -> list[str]:
        return [component for component in LORA_TARGETS if self.layers.get(component)]


def read_lora_file(path: Path, label: str) -> LoraFile:
    """One read of the file: sha256 of its bytes and the tensors, parsed by safetensors (never unpickled).

    The safetensors header decides what the file is (:mod:`core.safetensors_files`); only a file
    that does not start like one is named by another format's magic bytes.
    """
    data = path.read_bytes()
    other = foreign_format(data[:SNIFF_BYTES], len(data))
    if other is not None:
        description, is_pickle = other
        if is_pickle:
            raise LoraError(
                f"LoRA {label!r} is {description} with a .safetensors name; pickle files can run code when loaded and "
                "are never opened. Convert it to real safetensors"
            )
        raise LoraError(f"LoRA {label!r} is {description}, not a .safetensors LoRA")
    try:
        header = parse_header(data, len(data))
    except SafetensorsDamage as damage:
        raise LoraError(f"LoRA {label!r} is not a valid .safetensors file: the file {damage}") from None
    try:
        from safetensors.torch import load

        tensors = load(data)
    except Exception as error:
        raise LoraError(f"LoRA {label!r} is not a valid .safetensors file: {first_line(error)}") from None
    if not tensors:
        raise LoraError(f"LoRA {label!r} contains no tensors")
    raw = header.metadata.get(LORA_ADAPTER_METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        metadata = None  # diffusers' own metadata is optional; without it the config comes from the tensors
    return LoraFile(
        tensors=tensors,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        metadata=metadata if isinstance(metadata, dict) else None,
    )


def detect_format(keys: list[str], label: str) -> str:
    """ "kohya" (lora_unet_/lora_te1_/lora_te2_ names) or "diffusers" (unet./text_encoder./text_encoder_2.)."""
    single_encoder = [key for key in keys if key.startswith(SINGLE_TEXT_ENCODER_PREFIX)]
    if single_encoder:
        examples = ", ".join(single_encoder[:_MAX_EXAMPLES])
        raise LoraError(
            f"LoRA {label!r} was made for another model: {len(single_encoder)} of its keys use the text-encoder "
            f"prefix {SINGLE_TEXT_ENCODER_PREFIX} of SD 1.x/2.x LoRAs (e.g. {examples}); SDXL LoRAs name their two "
            "text encoders lora_te1_ and lora_te2_. Use a LoRA trained for SDXL"
        )
    if all(key.startswith(KOHYA_PREFIXES) for key in keys):
        return "kohya"
    if all(key.startswith(DIFFUSERS_PREFIXES) for key in keys):
        return "diffusers"
    foreign = [key for key in keys if not key.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES)]
    hint = ""
    if any(
        key.startswith(("transformer.", "lora_transformer_", "diffusion_model.", "lora_unet_double")) for key in foreign
    ):
        hint = " It looks like a LoRA for a transformer model (Flux, SD3, ...), not for SDXL."
    elif any(key.startswith("base_model.model.") for key in foreign):
        hint = " It looks like a bare PEFT adapter; save it with StableDiffusionXLPipeline.save_lora_weights."
    raise LoraError(
        f"LoRA {label!r} is not an SDXL LoRA in Kohya/A1111 or diffusers format: {len(foreign)} of its "
        f"{len(keys)} keys start with neither lora_unet_/lora_te1_/lora_te2_ nor unet./text_encoder./"
        f"text_encoder_2. (e.g. {', '.join(foreign[:_MAX_EXAMPLES])}).{hint}"
    )


def prepare_lora(pipe: Any, lora_file: LoraFile, label: str) -> PreparedLora:
    """Convert ``lora_file`` to diffusers' layout and check it fits ``pipe``; the pipeline is not modified."""
    keys = list(lora_file.tensors)
    unsupported = sorted({kind for key in keys for fragment, kind in _UNSUPPORTED_FRAGMENTS.items() if fragment in key})
    if unsupported:
        raise LoraError(
            f"LoRA {label!r} is {' and '.join(unsupported)}, which this worker does not apply; use a LoRA, LoCon, "
            "LoHa, LoKr or DoRA file"
        )
    lora_format = detect_format(keys, label)
    if lora_format == "kohya":
        unknown = sorted({key.partition(".")[2] for key in keys} - _KOHYA_LORA_SUFFIXES)
        if unknown:
            raise LoraError(
                f"LoRA {label!r} has keys of no supported adapter type ({', '.join(unknown[:_MAX_EXAMPLES])}; "
                "e.g. LyCORIS IA3, GLoRA or norm layers); use a LoRA, LoCon, LoHa, LoKr or DoRA file"
            )
        missing_up = [
            key
            for key in keys
            if key.endswith("lora_down.weight") and key.replace("lora_down", "lora_up") not in lora_file.tensors
        ]
        if missing_up:
            raise LoraError(
                f"LoRA {label!r} is incomplete: no lora_up weight for {', '.join(missing_up[:_MAX_EXAMPLES])}"
            )
    try:
        # diffusers' own conversion (Kohya sgm block names -> diffusers modules, alphas); it pops from the dict.
        state_dict, network_alphas = type(pipe).lora_state_dict(dict(lora_file.tensors), unet_config=pipe.unet.config)
    except (ValueError, KeyError, IndexError) as error:
        reason = first_line(error, limit=300) or type(error).__name__
        raise LoraError(f"LoRA {label!r} could not be read as an SDXL LoRA: {reason}") from None
    not_lora = [key for key in state_dict if "lora" not in key]
    if not_lora:
        raise LoraError(
            f"LoRA {label!r} holds tensors that are not LoRA weights: {', '.join(not_lora[:_MAX_EXAMPLES])}"
        )

    # Checked in peft form ("<module path>.lora_A.weight"); handed to the loaders in the form each converts reliably.
    prepared = PreparedLora(format=lora_format, state_dict={}, network_alphas=network_alphas or None)
    problems: list[str] = []
    for component in LORA_TARGETS:
        prefix = f"{component}."
        part = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        if not part:
            continue
        model = getattr(pipe, component, None)
        if model is None:
            problems.append(f"it adapts {component}, which this pipeline does not have")
            continue
        peft_part = to_peft_keys(part, component, model)
        layers, component_problems = _check_component(model, component, peft_part)
        prepared.layers[component] = layers
        prepared.state_dict.update({prefix + key: value for key, value in _loader_keys(component, peft_part).items()})
        problems.extend(component_problems)
        component_metadata = {key: value for key, value in (lora_file.metadata or {}).items() if key.startswith(prefix)}
        if component_metadata and not prepared.network_alphas:
            prepared.metadata[component] = component_metadata
    if problems:
        raise LoraError(
            f"LoRA {label!r} does not fit this model: {'; '.join(problems)}{_family_hint(pipe, prepared.state_dict)}"
        )
    if not prepared.components:
        raise LoraError(f"LoRA {label!r} adapts no layer of the UNet or the text encoders")
    _cast_to_components(pipe, prepared.state_dict)
    return prepared


def to_peft_keys(part: dict[str, torch.Tensor], component: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys as peft names them (``<module path>.lora_A.weight``), from any diffusers-era spelling."""
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_DIFFUSERS,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return convert_unet_state_dict_to_peft(part)  # leaves keys already in peft form as they are
    # Key by key, old (to_q_lora) -> new (q_proj.lora_linear_layer) -> peft. diffusers' own detection looks for
    # "to_out_lora" only and gives up on a text-encoder LoRA without out_proj layers.
    converted = convert_state_dict(convert_state_dict(part, DIFFUSERS_OLD_TO_DIFFUSERS), DIFFUSERS_TO_PEFT)
    if not hasattr(model, "text_model"):  # transformers 5 flattens CLIPTextModel (no text_model. prefix)
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    return converted


def _loader_keys(component: str, peft_part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys in the form diffusers' loader for ``component`` converts reliably.

    The UNet loader takes peft keys as they are. The text-encoder loader always converts "to diffusers" and back
    "to peft", guessing the format from q/k/v/out_proj keys; a LoRA adapting only the MLP (fc1/fc2) makes it fail.
    Keys spelled ``.lora_linear_layer.down``/``.up`` are recognised on both legs whatever the layers.
    """
    if component == "unet":
        return peft_part
    return {
        key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): value
        for key, value in peft_part.items()
    }


def _check_component(
    model: torch.nn.Module, component: str, peft_keys: Mapping[str, torch.Tensor]
) -> tuple[int, list[str]]:
    """Number of layers the LoRA adapts in ``model`` and what does not fit (missing layers, wrong shapes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_keys.items():
        module_path, _, rest = key.partition(".lora_")
        by_module.setdefault(module_path, {})["lora_" + rest] = tensor
    missing: list[str] = []
    mismatched: list[str] = []
    for module_path, tensors in by_module.items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            missing.append(module_path)
            continue
        if isinstance(module, BaseTunerLayer):  # another adapter already wraps this layer
            module = module.get_base_layer()
        problem = _shape_problem(module, tensors.get("lora_A.weight"), tensors.get("lora_B.weight"))
        if problem:
            mismatched.append(f"{component}.{module_path} {problem}")
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of its {len(by_module)} {component} layers do not exist in this model "
            f"(e.g. {', '.join(sorted(missing)[:_MAX_EXAMPLES])})"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} {component} layers have the wrong shape (e.g. {', '.join(mismatched[:_MAX_EXAMPLES])})"
        )
    return len(by_module), problems


def _shape_problem(module: torch.nn.Module, down: torch.Tensor | None, up: torch.Tensor | None) -> str | None:
    if down is None or up is None:
        return "has no lora_A/lora_B pair"
    if down.shape[0] != up.shape[1]:
        return f"has mismatched ranks ({down.shape[0]} down, {up.shape[1]} up)"
    if isinstance(module, torch.nn.Linear):
        if down.ndim != 2 or up.ndim != 2:
            return f"is a linear layer but the LoRA weights are {down.ndim}-D (made for a convolution)"
        if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
            return f"maps {module.in_features}->{module.out_features} but the LoRA maps {down.shape[1]}->{up.shape[0]}"
        return None
    if isinstance(module, torch.nn.Conv2d):
        if down.ndim != 4 or up.ndim != 4:
            return f"is a convolution but the LoRA weights are {down.ndim}-D"
        if down.shape[1] != module.in_channels or up.shape[0] != module.out_channels:
            return (
                f"maps {module.in_channels}->{module.out_channels} channels but the LoRA maps "
                f"{down.shape[1]}->{up.shape[0]}"
            )
        if tuple(down.shape[2:]) != tuple(module.kernel_size):
            return f"has a {tuple(module.kernel_size)} kernel but the LoRA's is {tuple(down.shape[2:])}"
        return None
    return f"is a {type(module).__name__}, which LoRA cannot adapt here"


def _family_hint(pipe: Any, state_dict: Mapping[str, torch.Tensor]) -> str:
    """'. It was made for SD 1.x (...)' when a cross-attention key's width tells the LoRA's model family."""
    expected = pipe.unet.config.cross_attention_dim
    widths = [
        int(tensor.shape[1])
        for key, tensor in state_dict.items()
        if key.startswith("unet.") and key.endswith("attn2.to_k.lora_A.weight") and tensor.ndim == 2
    ]
    width = next((width for width in widths if width != expected), None)
    if width is None:
        return ""
    family = _CROSS_ATTENTION_FAMILIES.get(width, "another model")
    return f". It was made for {family} (cross-attention width {width}, this model's is {expected})"


def _cast_to_components(pipe: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Give each tensor its component's dtype and device, so the adapter runs in the model's precision."""
    targets = {}
    for component in LORA_TARGETS:
        model = getattr(pipe, component, None)
        if model is not None:
            parameter = next(model.parameters())
            targets[f"{component}."] = (parameter.dtype, parameter.device)
    for key, tensor in state_dict.items():
        for prefix, (dtype, device) in targets.items():
            if key.startswith(prefix):
                state_dict[key] = tensor.to(device=device, dtype=dtype)
                break
