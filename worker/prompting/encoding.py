"""Long, weighted, edited prompts for SDXL: A1111 syntax, no 77-token limit, exact for short prompts.

``PromptEncoder(pipe).encode(prompt, ..., steps=N)`` returns the four tensors a ``StableDiffusionXLPipeline`` takes
as ``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``
(:class:`.encoded.EncodedPrompts`), and, for prompts with A1111 prompt editing, the conditioning of every later step.

Pipeline of a text, one module each; ``PromptEncoder`` owns their state and runs them in order
    the four fields -> texts per encoder side and the edit schedule (:mod:`.texts`, :mod:`.schedule`) -> the cache
    (:mod:`.cache`, keyed with :mod:`.encoder_state`) -> tokens and 77-token chunks per tokenizer (:mod:`.vocabulary`,
    :mod:`.syntax`, :mod:`.chunks`) -> text encoders and token weights (:mod:`.encoders`, :mod:`.weighting`,
    :mod:`.graphs`) -> metadata (:mod:`.describe`). None of them calls back into the encoder.

Prompt editing (``steps`` given)
    The union of the four fields' segment ends splits the steps into segments with one text per field each
    (:func:`.texts.edit_schedule`), and each distinct set of texts is encoded once (through the cache), every one
    padded to the longest one's chunk count. The result's tensors are step 0's; :meth:`EncodedPrompts.at_step` gives
    any step's, and :mod:`.stepping` swaps them into the pipeline's denoising loop. Without editing syntax the result
    is exactly what the encoder gives without ``steps``.

Limits (each an ``InvalidRequest`` naming the field)
    ``clip_skip`` from 0 to :attr:`PromptEncoder.max_clip_skip` (the text encoders' layers minus 2: 10 for SDXL);
    at most :data:`.chunks.MAX_CHUNKS_PER_PROMPT` chunks per text, and for an edited prompt at most
    :data:`.chunks.MAX_CHUNKS_PER_SCHEDULE` padded chunks held: distinct texts x the longest one's chunk count (each
    side of each segment is held at that length); every weight finite.

Equivalence with diffusers
    For texts of at most 75 tokens without attention syntax every tensor equals ``pipe.encode_prompt(...)``
    bit for bit: the same token rows, the same batch-of-one encoder calls (a batched call may pick other GEMM
    kernels and differ in the last bits), the same layers, dtypes and devices.

Cache
    Keyed by every input that changes a result: texts, clip_skip layer, guidance flag, weighting, chunk count, device,
    dtype and a fingerprint of the text encoders' PEFT adapters. :meth:`PromptEncoder.clear_cache` empties it (the LoRA
    code calls it whenever text-encoder adapters change), :meth:`PromptEncoder.vocabulary_changed` also re-reads the
    tokenizers (call it after adding tokens to them). Not thread-safe: one encoder per worker thread.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from core.errors import InvalidRequest
from worker.prompting.cache import DEFAULT_CACHE_BYTES, PromptCache
from worker.prompting.chunks import MAX_CHUNKS_PER_SCHEDULE, TokenChunks
from worker.prompting.describe import describe_encoding, describe_schedule
from worker.prompting.encoded import EncodedPrompts, ScheduledSegment
from worker.prompting.encoder_state import EncoderState
from worker.prompting.encoders import EncoderRun, encode_tokenized
from worker.prompting.graphs import EncoderGraphs
from worker.prompting.slots import encoder_slots
from worker.prompting.texts import PromptTexts, Sides, edit_schedule, encoder_sides, schedule_too_large
from worker.prompting.vocabulary import EmbeddingNames, Tokenized, Vocabulary
from worker.prompting.weighting import DEFAULT_WEIGHTING, WEIGHTING_MODES


class PromptEncoder:
    """Long-prompt, A1111-weighted ``encode_prompt`` for a ``StableDiffusionXLPipeline``; see the module docstring."""

    def __init__(
        self,
        pipe: Any,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        weighting: str = DEFAULT_WEIGHTING,
        cuda_graphs: bool = True,
    ) -> None:
        if weighting not in WEIGHTING_MODES:
            raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTING_MODES)}")
        self.pipe = pipe
        self.weighting = weighting
        self._slots = encoder_slots(pipe)
        self.sequence_length = self._slots[0].sequence_length
        self._vocabulary = Vocabulary(self._slots, getattr(pipe, "maybe_convert_prompt", None))
        self._state = EncoderState(pipe, self._slots)
        self._cache = PromptCache(cache_bytes)
        self._graphs = EncoderGraphs() if cuda_graphs else None

    # -- public API -------------------------------------------------------------------------------------------------

    @property
    def max_clip_skip(self) -> int:
        """The deepest ``clip_skip``: the text encoders' layers minus 2 (10 for SDXL), the only place it is bounded."""
        return min(slot.num_layers for slot in self._slots) - 2

    def check_clip_skip(self, clip_skip: int | None) -> None:
        """Raise ``InvalidRequest`` unless ``clip_skip`` is None or 0..:attr:`max_clip_skip`, as ``encode`` does."""
        self._hidden_state_index(clip_skip)

    @property
    def cache_bytes(self) -> int:
        """Bytes of tensors the cache holds now."""
        return self._cache.bytes

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        return self._cache.misses

    def encode(
        self,
        prompt: str,
        prompt_2: str | None = None,
        negative_prompt: str | None = None,
        negative_prompt_2: str | None = None,
        clip_skip: int | None = None,
        do_classifier_free_guidance: bool = True,
        steps: int | None = None,
    ) -> EncodedPrompts:
        """Encode a prompt (and its negative) of any length; returns tensors the caller owns.

        ``steps``: the number of denoising steps, which turns on A1111 prompt editing (``[a:b:when]``, ``[a|b]``);
        without it those brackets are read as attention syntax only.
        """
        texts = PromptTexts.checked(prompt, prompt_2, negative_prompt, negative_prompt_2)
        positive_layer = self._hidden_state_index(clip_skip)
        schedule = edit_schedule(texts, steps) if steps is not None else None
        if schedule is None:
            return self._encode_cached(texts, positive_layer, do_classifier_free_guidance, min_chunks=0)
        return self._encode_schedule(texts, schedule, positive_layer, do_classifier_free_guidance)

    def clear_cache(self) -> None:
        """Forget every cached result; call whenever the text encoders' weights or adapters change."""
        self._cache.clear()
        self._state.forget()

    def vocabulary_changed(self) -> None:
        """Re-read the tokenizers and forget every cached result; call after tokens are added to a tokenizer.

        The CUDA graphs go too: adding tokens gives the token-embedding matrix more rows in a new tensor, and a graph
        replays the kernels it captured, with the old matrix's address and size.
        """
        self._vocabulary.refresh()
        if self._graphs is not None:
            self._graphs.clear()
        self.clear_cache()

    def use_embedding_names(self, names: EmbeddingNames | None) -> None:
        """Rewrite embedding names in every run of text before it is tokenized (see :mod:`.vocabulary`)."""
        self._vocabulary.embedding_names = names
        self.clear_cache()

    def tokenize(self, text: str, encoder_index: int = 0) -> TokenChunks:
        """The chunked rows one text gives for one encoder (0: ``text_encoder``, 1: ``text_encoder_2``)."""
        return self._vocabulary.tokenize(text, encoder_index, "prompt")[1]

    # -- internals --------------------------------------------------------------------------------------------------

    def _hidden_state_index(self, clip_skip: int | None) -> int:
        if clip_skip is None:
            return -2
        deepest = self.max_clip_skip
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0:
            raise InvalidRequest(f"clip_skip: {clip_skip!r} is not a number of layers; use 0..{deepest}")
        if clip_skip > deepest:
            raise InvalidRequest(
                f"clip_skip: {clip_skip} is deeper than this model allows; use 0..{deepest} "
                "(0 or absent is SDXL's usual penultimate layer)"
            )
        return -(clip_skip + 2)  # "2" because SDXL always indexes from the penultimate layer (diffusers)

    def _sides(self, texts: PromptTexts, cfg: bool) -> Sides:
        return encoder_sides(texts, cfg, getattr(self.pipe.config, "force_zeros_for_empty_prompt", False))

    def _tokenize_texts(self, texts: PromptTexts, cfg: bool) -> Tokenized:
        sides = self._sides(texts, cfg)
        return self._vocabulary.tokenize_sides(sides.positive, sides.negative)

    def _encode_schedule(
        self, texts: PromptTexts, schedule: list[tuple[int, PromptTexts]], positive_layer: int, cfg: bool
    ) -> EncodedPrompts:
        distinct = list(dict.fromkeys(segment_texts for _, segment_texts in schedule))
        # Every segment is padded to the longest one's chunk count, on both sides, so what a schedule holds is
        # distinct texts x that count, not the sum of their lengths: bound that (one text of 63 chunks and 149 of
        # one chunk summed to 212 but held 9,450 padded chunks, 5.5 GiB of fp16 SDXL conditioning). Checked while
        # tokenizing, so a refused schedule costs at most the texts that prove it too large.
        tokenized: dict[PromptTexts, Tokenized] = {}
        target = 0
        for segment_texts in distinct:
            tokenized[segment_texts] = self._tokenize_texts(segment_texts, cfg)
            target = max(target, tokenized[segment_texts].num_chunks)
            if len(distinct) * target > MAX_CHUNKS_PER_SCHEDULE:
                raise schedule_too_large(texts, len(distinct), target)
        # A segment that needs no padding is the plain encode of its texts, and shares its cache entry.
        encoded = {
            segment_texts: self._encode_cached(
                segment_texts,
                positive_layer,
                cfg,
                target if tokenized[segment_texts].num_chunks < target else 0,
                tokenized[segment_texts],
            )
            for segment_texts in distinct
        }
        segments = tuple(ScheduledSegment(last_step, encoded[segment_texts]) for last_step, segment_texts in schedule)
        first = segments[0].conditioning
        info = copy.deepcopy(first.info)
        info["cache_hit"] = all(result.info["cache_hit"] for result in encoded.values())
        embeddings: dict[str, Any] = {}  # every segment's, each once
        for result in encoded.values():
            embeddings.update((entry["name"], entry) for entry in result.info["embeddings"])
        info["embeddings"] = list(embeddings.values())
        info["schedule"] = describe_schedule(schedule, distinct)
        return EncodedPrompts(
            first.prompt_embeds.clone(),
            first.pooled_prompt_embeds.clone(),
            None if first.negative_prompt_embeds is None else first.negative_prompt_embeds.clone(),
            None if first.negative_pooled_prompt_embeds is None else first.negative_pooled_prompt_embeds.clone(),
            info,
            first.chunk_length,
            segments,
        )

    def _encode_cached(
        self,
        texts: PromptTexts,
        positive_layer: int,
        cfg: bool,
        min_chunks: int,
        tokenized: Tokenized | None = None,
    ) -> EncodedPrompts:
        sides = self._sides(texts, cfg)
        device, input_devices = self._state.placement()
        output_dtype = self._state.output_dtype()
        key = (
            tuple(text for _, text in sides.positive),
            sides.negative_source,
            tuple(text for _, text in sides.negative) if sides.negative else None,
            positive_layer,
            self.weighting,
            min_chunks,
            str(device),
            str(output_dtype),
            self._state.adapter_fingerprint(),
            self._vocabulary.embedding_context(),  # a request's own embedding words (by URL)
        )
        cached = self._cache.get(key)
        if cached is not None:
            return cached

        if tokenized is None:
            tokenized = self._vocabulary.tokenize_sides(sides.positive, sides.negative)
        target_chunks = max(min_chunks, tokenized.num_chunks)
        run = EncoderRun(
            target_chunks, positive_layer, device, input_devices, output_dtype, self.weighting, self._graphs
        )
        with torch.no_grad():
            encoded = encode_tokenized(self._slots, tokenized, sides.negative_source, run)
        names = [slot.name for slot in self._slots]
        encoded.info = describe_encoding(names, self.weighting, sides, tokenized, target_chunks)
        return self._cache.keep(key, encoded)
