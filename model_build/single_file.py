"""The one place that calls diffusers' single-file conversion code, one component at a time.

Runtime code never converts: it loads converted folders with ``from_pretrained``. This module
hands diffusers one component's original-layout tensors at a time, with the shipped config folder
as ``config=`` and the Hub switched off, for two reasons:

* memory: only one component's tensors (the UNet, 5 GB in fp16, at most) are ever held at once,
  instead of the whole checkpoint plus the whole pipeline;
* isolation: the pipeline loader tells the two text encoders apart by comparing widths, and with
  equal widths it silently loads CLIP-L's weights into ``text_encoder_2``. Given only one encoder's
  tensors, it cannot pick the wrong ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Conversion never reaches the network, whatever diffusers or transformers would like to look up.

    huggingface_hub reads HF_HUB_OFFLINE once, when it is imported, so setting the variable is not
    enough in a process that imported it already (the worker): its flag is switched too, and both
    are restored afterwards.
    """
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    saved_flag = constants.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(names, "1"))
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers' and transformers' progress bars and warnings while converting; restore them after.

    The converter reports its own progress; the libraries' bars and their warnings about casting
    (which the converter does on purpose) would only bury its messages.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = []
    for library in (diffusers_logging, transformers_logging):
        saved.append((library, library.get_verbosity(), library.is_progress_bar_enabled()))
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, verbosity, bar in saved:
            library.set_verbosity(verbosity)
            if bar:
                library.enable_progress_bar()


def load_component(
    component: str, original_tensors: dict[str, torch.Tensor], config_folder: Path, dtype: torch.dtype
) -> torch.nn.Module:
    """Build one pipeline component from its original-layout tensors with diffusers' single-file code."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = {"config": str(config_folder), "subfolder": component, "local_files_only": True}
    with offline():
        # diffusers 0.42 renamed from_single_file's torch_dtype to dtype (the old name warns); its CLIP helper did not.
        if component == "unet":
            return UNet2DConditionModel.from_single_file(original_tensors, dtype=dtype, **common)
        if component == "vae":
            return AutoencoderKL.from_single_file(original_tensors, dtype=dtype, **common)
        # The same function the pipeline's from_single_file uses for its text encoders.
        if component == "text_encoder":
            return create_diffusers_clip_model_from_ldm(CLIPTextModel, original_tensors, torch_dtype=dtype, **common)
        if component == "text_encoder_2":
            return create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, original_tensors, torch_dtype=dtype, **common
            )
    raise ValueError(f"unknown component {component!r}")


def write_pipeline_files(
    config_folder: Path, staging: Path, scheduler_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The weightless parts of the pipeline folder: model_index.json, scheduler and the tokenizers.

    ``scheduler_overrides`` change the family's scheduler config (v-prediction: :mod:`model_build.prediction`).
    Returns the tokenizers (both for a base, tokenizer_2 alone for a refiner), so the proof's
    reload need not parse their 3.6 MB JSON files again.
    """
    import shutil

    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    tokenizers = {}
    with offline():
        shutil.copyfile(config_folder / "model_index.json", staging / "model_index.json")
        scheduler = EulerDiscreteScheduler.from_pretrained(
            config_folder, subfolder="scheduler", **(scheduler_overrides or {})
        )
        scheduler.save_pretrained(staging / "scheduler")
        for name in ("tokenizer", "tokenizer_2"):
            if not (config_folder / name).is_dir():
                continue  # the refiner has no CLIP-L, so no first tokenizer
            tokenizers[name] = CLIPTokenizer.from_pretrained(config_folder / name, local_files_only=True)
            tokenizers[name].save_pretrained(staging / name)
    return tokenizers


def load_pipeline(
    folder: Path, dtype: torch.dtype, pipeline_class: str = "StableDiffusionXLPipeline", **components: Any
):
    """Load a converted folder as the runtime does: ``from_pretrained``, offline (``components`` preloaded).

    ``pipeline_class``: the family's diffusers pipeline (``StableDiffusionXLImg2ImgPipeline`` for a refiner).
    """
    import diffusers

    with offline():
        return getattr(diffusers, pipeline_class).from_pretrained(
            folder, dtype=dtype, local_files_only=True, **components
        )
