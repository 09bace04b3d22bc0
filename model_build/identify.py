"""What a checkpoint is: its model family from the tensor names, the shipped config of that family from the shapes.

A file of another family (SD 1.x/2.x, SD3, Flux, a LoRA, a bare VAE, ...) is refused by name, with what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from model_build.architectures import (
    CONFIG_FAMILY,
    FAMILIES,
    KNOWN_CONFIGS,
    expected_checkpoint,
    load_component_config,
)
from model_build.errors import CheckpointError, shown_names
from model_build.layout import (
    BASE_FAMILY,
    COMPONENT_PREFIXES,
    INPAINT_FAMILY,
    REFINER_COMPONENT_PREFIXES,
    REFINER_FAMILY,
)

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"  # conv_in: its input channels tell a UNet's purpose
INPAINT_CHANNELS = 9  # noisy latents (4) + mask (1) + masked image's latents (4)

FAMILY_DESCRIPTIONS = {
    "sd1": "a Stable Diffusion 1.x checkpoint (one CLIP-L text encoder under cond_stage_model.transformer.)",
    "sd2": "a Stable Diffusion 2.x checkpoint (one OpenCLIP-H text encoder under cond_stage_model.model.)",
    "sdxl_mixed": (
        "a mix of an SDXL base and an SDXL refiner (the base's text encoders under conditioner.embedders.0.transformer."
        " or conditioner.embedders.1.model. beside a refiner's under conditioner.embedders.0.model.), a broken merge "
        "or two files joined"
    ),
    "sd3": "a Stable Diffusion 3 checkpoint (an MMDiT with joint_blocks, not a UNet)",
    "flux": "a Flux checkpoint (double_blocks/single_blocks transformer, not a UNet)",
    "lora": "a LoRA (lora_up/lora_down or lora_A/lora_B tensors), not a full checkpoint",
    "vae": "a VAE on its own, not a full checkpoint",
    "diffusers_component": "one component of a Diffusers folder (Diffusers tensor names, not the original layout)",
    "unet_only": "a bare UNet of an unknown family (no text encoders, no VAE)",
    "unknown": "not a Stable Diffusion checkpoint this converter recognises",
}
FAMILY_ADVICE = {
    "lora": "load it as a LoRA at generation time and convert the base SDXL checkpoint it was trained on",
    "vae": "pass it with --vae next to a full SDXL base checkpoint",
    "diffusers_component": "convert the model's original single-file .safetensors checkpoint instead",
    "sdxl_mixed": "convert the base and the refiner each from its own original file, into two --output folders",
}


# --- 3. what is it: family from the names, config from the shapes ---


def unet_input_channels(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    shape = shapes.get(UNET_INPUT)
    return shape[1] if shape is not None and len(shape) == 4 else None


def identify_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``sdxl-base``, ``sdxl-inpaint``, ``sdxl-refiner``, or what the file looks like instead (FAMILY_DESCRIPTIONS).

    An inpainting UNet is told by its first convolution, as diffusers 0.42.1 (``infer_diffusers_model_type``) and
    A1111 1.10 (``sd_models_config``: ``sd_xl_inpaint.yaml`` when that weight has 9 input channels) tell it.
    """
    keys = set(shapes)

    def any_prefix(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if any(re.search(r"(^|[._])lora(_unet|_te\d?)?[._]|\.lora_(up|down|A|B)\.|^lora_", key) for key in keys):
        return "lora"
    if any_prefix("model.diffusion_model.joint_blocks.", "joint_blocks.", "text_encoders.clip_g."):
        return "sd3"
    if any_prefix("double_blocks.", "single_blocks.", "model.diffusion_model.double_blocks."):
        return "flux"
    # The text encoders tell base from refiner: CLIP-L at embedder 0 and OpenCLIP-bigG at embedder 1,
    # or OpenCLIP-bigG alone at embedder 0.
    refiner_encoder = any_prefix(REFINER_COMPONENT_PREFIXES["text_encoder_2"])
    if refiner_encoder and any_prefix(COMPONENT_PREFIXES["text_encoder"], COMPONENT_PREFIXES["text_encoder_2"]):
        return "sdxl_mixed"
    if refiner_encoder:
        return REFINER_FAMILY
    if any_prefix("conditioner.embedders.", "model.diffusion_model.label_emb."):
        return INPAINT_FAMILY if unet_input_channels(shapes) == INPAINT_CHANNELS else BASE_FAMILY
    if any_prefix("cond_stage_model.model."):
        return "sd2"
    if any_prefix("cond_stage_model.transformer."):
        return "sd1"
    if any_prefix("model.diffusion_model."):
        return "unet_only"
    if keys and all(key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for key in keys):
        return "vae"
    if keys and all(key.startswith("first_stage_model.") for key in keys):
        return "vae"
    if any_prefix("down_blocks.", "time_embedding.", "text_model.encoder.", "encoder.down_blocks."):
        return "diffusers_component"
    return "unknown"


def refuse_family(path: Path, family: str, keys: Iterable[str]) -> None:
    if family in FAMILIES:
        return
    advice = FAMILY_ADVICE.get(family, "this converter handles SDXL base, inpainting and refiner checkpoints only")
    first = f" (first tensors: {shown_names(sorted(keys))})" if family == "unknown" else ""
    raise CheckpointError(f"{path.name} looks like {FAMILY_DESCRIPTIONS[family]}{first}; {advice}.")


def expected_checkpoint_shape(config_name: str, key: str) -> tuple[int, ...] | None:
    """One tensor's expected shape, read from the config without building the model."""
    if key != UNET_INPUT:
        tensor = expected_checkpoint(config_name).get(key)
        return tensor.shape if tensor else None
    unet = load_component_config(config_name, "unet")
    return (unet["block_out_channels"][0], unet["in_channels"], unet["conv_in_kernel"], unet["conv_in_kernel"])


def choose_config(
    path: Path, shapes: Mapping[str, tuple[int, ...]], vae_replaced: bool = False, family: str = BASE_FAMILY
) -> str:
    """The shipped config of ``family`` whose tensor shapes this checkpoint has; an error naming sizes if none fits."""
    # Building a config's expected tensors costs a second for sdxl_base, so the UNet's first
    # convolution picks the candidate; all the family's configs are scored only when it matches none.
    configs = FAMILIES[family].configs
    candidates = [name for name in configs if expected_checkpoint_shape(name, UNET_INPUT) == shapes.get(UNET_INPUT)]
    scores = {}
    for name in candidates if len(candidates) == 1 else configs:
        expected = expected_checkpoint(name)
        scores[name] = sum(
            1
            for key, tensor in expected.items()
            if shapes.get(key) == tensor.shape and not (vae_replaced and tensor.component == "vae")
        )
    best = max(scores, key=scores.__getitem__)
    expected = expected_checkpoint(best)
    mismatched = [
        key
        for key, tensor in expected.items()
        if key in shapes and shapes[key] != tensor.shape and not (vae_replaced and tensor.component == "vae")
    ]
    if mismatched:
        channels = unet_input_channels(shapes)
        if channels not in (None, 4, INPAINT_CHANNELS):
            raise CheckpointError(
                f"{path.name} has a UNet with {channels} input channels (an SDXL base has 4, an SDXL inpainting "
                f"model {INPAINT_CHANNELS}): a special-purpose SDXL variant (an instruct-pix2pix style editing "
                "model has 8), which this converter does not support."
            )
        _refuse_other_family_unet(path, shapes, family)
        details = shown_names(f"{k} is {list(shapes[k])}, expected {list(expected[k].shape)}" for k in mismatched)
        raise CheckpointError(
            f"{path.name} is SDXL-shaped but its tensor sizes match no shipped config (closest: {best}, "
            f"{len(mismatched)} tensors differ: {details}). Only the SDXL base, inpainting and refiner architectures "
            f"({', '.join(KNOWN_CONFIGS)}) convert."
        )
    return best


def _refuse_other_family_unet(path: Path, shapes: Mapping[str, tuple[int, ...]], family: str) -> None:
    """A UNet shaped exactly like another family's, beside this family's text encoders: a mixed file."""
    unet_prefix = COMPONENT_PREFIXES["unet"]
    unet_shapes = {key: shape for key, shape in shapes.items() if key.startswith(unet_prefix)}
    for name in KNOWN_CONFIGS:
        if CONFIG_FAMILY[name] == family:
            continue
        wanted = {key: t.shape for key, t in expected_checkpoint(name).items() if t.component == "unet"}
        if wanted == unet_shapes:
            other = FAMILIES[CONFIG_FAMILY[name]].description
            if not any(key.startswith("conditioner.") for key in shapes):
                raise CheckpointError(
                    f"{path.name} has the UNet of {other} ({name}) but no text encoder at all: a full "
                    f"{other.removeprefix('an ')} holds its text encoders too. Convert the complete checkpoint."
                )
            raise CheckpointError(
                f"{path.name} mixes two SDXL models: its text encoders are those of {FAMILIES[family].description}, "
                f"but its UNet is shaped exactly like {other}'s ({name}). A broken merge or two files joined; "
                f"{FAMILY_ADVICE['sdxl_mixed']}."
            )
