"""The Diffusers configs this project ships, and the tensors each one expects.

``sdxl_base`` is the public SDXL base 1.0 configuration; ``dev_tiny`` is the built-in dev model,
a miniature with SDXL's block structure. Both are complete pipeline folders (minus weights) once
``materialize`` has copied the shared CLIP tokenizer files in, so diffusers' single-file loader
can take them as ``config=`` and never look for anything on the Hub.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from model_build.layout import COMPONENT_PREFIXES, to_original_layout

CONFIG_ROOT = Path(__file__).parent / "configs"
TOKENIZER_FILES_DIR = CONFIG_ROOT / "clip_tokenizer"
KNOWN_CONFIGS = ("sdxl_base", "dev_tiny")
COMPONENTS = tuple(COMPONENT_PREFIXES)


@dataclass(frozen=True)
class ExpectedTensor:
    component: str
    shape: tuple[int, ...]


def config_dir(name: str) -> Path:
    if name not in KNOWN_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(KNOWN_CONFIGS)}")
    return CONFIG_ROOT / name


def load_component_config(name: str, component: str) -> dict:
    return json.loads((config_dir(name) / component / "config.json").read_text())


def materialize(name: str, destination: Path) -> Path:
    """Write a complete weightless pipeline folder for ``name`` (configs plus tokenizer files)."""
    shutil.copytree(config_dir(name), destination, dirs_exist_ok=True)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for file in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_FILES_DIR / file, destination / tokenizer / file)
    return destination


def empty_component(name: str, component: str) -> torch.nn.Module:
    """The component's module for config ``name`` on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
    expected: dict[str, ExpectedTensor] = {}
    for component in COMPONENTS:
        module = empty_component(name, component)
        config = load_component_config(name, component)
        for key, tensor in to_original_layout(component, persistent_state_dict(module), config).items():
            expected[key] = ExpectedTensor(component, tuple(tensor.shape))
    return expected
