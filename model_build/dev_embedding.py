"""Random textual-inversion embeddings written as real embedding files: the dev embedding.

An SDXL embedding (A1111, kohya's sd-scripts, Civitai) is one ``.safetensors`` file holding ``clip_l``
(``[vectors, 768]``) and ``clip_g`` (``[vectors, 1280]``). Real ones do not fit the dev model's small text encoders,
so ``python -m model_build dev-embedding OUT.safetensors --model models/sdxl-dev`` makes one whose widths are the
model's (read from its encoders' configs); without ``--model`` the widths are SDXL's. ``--sd15`` writes an SD 1.x
embedding instead (one ``emb_params`` tensor of 768-wide vectors, as A1111 saves them), which an SDXL worker refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}
SD15_WIDTH = 768


def model_widths(model_dir: Path) -> dict[str, int]:
    """The token-embedding widths of a converted model's two text encoders."""
    widths = {}
    for part, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        config = json.loads((model_dir / folder / "config.json").read_text())
        widths[part] = int(config["hidden_size"])
    return widths


def random_embedding(widths: dict[str, int], vectors: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """``clip_l`` and ``clip_g`` of ``vectors`` random vectors each, at the scale of CLIP's token embeddings (~0.02)."""
    generator = torch.Generator().manual_seed(seed)
    return {part: 0.02 * torch.randn(vectors, width, generator=generator) for part, width in sorted(widths.items())}


def write_dev_embedding(
    output: Path,
    widths: dict[str, int] | None = None,
    vectors: int = 4,
    seed: int = 0,
    sd15: bool = False,
) -> Path:
    """Write a random embedding file (SDXL's two tensors, or ``sd15``: A1111's one ``emb_params``) to ``output``."""
    from safetensors.torch import save_file

    if sd15:
        generator = torch.Generator().manual_seed(seed)
        tensors = {"emb_params": 0.02 * torch.randn(vectors, SD15_WIDTH, generator=generator)}
    else:
        tensors = random_embedding(widths or SDXL_WIDTHS, vectors, seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(output))
    return output
