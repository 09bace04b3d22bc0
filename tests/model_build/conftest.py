"""Fixtures of the model_build tests: real tiny checkpoints derived from the dev model.

Every broken or foreign checkpoint in these tests is the dev model loaded with safetensors, edited
as a dict and saved again, so the converter meets real files, never mocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

WriteCheckpoint = Callable[..., Path]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The dev model's tensors are tiny: on 2 shared cores, extra intra-op threads only spin and wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dev_tensors(dev_checkpoint: Path) -> dict[str, torch.Tensor]:
    """The dev checkpoint's tensors (fp32, original layout). Do not edit in place: copy the dict, replace entries."""
    return load_file(str(dev_checkpoint))


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> WriteCheckpoint:
    """Save a dict of tensors as a safetensors checkpoint under tmp_path and return its path."""

    def write(tensors: dict[str, torch.Tensor], name: str = "edited.safetensors", metadata=None) -> Path:
        path = tmp_path / name
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path), metadata=metadata)
        return path

    return write
