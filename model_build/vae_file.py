"""A separate VAE file (``--vae``) in any of the three layouts VAE files come in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model_build.architectures import (
    expected_checkpoint,
    load_component_config,
)
from model_build.checkpoint import name_problems, refuse_non_float_weights
from model_build.checkpoint_file import TensorReader, check_file_format, read_header
from model_build.errors import CheckpointError, shown_names
from model_build.layout import (
    COMPONENT_PREFIXES,
    to_original_layout,
)
from model_build.tensor_checks import check_finite

# --- a separate VAE (--vae), in any of the three layouts VAE files come in ---

_LEGACY_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass(frozen=True)
class VaeFile:
    path: Path
    layout: str  # how the file named its tensors
    tensors: dict[str, torch.Tensor]  # original layout, with the first_stage_model. prefix, source dtype
    ignored: tuple[str, ...]


def load_vae_file(path: Path, config_name: str) -> VaeFile:
    """Read a VAE file (original layout with or without ``first_stage_model.``, or Diffusers layout).

    Returns its tensors renamed to the checkpoint's original layout, so the VAE is checked,
    converted and proven exactly like one inside a checkpoint.
    """
    path = Path(path)
    check_file_format(path, role="--vae file")
    header = read_header(path)
    prefix = COMPONENT_PREFIXES["vae"]
    keys = set(header.tensors)
    ignored = tuple(sorted(key for key in keys if key.startswith(("loss.", "model_ema."))))  # training leftovers
    keys -= set(ignored)
    where = f"--vae {path.name}"
    refuse_non_float_weights(f"--vae {path.name}", header.tensors, keys)
    with TensorReader(path, header) as reader:
        raw = {key: reader.get(key) for key in sorted(keys)}
    for key, tensor in raw.items():
        check_finite(tensor, key, where)
    if any(key.startswith(prefix) for key in keys):
        layout = f"original ({prefix}…)"
        tensors = raw
    elif "encoder.conv_in.weight" in keys and any(key.startswith("encoder.down.") for key in keys):
        layout = "original (no prefix)"
        tensors = {prefix + key: tensor for key, tensor in raw.items()}
    elif any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        layout = "diffusers"
        renamed = {}
        for key, tensor in raw.items():
            for old, new in _LEGACY_VAE_ATTENTION.items():  # diffusers < 0.14 attention names
                key = key.replace(old, new)
            renamed[key] = tensor
        try:
            tensors = to_original_layout("vae", renamed, load_component_config(config_name, "vae"))
        except KeyError as error:
            raise CheckpointError(f"{path.name}: unknown Diffusers VAE tensor {error}; is this an SDXL VAE?") from error
    else:
        raise CheckpointError(
            f"{path.name} does not look like a VAE (first tensors: {shown_names(sorted(keys))}); --vae takes an SDXL "
            "VAE .safetensors in the original or the Diffusers layout"
        )
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    stray = sorted(key for key in shapes if not key.startswith(prefix))
    if stray:
        raise CheckpointError(f"{path.name} holds tensors that are not the VAE's ({shown_names(stray)})")
    wanted = {key: t.shape for key, t in expected_checkpoint(config_name).items() if t.component == "vae"}
    missing = sorted(set(wanted) - set(shapes))
    unknown = sorted(set(shapes) - set(wanted))
    wrong = sorted(key for key in set(shapes) & set(wanted) if shapes[key] != wanted[key])
    problems = name_problems(missing, unknown, len(wanted))
    if wrong:
        problems.append(
            f"{len(wrong)} with the wrong shape ("
            + shown_names(f"{k} is {list(shapes[k])}, expected {list(wanted[k])}" for k in wrong)
            + ")"
        )
    if problems:
        raise CheckpointError(
            f"--vae {path.name} ({layout} layout) is not a VAE for this checkpoint ({config_name}): "
            + "; ".join(problems)
        )
    return VaeFile(path, layout, tensors, ignored)
