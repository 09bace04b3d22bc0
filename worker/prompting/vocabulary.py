"""Text -> weighted 77-token chunks for each encoder: the tokenizers and what is derived from their vocabularies.

Every weighted run of a text is tokenized on its own, as A1111 does (attention syntax: :mod:`.syntax`; chunks:
:mod:`.chunks`). ``prompt`` goes to ``tokenizer``, ``prompt_2`` to ``tokenizer_2`` (:mod:`.texts` pairs them).

What is read from the vocabularies once, not per text: each tokenizer's comma id (for the chunker's comma backtrack)
and which tokenizers give the same ids for which texts. SDXL's two tokenizers are the same BPE and differ only in "!"
(tokenizer_2's pad token, an added token), so for a text without it one tokenizer call serves both encoders.

When the vocabularies change
    Tokens added to a tokenizer (textual-inversion embeddings, issue 20) make that derived state stale: a token added
    to one tokenizer only, or with different ids, must end the sharing for texts that contain it. Whoever changes a
    tokenizer calls :meth:`PromptEncoder.vocabulary_changed() <worker.prompting.encoding.PromptEncoder>`, which runs
    :meth:`Vocabulary.refresh` and forgets every cached result. Texts that name added tokens are rewritten with
    diffusers' ``maybe_convert_prompt`` (its multi-vector form), which reads the tokenizer on every call (diffusers
    0.42.1), so it needs no refresh.

Embedding names
    An :class:`EmbeddingNames` (the worker's is :mod:`worker.adapters.embeddings`) rewrites each weighted run before
    it is tokenized: the names of embeddings become their added tokens, as A1111 finds embeddings in each run of
    its parsed prompt. It may add tokens while doing so (an embedding is loaded on first use) and then calls
    ``vocabulary_changed`` itself; everything read from the tokenizers is read after the rewrite. A multi-vector
    embedding's tokens (diffusers names them ``tok``, ``tok_1``, ...) are kept in one chunk, as A1111 moves an
    embedding that does not fit whole into the next chunk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.errors import InvalidRequest
from worker.prompting.chunks import (
    MAX_CHUNKS_PER_PROMPT,
    TokenChunks,
    chunk_weighted_tokens,
    differing_added_tokens,
    tokenization_groups,
)
from worker.prompting.slots import EncoderSlot
from worker.prompting.syntax import BREAK, parse_prompt_attention
from worker.prompting.texts import FieldText

Parsed = list[tuple[str, float]]  # parse_prompt_attention's runs, BREAK included
_VECTOR_SUFFIX = re.compile(r"(.+)_[1-9][0-9]*")  # diffusers' names for an embedding's 2nd, 3rd, ... vectors


class EmbeddingNames(Protocol):
    """Turns embedding names in a run of prompt text into the tokens the tokenizers know them by."""

    def rewrite(self, text: str, field_name: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """``text`` with each embedding name replaced by its token, and what was used (name -> metadata entry)."""
        ...

    def cache_context(self) -> tuple:
        """What a rewrite depends on besides the text (a request's own words), for the prompt cache's key."""
        ...


@dataclass
class Tokenized:
    """Every side's chunks per encoder, each text's parse and the embeddings they use (for metadata)."""

    positive: list[TokenChunks]
    negative: list[TokenChunks] | None
    parsed: dict[str, Parsed]
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return max(chunks.num_chunks for chunks in self.positive + (self.negative or []))


class Vocabulary:
    """Tokenizes texts for the pipeline's encoders; holds only what it derives from their vocabularies."""

    def __init__(self, slots: list[EncoderSlot], convert_prompt: Callable[[str, Any], str] | None = None) -> None:
        """``convert_prompt``: the pipeline's ``maybe_convert_prompt`` (diffusers' textual-inversion rewrite)."""
        self._slots = slots
        self._convert_prompt = convert_prompt
        self.embedding_names: EmbeddingNames | None = None
        # Neither the comma's id nor which tokenizers are one BPE changes when tokens are added: read once (those
        # reads take most of a second); the added tokens are compared in refresh.
        tokenizers = [slot.tokenizer for slot in self._slots]
        self._comma_token_ids = [tokenizer.get_vocab().get(",</w>") for tokenizer in tokenizers]
        self._groups = tokenization_groups(tokenizers)
        self.refresh()

    def refresh(self) -> None:
        """Read the vocabularies again; call after tokens are added to a tokenizer (see the module docstring)."""
        tokenizers = [slot.tokenizer for slot in self._slots]
        self._differing_added_tokens = differing_added_tokens(tokenizers, self._groups)
        self._later_vectors = [_later_vector_ids(slot.tokenizer) for slot in self._slots]

    def embedding_context(self) -> tuple:
        """:meth:`EmbeddingNames.cache_context`; empty without embedding names."""
        return () if self.embedding_names is None else self.embedding_names.cache_context()

    def tokenize_sides(self, positive: list[FieldText], negative: list[FieldText] | None) -> Tokenized:
        """Every side's chunks per encoder; texts are paired with encoders positionally, like diffusers' zip."""
        memo: dict[tuple, list[list[int]]] = {}
        parsed: dict[str, Parsed] = {}
        embeddings: dict[str, dict[str, Any]] = {}
        positive_tokens: list[TokenChunks] = []
        negative_tokens: list[TokenChunks] | None = [] if negative is not None else None
        for index in range(len(self._slots)):
            for side, tokens in ((positive, positive_tokens), (negative, negative_tokens)):
                if side is not None and index < len(side):
                    field_name, text = side[index]
                    parsed[text], chunks, used = self._tokenize(text, index, field_name, memo)
                    embeddings.update(used)
                    tokens.append(chunks)
        return Tokenized(positive_tokens, negative_tokens, parsed, embeddings)

    def tokenize(
        self, text: str, slot_index: int, field_name: str, memo: dict[tuple, list[list[int]]] | None = None
    ) -> tuple[Parsed, TokenChunks]:
        """Parse ``text`` and chunk its tokens for one encoder; ``memo`` shares token ids between equal tokenizers."""
        parsed, chunks, _ = self._tokenize(text, slot_index, field_name, memo)
        return parsed, chunks

    def _tokenize(
        self, text: str, slot_index: int, field_name: str, memo: dict[tuple, list[list[int]]] | None
    ) -> tuple[Parsed, TokenChunks, dict[str, dict[str, Any]]]:
        slot = self._slots[slot_index]
        parsed = parse_prompt_attention(text)
        for item in parsed:
            if item != BREAK and not math.isfinite(item[1]):
                shown = item[0] if len(item[0]) <= 40 else item[0][:39] + "…"
                raise InvalidRequest(
                    f"{field_name}: the weight of {shown!r} is {item[1]} (its brackets or number overflow); "
                    "use weights of a usable size such as (word:1.5)"
                )
        fragments = [item[0] for item in parsed if item != BREAK]
        used: dict[str, dict[str, Any]] = {}
        if self.embedding_names is not None:
            # First: a rewrite may load an embedding, and everything below reads the tokenizers as they are after it.
            rewritten = []
            for fragment in fragments:
                fragment, found = self.embedding_names.rewrite(fragment, field_name)
                rewritten.append(fragment)
                used.update(found)
            fragments = rewritten
        convert = self._textual_inversion_converter(slot)
        if convert is not None:
            fragments = [convert(fragment) for fragment in fragments]
        differing = self._differing_added_tokens[slot_index]
        shareable = memo is not None and not any(
            token in fragment or token.lower() in fragment.lower() for token in differing for fragment in fragments
        )
        key = (self._groups[slot_index], tuple(fragments))
        token_ids = memo.get(key) if shareable else None
        if token_ids is None:
            # One call for all runs; no special tokens (the chunker adds them), no truncation, and no "sequence
            # longer than 77" warning: long prompts are the point.
            token_ids = slot.tokenizer(fragments, add_special_tokens=False, verbose=False)["input_ids"]
            if shareable:
                memo[key] = token_ids
        ids = iter(token_ids)
        runs = [None if item == BREAK else (next(ids), item[1]) for item in parsed]
        tokenizer = slot.tokenizer
        chunks = chunk_weighted_tokens(
            runs,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            comma_token_id=self._comma_token_ids[slot_index],
            chunk_length=slot.sequence_length - 2,
            later_vector_ids=self._later_vectors[slot_index],
        )
        if chunks.num_chunks > MAX_CHUNKS_PER_PROMPT:
            raise InvalidRequest(
                f"{field_name}: {chunks.num_chunks} chunks of {slot.sequence_length - 2} tokens is over the limit of "
                f"{MAX_CHUNKS_PER_PROMPT} per prompt ({MAX_CHUNKS_PER_PROMPT * (slot.sequence_length - 2)} tokens; "
                "every BREAK starts a new chunk); shorten the text or use fewer BREAKs"
            )
        return parsed, chunks, used

    def _textual_inversion_converter(self, slot: EncoderSlot) -> Callable[[str], str] | None:
        """diffusers' multi-vector textual-inversion rewrite, only when the tokenizer has tokens beyond its specials."""
        convert = self._convert_prompt
        tokenizer = slot.tokenizer
        if convert is None or not set(tokenizer.added_tokens_encoder) - set(tokenizer.all_special_tokens):
            return None
        return lambda text: convert(text, tokenizer)


def _later_vector_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the added tokens that continue a multi-vector embedding (``tok_1``, ``tok_2``, ... after ``tok``)."""
    added = tokenizer.added_tokens_encoder
    return frozenset(
        token_id
        for token, token_id in added.items()
        if (match := _VECTOR_SUFFIX.fullmatch(token)) is not None and match.group(1) in added
    )
