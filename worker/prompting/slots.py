"""The pipeline's tokenizer / text encoder pairs, in the order diffusers uses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import torch

ENCODER_NAMES: Final = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class EncoderSlot:
    """One tokenizer / text encoder pair of the pipeline."""

    name: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    sequence_length: int  # 77

    @property
    def num_layers(self) -> int:
        return int(self.text_encoder.config.num_hidden_layers)

    def empty_row(self) -> list[int]:
        """The padding chunk: ``[BOS, EOS, pad, ...]``, the row of an empty prompt."""
        tokenizer = self.tokenizer
        return [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (self.sequence_length - 2)


def encoder_slots(pipe: Any) -> list[EncoderSlot]:
    """Every pair the pipeline has; ``ValueError`` when it has none or their sequence lengths differ."""
    # Same list diffusers builds: without text_encoder (a refiner) only text_encoder_2 is used, and it then gets
    # the first text (``prompt``) because diffusers zips [prompt, prompt_2] with the encoders it has.
    slots: list[EncoderSlot] = []
    for name in ENCODER_NAMES:
        tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
        text_encoder = getattr(pipe, name, None)
        if tokenizer is None or text_encoder is None:
            continue
        slots.append(EncoderSlot(name, tokenizer, text_encoder, int(tokenizer.model_max_length)))
    if not slots:
        raise ValueError("the pipeline has no text encoder with a tokenizer")
    lengths = {slot.sequence_length for slot in slots}
    if len(lengths) != 1 or min(lengths) < 3:
        raise ValueError(f"the tokenizers' model_max_length must be equal and >= 3, got {sorted(lengths)}")
    return slots
