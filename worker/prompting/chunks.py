"""Token runs -> 77-token chunks, as AUTOMATIC1111's ``tokenize_line`` lays them out (``modules/sd_hijack_clip.py``).

A chunk is ``[BOS] + up to 75 tokens + [EOS]``, padded to 77 with the tokenizer's pad id: exactly the row diffusers
builds for a short prompt. No token is ever dropped.

- Comma backtrack: when a chunk is full, the next token is not a comma and a comma lies within the chunk's last
  :data:`COMMA_BACKTRACK` tokens, the tokens after that comma move to the next chunk, so a phrase is not cut in two.
- An embedding's vectors stay together: when a multi-vector embedding would cross the chunk's end, the chunk ends
  before it (padded) and the embedding starts the next one, as A1111 moves it (no comma backtrack then, as there).
- ``BREAK`` closes the current chunk, even an empty one: a leading or doubled ``BREAK`` gives an empty (padding)
  chunk, as in A1111. A trailing ``BREAK`` adds nothing; an empty prompt is one empty chunk.

:data:`MAX_CHUNKS_PER_PROMPT` bounds the chunks of one prompt field, :data:`MAX_CHUNKS_PER_SCHEDULE` the padded chunks
an edited prompt's distinct texts hold (both checked by the encoder, which names the field).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

COMMA_BACKTRACK: Final = 20  # A1111's default "comma_padding_backtrack"

# 64 chunks = 4,800 tokens. 20,000 characters (the schema's limit on a prompt field) of a typical comma-separated SD
# prompt are 3,939 CLIP tokens, 53 chunks (measured with the shipped CLIP tokenizer), so such prompts fit at any length
# the schema accepts. What exceeds it is text that multiplies chunks: 2,500 "x BREAK " make 2,500 chunks (issue 13),
# and text of a token per character, such as 16,400 emoji, makes 219. Every chunk is one more row per text encoder,
# 77 more keys in every cross-attention layer at every denoising step, and 77 x 2048 more values per side in a cache
# entry (bench/prompt_encode.py reports an entry's bytes at 1, 16 and 64 chunks).
MAX_CHUNKS_PER_PROMPT: Final = 64

# Prompt editing encodes each distinct text of the schedule (alternations can make one per step, up to 1,000 with a
# second-order sampler) and holds every one padded to the longest's chunk count T, on both sides. What is bounded is
# that padded total, distinct texts x T: four prompts' worth. At 256, SDXL's conditioning for a schedule is at most
# 256 x 77 x 2048 values per side (154 MiB in fp16, both sides); any ordinary edit (a few [from:to:when] and [a|b]
# groups over a prompt of normal length) stays far below it.
MAX_CHUNKS_PER_SCHEDULE: Final = 4 * MAX_CHUNKS_PER_PROMPT


@dataclass
class TokenChunks:
    """One text tokenized by one tokenizer: full 77-id rows with one weight per id."""

    input_ids: list[list[int]]
    weights: list[list[float]]
    num_tokens: int  # the prompt's own tokens, without BOS, EOS and padding
    is_weighted: bool = False  # any weight other than 1

    @property
    def num_chunks(self) -> int:
        return len(self.input_ids)


def chunk_weighted_tokens(
    runs: Sequence[tuple[list[int], float] | None],
    *,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    comma_token_id: int | None,
    chunk_length: int = 75,
    comma_backtrack: int = COMMA_BACKTRACK,
    later_vector_ids: frozenset[int] = frozenset(),
) -> TokenChunks:
    """Lay weighted token runs into ``[BOS] + chunk_length + [EOS]`` rows padded with ``pad_token_id``.

    ``runs`` holds ``(token_ids, weight)`` per text run and ``None`` where a ``BREAK`` forces a chunk boundary;
    ``later_vector_ids``: the ids that continue an embedding (never the first of a chunk unless it cannot fit).
    The same chunks as A1111's ``tokenize_line``; every token ends up in exactly one chunk, in order.
    """
    # Sections between BREAKs, as flat token and weight lists.
    sections: list[tuple[list[int], list[float]]] = [([], [])]
    for run in runs:
        if run is None:
            sections.append(([], []))
        else:
            sections[-1][0].extend(run[0])
            sections[-1][1].extend([run[1]] * len(run[0]))

    # A1111 fills a chunk token by token; when a 76th token that is not a comma arrives and the chunk's last comma is
    # among its last ``comma_backtrack`` tokens, what follows that comma moves to the next chunk. Slicing a chunk at
    # a time does the same without a Python step per token.
    chunks: list[tuple[list[int], list[float]]] = []
    for index, (tokens, weights) in enumerate(sections):
        is_last = index == len(sections) - 1
        start = 0
        while len(tokens) - start > chunk_length:
            end = start + chunk_length
            if tokens[end] in later_vector_ids:
                first_vector = end
                while first_vector > start and tokens[first_vector] in later_vector_ids:
                    first_vector -= 1
                end = first_vector if first_vector > start else end  # longer than a chunk: split, nothing else fits
            elif comma_backtrack > 0 and tokens[end] != comma_token_id:
                for position in range(end - 1, max(start, end - comma_backtrack) - 1, -1):
                    if tokens[position] == comma_token_id:
                        end = position + 1
                        break
            chunks.append((tokens[start:end], weights[start:end]))
            start = end
        # A BREAK closes the chunk in progress even when it is empty; the end of the prompt closes it only if it holds
        # tokens, or if there is no chunk at all.
        if start < len(tokens) or not is_last or not chunks:
            chunks.append((tokens[start:], weights[start:]))

    rows, row_weights = [], []
    for chunk_tokens, chunk_weights in chunks:
        padding = chunk_length - len(chunk_tokens)
        # diffusers' row: BOS, the tokens, EOS, then the pad id up to 77 (pad == EOS for CLIP-L, "!" for bigG).
        rows.append([bos_token_id, *chunk_tokens, eos_token_id] + [pad_token_id] * padding)
        row_weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
    is_weighted = any(run is not None and run[1] != 1.0 and run[0] for run in runs)
    return TokenChunks(rows, row_weights, sum(len(chunk_tokens) for chunk_tokens, _ in chunks), is_weighted)


def tokenization_groups(tokenizers: Sequence[Any]) -> list[int]:
    """Group tokenizers that give the same ids for any text free of the added tokens they disagree on.

    Returns, per tokenizer, its group (the index of the first equal one). Fast (``tokenizers``-backed) tokenizers
    only; two are equal when their serialised pipelines (normaliser, pre-tokenizer, model, decoder) are, added tokens,
    padding and post-processing aside (the chunker adds BOS, EOS and padding itself; added tokens are compared by
    :func:`differing_added_tokens`, which is cheap enough to run whenever tokens are added). SDXL's two tokenizers
    are the same BPE and differ only in "!", tokenizer_2's pad token.
    """
    specs: list[str | None] = []
    for tokenizer in tokenizers:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            specs.append(None)
            continue
        spec = json.loads(backend.to_str())
        for key in ("added_tokens", "padding", "truncation", "post_processor"):
            spec.pop(key, None)
        specs.append(json.dumps([type(tokenizer).__name__, spec], sort_keys=True))
    groups = list(range(len(tokenizers)))
    for index, spec in enumerate(specs):
        for earlier in range(index):
            if spec is not None and specs[earlier] == spec:
                groups[index] = groups[earlier]
                break
    return groups


def differing_added_tokens(tokenizers: Sequence[Any], groups: Sequence[int]) -> list[frozenset[str]]:
    """Per tokenizer, the added tokens on which the members of its group (:func:`tokenization_groups`) differ: absent
    from one of them, or with another id or matching flags."""
    added: list[dict[str, tuple] | None] = [
        {
            token.content: (token_id, token.single_word, token.lstrip, token.rstrip, token.normalized, token.special)
            for token_id, token in tokenizer.added_tokens_decoder.items()
        }
        if getattr(tokenizer, "backend_tokenizer", None) is not None
        else None
        for tokenizer in tokenizers
    ]
    differing: list[frozenset[str]] = []
    for index, own in enumerate(added):
        members = [added[other] or {} for other in range(len(tokenizers)) if groups[other] == groups[index]]
        contents = set().union(*members) if own is not None else set()
        differing.append(frozenset(c for c in contents if len({member.get(c) for member in members}) > 1))
    return differing
