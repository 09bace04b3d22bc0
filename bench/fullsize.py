"""Full-size SDXL with random weights, for speed and memory measurements on the GPU.

Speed does not depend on weight values, so the benchmarks build the public SDXL base architecture
from the configs shipped in ``model_build`` (no checkpoint, no Hub), fill it with fan-in scaled
random weights on the GPU (finite activations end to end), and, where the worker's own loading
path is measured, save it as a converted folder with a manifest that :class:`worker.generation.engine.Engine`
accepts. Such a folder is marked ``dev_model`` so everything that reads it says its images are noise. A folder can
also be saved as the converter saves a v-prediction model (its scheduler config and manifest say so), and the
inpainting config builds the 9-channel inpainting family.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model_build.architectures import COMPONENTS

if TYPE_CHECKING:
    from model_build.manifest import Prediction


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
    """An SDXL pipeline of architecture ``config`` with random weights, built straight on ``device``: the pipeline
    class of its family (``StableDiffusionXLInpaintPipeline`` for the inpainting configs, as the converter writes)."""
    import diffusers
    from diffusers.schedulers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from model_build.architectures import empty_component, family_of_config, materialize

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
    pipe = getattr(diffusers, family_of_config(config).pipeline_class)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_as_model_dir(
    pipe: Any,
    destination: Path,
    dtype_name: str = "fp16",
    *,
    config: str | None = None,
    prediction: Prediction | None = None,
) -> Path:
    """Save ``pipe`` as a converted folder (Diffusers layout + manifest) that the worker can load.

    ``config``: the shipped config it was built from, recorded with its family (an inpainting folder must say so).
    ``prediction``: what the converter would have decided; its scheduler config change is the converter's
    (:func:`model_build.prediction.scheduler_overrides`), and the manifest records it.
    """
    from model_build.architectures import family_of_config
    from model_build.convert import library_versions
    from model_build.manifest import (
        CONVERTER_VERSION,
        MANIFEST_FORMAT,
        Manifest,
        SourceRecord,
        describe_files,
        write_manifest,
    )
    from model_build.prediction import scheduler_overrides

    pipe.save_pretrained(destination, safe_serialization=True)
    if prediction is not None:  # the pipe keeps its own scheduler: only the folder's config changes
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler_overrides(prediction))
        scheduler.save_pretrained(destination / "scheduler")
    family = {"family": family_of_config(config).name} if config else {}
    manifest = Manifest(
        format=MANIFEST_FORMAT,
        converter_version=CONVERTER_VERSION,
        source=SourceRecord(name="random-full-size-sdxl", sha256="", size=0),
        config=config or pipe.unet.config.get("_name_or_path") or "random",
        **family,
        **({"prediction": prediction} if prediction is not None else {}),
        dev_model=True,  # random weights: the worker labels every image as noise
        dtype=dtype_name,
        versions=library_versions(),
        files=describe_files(destination),
    )
    write_manifest(destination, manifest)
    return destination
