"""PromptEncoder.vocabulary_changed(): what whoever adds tokens to a tokenizer (textual inversion, issue 20) calls."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.dev_pipes import load_dev_pipe
from worker.prompting.encoding import PromptEncoder


def test_a_token_added_to_one_tokenizer_is_seen_after_vocabulary_changed(dev_model_dir: Path) -> None:
    """The encoder shares one tokenizer call between SDXL's equal tokenizers; a token only the first one knows must
    end that sharing (else the second encoder gets an id past its vocabulary), and cached results must go."""
    own_pipe = load_dev_pipe(dev_model_dir)  # its tokenizer is changed: keep that off the shared pipes
    encoder = PromptEncoder(own_pipe)
    encoder.encode("a photo of a cat")
    assert encoder.encode("a photo of a cat").info["cache_hit"]

    own_pipe.tokenizer.add_tokens(["<new-style>"])
    own_pipe.text_encoder.resize_token_embeddings(len(own_pipe.tokenizer))
    encoder.vocabulary_changed()

    assert not encoder.encode("a photo of a cat").info["cache_hit"]
    text = "a photo of a <new-style> cat"
    new_id = own_pipe.tokenizer.convert_tokens_to_ids("<new-style>")
    assert new_id in encoder.tokenize(text, 0).input_ids[0]
    assert new_id not in encoder.tokenize(text, 1).input_ids[0]
    encoded = encoder.encode(text, negative_prompt="blurry")
    fresh = PromptEncoder(own_pipe, cache_bytes=0).encode(text, negative_prompt="blurry")
    for ours, theirs in zip(encoded.tensors(), fresh.tensors(), strict=True):
        assert torch.equal(ours, theirs)
