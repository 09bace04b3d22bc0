"""An SDXL embedding file, read once and checked against the text encoders it is for.

SDXL embeddings (A1111, kohya's sd-scripts, Civitai) are one ``.safetensors`` file with two tensors: ``clip_l``
(``[vectors, 768]``, for ``text_encoder``) and ``clip_g`` (``[vectors, 1280]``, for ``text_encoder_2``), the same
number of vectors in each. The widths are checked against the encoders actually loaded (768 and 1280 for SDXL).
Everything else is refused by name with the reason: SD 1.x embeddings (one 768-wide tensor, ``emb_params`` or
``string_to_param``), SD 2.x ones (1024 wide), LoRAs, pickles (which can run code when loaded), damaged files,
more vectors than a 75-token chunk holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import EmbeddingFailed, first_line
from core.safetensors_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    SNIFF_BYTES,
    SafetensorsDamage,
    foreign_format,
    parse_header,
    pickle_suffix,
)

PARTS = ("clip_l", "clip_g")  # the tensors of an SDXL embedding, for text_encoder and text_encoder_2
MAX_FILE_BYTES = 16 << 20  # 75 vectors of 768 + 1280 in float32 are 0.6 MB; a larger file is something else
MAX_VECTORS = 75  # what one chunk holds: a longer embedding could never stay whole (A1111 keeps it in one chunk)
_WIDTH_FAMILIES = {768: "an SD 1.x embedding", 1024: "an SD 2.x embedding"}


@dataclass(frozen=True)
class EmbeddingFile:
    """An embedding's vectors per text encoder, checked."""

    name: str
    path: Path
    sha256: str
    vectors: dict[str, torch.Tensor]  # "clip_l"/"clip_g" -> [vectors, width]

    @property
    def count(self) -> int:
        return int(self.vectors["clip_l"].shape[0])


def read_embedding(path: Path, name: str, field: str, widths: dict[str, int]) -> EmbeddingFile:
    """Read ``path`` (the file ``name`` means) and check it fits encoders of ``widths`` (part -> width)."""
    what = f"{field}: {name!r} names the embedding {path}"
    fix = "use an SDXL embedding (its .safetensors holds clip_l and clip_g), or rename the file to keep the word text"
    if pickle_suffix(path):
        raise EmbeddingFailed(
            f"{what}, a pickle file ({', '.join(PICKLE_SUFFIXES)}), which can run code when loaded and is never "
            f"opened; convert it to {SAFETENSORS_SUFFIX}"
        )
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise EmbeddingFailed(
                f"{what}, which has {size:,} bytes: far more than an embedding ({MAX_FILE_BYTES >> 20} MiB at most; "
                "a LoRA or a checkpoint?); put only embeddings under EMBEDDINGS_DIR"
            )
        data = path.read_bytes()
    except OSError as error:
        raise EmbeddingFailed(f"{what}, which cannot be read ({first_line(error)}); check the file") from None
    tensors = _tensors(data, what)
    vectors = {part: _vectors(tensors, part, what, fix) for part in PARTS if part in tensors}
    if len(vectors) < len(PARTS):
        raise EmbeddingFailed(f"{what}, {_family(tensors)}, not an SDXL embedding (clip_l and clip_g); {fix}")
    extra = sorted(set(tensors) - set(PARTS))
    if extra:
        raise EmbeddingFailed(f"{what}, whose tensors besides clip_l and clip_g ({', '.join(extra[:5])}) mean nothing")
    for part, tensor in vectors.items():
        if tensor.shape[1] != widths[part]:
            raise EmbeddingFailed(
                f"{what}, whose {part} vectors are {tensor.shape[1]} wide, where this model's "
                f"{'text_encoder' if part == 'clip_l' else 'text_encoder_2'} takes {widths[part]}: it was made for "
                f"another model; {fix}"
            )
    counts = {part: int(tensor.shape[0]) for part, tensor in vectors.items()}
    if counts["clip_l"] != counts["clip_g"]:
        raise EmbeddingFailed(
            f"{what}, with {counts['clip_l']} clip_l vectors but {counts['clip_g']} clip_g vectors (an SDXL "
            "embedding has as many of each); the file is damaged or not an embedding"
        )
    if not 1 <= counts["clip_l"] <= MAX_VECTORS:
        raise EmbeddingFailed(
            f"{what}, with {counts['clip_l']} vectors: an embedding holds 1 to {MAX_VECTORS} (one 75-token chunk)"
        )
    return EmbeddingFile(name, path, hashlib.sha256(data).hexdigest(), vectors)


def _tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    other = foreign_format(data[:SNIFF_BYTES], len(data))
    if other is not None:
        description, is_pickle = other
        if is_pickle:
            raise EmbeddingFailed(
                f"{what}, which is {description} with a {SAFETENSORS_SUFFIX} name: pickles can run code when loaded "
                "and are never opened; convert it to real safetensors"
            )
        raise EmbeddingFailed(f"{what}, which is {description}, not a {SAFETENSORS_SUFFIX} embedding")
    try:
        parse_header(data, len(data))
    except SafetensorsDamage as damage:
        raise EmbeddingFailed(f"{what}, which is not a valid {SAFETENSORS_SUFFIX} file: the file {damage}") from None
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as error:
        raise EmbeddingFailed(f"{what}, which is not a valid {SAFETENSORS_SUFFIX} file: {first_line(error)}") from None


def _vectors(tensors: dict[str, torch.Tensor], part: str, what: str, fix: str) -> torch.Tensor:
    tensor = tensors[part]
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)  # one vector, saved without its row dimension
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise EmbeddingFailed(
            f"{what}, whose {part} is a {tensor.dtype} tensor of shape {list(tensor.shape)}, not [vectors, width] "
            f"floats; {fix}"
        )
    if not torch.isfinite(tensor).all():
        raise EmbeddingFailed(f"{what}, whose {part} vectors hold NaN or infinite values; the file is damaged")
    return tensor


def _family(tensors: dict[str, torch.Tensor]) -> str:
    """What a file without clip_l and clip_g is, in words."""
    keys = sorted(tensors)
    if not keys:
        return "a file without tensors"
    if any("lora" in key or key.endswith(".alpha") for key in keys):
        return "a LoRA (name it in loras, not in the prompt)"
    if len(keys) == 1 or "emb_params" in tensors:
        tensor = tensors.get("emb_params", tensors[keys[0]])
        width = int(tensor.shape[-1]) if tensor.ndim else 0
        family = _WIDTH_FAMILIES.get(width, "a one-encoder embedding")
        return f"{family} (one tensor {keys[0]!r} of {width}-wide vectors)"
    return f"a file of tensors {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
