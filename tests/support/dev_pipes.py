"""The dev model as a plain diffusers pipeline, for tests that check the prompt encoder against diffusers itself."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def load_dev_pipe(dev_model_dir: Path) -> Any:
    """``StableDiffusionXLPipeline`` of the converted dev model, fp32 on the CPU, quiet."""
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(dev_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_torch_thread() -> Iterator[None]:
    """Body of a module fixture: exact comparisons on one thread (OpenMP spin-waits slow the busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
