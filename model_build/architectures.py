"""The Diffusers configs this project ships, the model family each belongs to, and the tensors each expects.

Three families convert: the SDXL base (``StableDiffusionXLPipeline``: UNet, VAE, CLIP-L and
OpenCLIP-bigG), the SDXL inpainting model (``StableDiffusionXLInpaintPipeline``: the base's
components, a UNet with 9 input channels) and the SDXL refiner (``StableDiffusionXLImg2ImgPipeline``:
UNet, VAE and OpenCLIP-bigG, conditioned on an aesthetic score). Each has a public configuration and
a dev one:

* ``sdxl_base``: stabilityai/stable-diffusion-xl-base-1.0;
* ``sdxl_inpaint``: the base's configs with ``in_channels: 9``, as A1111's ``sd_xl_inpaint.yaml``
  says (``sd_xl_base.yaml`` with 9 input channels) and diffusers 0.42.1's single-file loader infers
  (``infer_diffusers_model_type``: a 9-channel ``input_blocks.0.0.weight`` beside SDXL's text
  encoders is ``xl_inpaint``, configured from diffusers/stable-diffusion-xl-1.0-inpainting-0.1);
  the pipeline does not ask for an aesthetic score (``requires_aesthetics_score: false``);
* ``sdxl_refiner``: stabilityai/stable-diffusion-xl-refiner-1.0 (the UNet config is what diffusers'
  ``create_unet_diffusers_config_from_ldm`` derives from Stability's ``sd_xl_refiner.yaml``:
  4 levels of 384..1536 channels, attention in levels 1 and 2, 4 transformer layers, 64-wide heads);
* ``dev_tiny``, ``dev_inpaint`` and ``dev_refiner``: the built-in dev models, miniatures with the
  same block structure. The dev refiner's VAE and text encoder have the dev base's configs, as the
  real refiner's have the real base's, so a dev base and a dev refiner share one latent space; the
  dev inpainting model is the dev base with a 9-channel UNet input.

Each is a complete pipeline folder (minus weights) once ``materialize`` has copied the shared CLIP
tokenizer files in, so diffusers' single-file loader can take it as ``config=`` and never look for
anything on the Hub.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from model_build.layout import (
    BASE_FAMILY,
    COMPONENT_PREFIXES,
    INPAINT_FAMILY,
    REFINER_FAMILY,
    component_prefixes,
    to_original_layout,
)
from model_build.manifest import Manifest

CONFIG_ROOT = Path(__file__).parent / "configs"
TOKENIZER_FILES_DIR = CONFIG_ROOT / "clip_tokenizer"
# The base's components; the runtime and the full-size bench iterate over these.
COMPONENTS = tuple(COMPONENT_PREFIXES)
REFINER_COMPONENTS = tuple(component_prefixes(REFINER_FAMILY))


@dataclass(frozen=True)
class Family:
    name: str  # recorded in manifest.json as "family"
    description: str  # for messages: "an SDXL base checkpoint"
    pipeline_class: str  # the diffusers pipeline that loads a converted folder
    components: tuple[str, ...]
    configs: tuple[str, ...]  # shipped configs of this family: the public one first, then the dev one


FAMILIES: dict[str, Family] = {
    BASE_FAMILY: Family(
        BASE_FAMILY, "an SDXL base checkpoint", "StableDiffusionXLPipeline", COMPONENTS, ("sdxl_base", "dev_tiny")
    ),
    REFINER_FAMILY: Family(
        REFINER_FAMILY,
        "an SDXL refiner checkpoint",
        "StableDiffusionXLImg2ImgPipeline",
        REFINER_COMPONENTS,
        ("sdxl_refiner", "dev_refiner"),
    ),
    INPAINT_FAMILY: Family(
        INPAINT_FAMILY,
        "an SDXL inpainting checkpoint",
        "StableDiffusionXLInpaintPipeline",
        COMPONENTS,
        ("sdxl_inpaint", "dev_inpaint"),
    ),
}
CONFIG_FAMILY: dict[str, str] = {config: family.name for family in FAMILIES.values() for config in family.configs}
KNOWN_CONFIGS = tuple(CONFIG_FAMILY)


@dataclass(frozen=True)
class ExpectedTensor:
    component: str
    shape: tuple[int, ...]


def config_dir(name: str) -> Path:
    if name not in KNOWN_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(KNOWN_CONFIGS)}")
    return CONFIG_ROOT / name


def family_of_config(name: str) -> Family:
    config_dir(name)  # an unknown name is named as such
    return FAMILIES[CONFIG_FAMILY[name]]


def family_of_manifest(manifest: Manifest) -> Family:
    """The family of a converted folder from its manifest.json (read by the runtime to pick the pipeline class).

    Manifests written before the refiner converted have no "family": every one of them is a base.
    """
    name = manifest.family or BASE_FAMILY
    if name not in FAMILIES:
        raise ValueError(
            f"manifest.json says family {name!r}, which this version does not know (known: {', '.join(FAMILIES)}); "
            "convert the checkpoint again with this version"
        )
    return FAMILIES[name]


def load_component_config(name: str, component: str) -> dict:
    return json.loads((config_dir(name) / component / "config.json").read_text())


def materialize(name: str, destination: Path) -> Path:
    """Write a complete weightless pipeline folder for ``name`` (configs plus its tokenizers' files)."""
    shutil.copytree(config_dir(name), destination, dirs_exist_ok=True)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (destination / tokenizer).is_dir():  # the refiner has tokenizer_2 only
            for file in ("vocab.json", "merges.txt"):
                shutil.copyfile(TOKENIZER_FILES_DIR / file, destination / tokenizer / file)
    return destination


def empty_component(name: str, component: str) -> torch.nn.Module:
    """The component's module for config ``name`` on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if component not in family_of_config(name).components:
        raise ValueError(f"config {name} has no {component}")
    folder = config_dir(name) / component
    with init_empty_weights():
        if component == "unet":
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        if component == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        text_config = CLIPTextConfig.from_pretrained(folder)
        if component == "text_encoder":
            return CLIPTextModel(text_config)
        if component == "text_encoder_2":
            return CLIPTextModelWithProjection(text_config)
    raise ValueError(f"unknown component {component!r}")


def persistent_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers: exactly what a checkpoint must provide."""
    return dict(module.state_dict())


@functools.cache
def expected_checkpoint(name: str) -> dict[str, ExpectedTensor]:
    """Every original-layout key a checkpoint for config ``name`` must hold, with its shape."""
    family = family_of_config(name)
    expected: dict[str, ExpectedTensor] = {}
    for component in family.components:
        module = empty_component(name, component)
        config = load_component_config(name, component)
        state = persistent_state_dict(module)
        for key, tensor in to_original_layout(component, state, config, family.name).items():
            expected[key] = ExpectedTensor(component, tuple(tensor.shape))
    return expected
