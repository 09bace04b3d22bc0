"""An embedding's vectors into tokenizer / text-encoder pairs, with diffusers' textual-inversion loader, and out.

diffusers' ``load_textual_inversion`` adds one token per vector (``tok``, ``tok_1``, ...) to a tokenizer and the
vectors as new rows of the text encoder's token-embedding matrix. It is run here on a loader of its own, without the
pipeline: the pipeline's version takes offload hooks off every component and puts them back with its own settings,
and the worker places its modules itself (:mod:`worker.model.placement`). The matrix is grown first, to the size
diffusers then asks for, without transformers' mean-and-covariance initialisation of the new rows (diffusers
overwrites them at once; the covariance of a 49,408 x 1,280 matrix costs seconds on a CPU); what random numbers
growing and shrinking draw come from a forked generator, so loading never moves the global random state.

Pooled output
    SDXL's text encoders carry transformers' legacy ``eos_token_id: 2`` in their configs, with which the pooled
    output is read at the largest token id of a row instead of at its end-of-text token: with added tokens (ids past
    the vocabulary) that is an embedding's position. SDXL was trained with the end-of-text position (OpenCLIP's
    argmax over a vocabulary whose largest id is end-of-text), kohya's sd-scripts trains SDXL embeddings that way,
    and A1111 and ComfyUI read it there. So once tokens are added the encoder is told its real end-of-text id; for
    every row without added tokens both rules pick the same position, so nothing else changes.

All or nothing: if loading into one pair fails, the pairs already done are unloaded again (diffusers'
``unload_textual_inversion``) before the error goes on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.loaders import TextualInversionLoaderMixin

from core.errors import EmbeddingFailed

LEGACY_EOS_TOKEN_ID = 2  # transformers' CLIP: "the eos_token_id was incorrect before PR #24773"


@dataclass(frozen=True)
class TokenTarget:
    """One tokenizer / text encoder pair and which part of an SDXL embedding it takes."""

    part: str  # "clip_l" or "clip_g"
    tokenizer: Any
    text_encoder: torch.nn.Module

    @property
    def width(self) -> int:
        return int(self.text_encoder.get_input_embeddings().embedding_dim)


class _Loader(TextualInversionLoaderMixin):
    """diffusers' loader over explicit pairs; no pipeline components, so no offload hooks to take off."""

    hf_device_map = None

    @property
    def components(self) -> dict[str, Any]:
        return {}


_LOADER = _Loader()


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens diffusers gives an embedding of ``count`` vectors."""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def add_vectors(targets: Sequence[TokenTarget], token: str, vectors: dict[str, torch.Tensor], label: str) -> None:
    """Add ``vectors[target.part]`` under ``token`` to every target, or to none (see the module docstring)."""
    done: list[TokenTarget] = []
    try:
        for target in targets:
            _add(target, token, vectors[target.part], label)
            done.append(target)
    except BaseException:
        remove_vectors(reversed(done), token, int(vectors[targets[0].part].shape[0]))
        raise


def remove_vectors(targets: Iterable[TokenTarget], token: str, count: int) -> None:
    """Take an embedding's tokens and rows out of every target again (those of them that are there)."""
    for target in targets:
        present = [name for name in vector_tokens(token, count) if name in target.tokenizer.added_tokens_encoder]
        if present:
            with _forked_random_state(target.text_encoder):
                _LOADER.unload_textual_inversion(present, tokenizer=target.tokenizer, text_encoder=target.text_encoder)


def _add(target: TokenTarget, token: str, vectors: torch.Tensor, label: str) -> None:
    tokenizer, text_encoder = target.tokenizer, target.text_encoder
    weight = text_encoder.get_input_embeddings().weight
    if weight.device.type == "meta":
        raise EmbeddingFailed(
            f"{label}: embeddings need the text encoders' weights in memory, and OFFLOAD=sequential keeps none there; "
            "run this worker with OFFLOAD=model or none"
        )
    rows = weight.shape[0]
    try:
        with _forked_random_state(text_encoder):
            # Grown first without transformers' initialisation; diffusers' own resize to this size is then a no-op.
            text_encoder.resize_token_embeddings(len(tokenizer) + int(vectors.shape[0]), mean_resizing=False)
            _LOADER.load_textual_inversion(vectors, token=token, tokenizer=tokenizer, text_encoder=text_encoder)
    except BaseException:
        remove_vectors([target], token, int(vectors.shape[0]))
        if text_encoder.get_input_embeddings().weight.shape[0] != rows:
            with _forked_random_state(text_encoder):
                text_encoder.resize_token_embeddings(rows, mean_resizing=False)
        raise
    model = getattr(text_encoder, "text_model", text_encoder)
    eos = tokenizer.eos_token_id
    if getattr(model, "eos_token_id", None) == LEGACY_EOS_TOKEN_ID and eos is not None and eos != LEGACY_EOS_TOKEN_ID:
        model.eos_token_id = eos  # pooled output at end-of-text, as SDXL was trained (module docstring)


@contextmanager
def _forked_random_state(module: torch.nn.Module) -> Iterator[None]:
    device = next(module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
