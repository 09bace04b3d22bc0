"""Full-size SDXL with random weights, for speed and memory measurements on the GPU.

Speed does not depend on weight values, so the benchmarks build the public SDXL base architecture
from the configs shipped in ``model_build`` (no checkpoint, no Hub), fill it with fan-in scaled
random weights on the GPU (finite activations end to end), and, where the worker's own loading
path is measured, save it as a converted folder with a manifest that :class:`worker.generation.engine.Engine`
accepts. Such a folder is marked ``dev_model`` so everything that reads it says its images are noise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from model_build.architectures import COMPONENTS


@torch.no_grad()
def random_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fan-in scaled normal weights, zero biases, unit norms: finite activations through the whole UNet."""
    for name, parameter in module.named_parameters():
        if parameter.ndim >= 2:
            parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)


def build_random_pipeline(
    config: str = "sdxl_base", device: str = "cuda", dtype: torch.dtype = torch.float16, seed: int = 0
) -> Any:
    """An SDXL pipeline of architecture ``config`` with random weights, built straight on ``device``."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.schedulers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from model_build.architectures import empty_component, materialize

    folder = materialize(config, Path(tempfile.mkdtemp(prefix="sdxl-random-config-")))
    generator = torch.Generator(device).manual_seed(seed)
    components: dict[str, Any] = {}
    previous = torch.get_default_dtype()
    for name in COMPONENTS:
        torch.set_default_dtype(dtype)
        try:
            module = empty_component(config, name)  # on meta: no memory, no init cost
        finally:
            torch.set_default_dtype(previous)
        module = module.to_empty(device=device)
        random_init(module, generator)
        with torch.no_grad():  # CLIP's position ids are a non-persistent buffer: on meta they hold nothing
            for buffer_name, buffer in module.named_buffers():
                if buffer_name.endswith("position_ids"):
                    buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))
        components[name] = module.eval().requires_grad_(False)
    components["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    components["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    components["scheduler"] = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_as_model_dir(pipe: Any, destination: Path, dtype_name: str = "fp16") -> Path:
    """Save ``pipe`` as a converted folder (Diffusers layout + manifest) that the worker can load."""
    from model_build.convert import library_versions
    from model_build.manifest import (
        CONVERTER_VERSION,
        MANIFEST_FORMAT,
        Manifest,
        SourceRecord,
        describe_files,
        write_manifest,
    )

    pipe.save_pretrained(destination, safe_serialization=True)
    manifest = Manifest(
        format=MANIFEST_FORMAT,
        converter_version=CONVERTER_VERSION,
        source=SourceRecord(name="random-full-size-sdxl", sha256="", size=0),
        config=pipe.unet.config.get("_name_or_path") or "random",
        dev_model=True,  # random weights: the worker labels every image as noise
        dtype=dtype_name,
        versions=library_versions(),
        files=describe_files(destination),
    )
    write_manifest(destination, manifest)
    return destination
