"""Long, weighted, edited prompts for SDXL: A1111 syntax, no 77-token limit, exact for short prompts.

``PromptEncoder(pipe).encode(prompt, ..., steps=N)`` returns the four tensors a ``StableDiffusionXLPipeline`` takes
as ``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``,
and, for prompts with A1111 prompt editing, the conditioning of every later step.

Pipeline of a text
    prompt editing (:mod:`.schedule`, only with ``steps``) -> attention syntax (:mod:`.syntax`) -> tokens and 77-token
    chunks per tokenizer (:mod:`.chunks`; ``prompt`` goes to ``tokenizer``, ``prompt_2`` to ``tokenizer_2``; every
    weighted run is tokenized on its own, as A1111 does) -> text encoders -> token weights (:mod:`.weighting`).

Encoding
    Each 77-token chunk goes through each text encoder independently (A1111 and compel semantics: a chunk attends
    only to itself). A prompt whose sides are one chunk each is encoded exactly as diffusers does it (one
    batch-of-one call per side); otherwise all chunks of both sides, plus one padding chunk if needed, go through
    each encoder as a single batch (two encoder calls per prompt, whatever its length). The hidden states are those
    diffusers uses: ``hidden_states[-2]``, or ``hidden_states[-(clip_skip + 2)]``. Chunks are concatenated along the
    sequence, then the two encoders along the features (768 + 1280 = 2048 for SDXL), then the result is cast to
    ``text_encoder_2.dtype`` on ``pipe._execution_device``, as diffusers does.

    Chunk counts can differ between the encoders (``prompt_2`` is a different text), between the positive and
    negative side and between the segments of an edited prompt. Every side of every encoder is brought to the largest
    count, ``T``, with whole padding chunks: the encoding of the empty chunk ``[BOS, EOS, pad...]`` (what A1111
    appends, and what diffusers itself encodes for ``negative_prompt=""``). Padding goes at the end, so the first chunk
    stays in place. The result is ``[1, 77 * T, 2048]`` for every tensor and every step.

Pooled embeddings
    From the first chunk of ``text_encoder_2`` (its projected ``text_embeds``), as A1111 and compel do. The first
    chunk holds the start of the prompt, which is where people put the subject, and it is exactly what SDXL was
    trained with (a truncated prompt's pooled vector); averaging the chunks' vectors would blend in padding chunks
    and give a vector the model never saw. Weights do not touch the pooled vector (as in A1111).

Prompt editing (``steps`` given)
    Each of the four texts gets A1111's schedule (:func:`.schedule.prompt_schedule`); the union of their segment ends
    splits the steps into segments with one text per field each, and each distinct set of texts is encoded once
    (through the cache). The result's tensors are step 0's; :meth:`EncodedPrompts.at_step` gives any step's, and
    :mod:`.stepping` swaps them into the pipeline's denoising loop. Without editing syntax the result is exactly
    what the encoder gives without ``steps``.

Negative prompt (only with ``do_classifier_free_guidance``), as in diffusers
    ``negative_prompt=None`` with ``force_zeros_for_empty_prompt`` (SDXL base) gives zeros of the positive's shape.
    Otherwise ``negative_prompt or ""`` goes to encoder 1 and ``negative_prompt_2 or negative_prompt`` to encoder 2,
    and both sides are padded to the same length. diffusers encodes the negative with ``hidden_states[-2]`` whatever
    ``clip_skip`` is; that is kept, so short prompts match stock diffusers exactly.

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
    A least-recently-used cache bounded in bytes (:mod:`.cache`), keyed by every input that changes a result (texts,
    clip_skip layer, guidance flag, weighting, chunk count, device, dtype, a fingerprint of the text encoders' PEFT
    adapters) and a generation counter that :meth:`PromptEncoder.clear_cache` bumps (the LoRA code calls it whenever
    text-encoder adapters change; the fingerprint is a safety net, not the contract). Every call returns fresh clones,
    so callers may modify them. Not thread-safe: one encoder per worker thread.

Speed
    ``pipe._execution_device`` and diffusers' per-encoder device lookup walk every module of the pipeline (~2,700
    for SDXL); they are memoized against a cheap signature of the components, their top-level offload hooks and
    devices. When both tokenizers agree on a text (SDXL's differ only on "!", the pad token tokenizer_2 registers as
    an added token) one tokenizer call serves both encoders. On a GPU the encoders run from CUDA graphs
    (:mod:`.graphs`). ``bench/prompt_encode.py`` measures what each of these costs and saves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from core.errors import InvalidRequest
from worker.prompting.cache import DEFAULT_CACHE_BYTES, ByteBoundedCache
from worker.prompting.chunks import (
    MAX_CHUNKS_PER_PROMPT,
    MAX_CHUNKS_PER_SCHEDULE,
    TokenChunks,
    chunk_weighted_tokens,
    tokenization_groups,
)
from worker.prompting.graphs import EncoderGraphs
from worker.prompting.schedule import has_editing_syntax, prompt_schedule, text_at_step
from worker.prompting.syntax import BREAK, parse_prompt_attention, weighted_runs
from worker.prompting.weighting import DEFAULT_WEIGHTING, WEIGHTING_MODES, apply_token_weights

ENCODER_NAMES: Final = ("text_encoder", "text_encoder_2")
FIELD_NAMES: Final = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
_MAX_METADATA_TEXT: Final = 120  # characters of a weighted run shown in metadata
_MAX_METADATA_RUNS: Final = 32  # distinct weighted runs shown in metadata
_MAX_SCHEDULE_TEXT: Final = 1000  # characters of each prompt-editing text shown in metadata


@dataclass
class EncodedPrompts:
    """What the pipeline takes as ``prompt_embeds=...`` etc., plus JSON-able metadata.

    With prompt editing, the tensors are step 0's and ``segments`` holds every segment's conditioning (the first
    included); :meth:`at_step` picks the one a denoising step uses.
    """

    prompt_embeds: torch.Tensor  # [1, 77 * T, sum of both encoder widths]
    pooled_prompt_embeds: torch.Tensor  # [1, projection dim]
    negative_prompt_embeds: torch.Tensor | None  # same shape as prompt_embeds; None only when guidance is off
    negative_pooled_prompt_embeds: torch.Tensor | None
    info: dict[str, Any] = field(default_factory=dict)
    chunk_length: int = 77
    segments: tuple[ScheduledSegment, ...] = ()

    @property
    def num_chunks(self) -> int:
        """T: prompts with equal T can share one pipeline call (the batch runner groups on it)."""
        return self.prompt_embeds.shape[1] // self.chunk_length

    @property
    def is_scheduled(self) -> bool:
        """True when the conditioning changes during denoising (prompt editing or alternation)."""
        return len(self.segments) > 1

    def at_step(self, step: int) -> EncodedPrompts:
        """The conditioning of denoising step ``step`` (0-based): A1111's lookup, the last segment past the end."""
        for segment in self.segments:
            if step <= segment.last_step:
                return segment.conditioning
        return self.segments[-1].conditioning if self.segments else self

    def clone(self) -> EncodedPrompts:
        def copy_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.clone()

        return EncodedPrompts(
            copy_tensor(self.prompt_embeds),
            copy_tensor(self.pooled_prompt_embeds),
            copy_tensor(self.negative_prompt_embeds),
            copy_tensor(self.negative_pooled_prompt_embeds),
            copy.deepcopy(self.info),
            self.chunk_length,
            tuple(ScheduledSegment(s.last_step, s.conditioning.clone()) for s in self.segments),
        )

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The four tensors in the order diffusers' ``encode_prompt`` returns them (positive, negative, pooled ...)."""
        return (
            self.prompt_embeds,
            self.negative_prompt_embeds,
            self.pooled_prompt_embeds,
            self.negative_pooled_prompt_embeds,
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors (the cache's measure)."""
        own = sum(t.nbytes for t in self.tensors() if t is not None)
        return own + sum(segment.conditioning.nbytes() for segment in self.segments)


@dataclass(frozen=True)
class ScheduledSegment:
    """The conditioning of the denoising steps up to and including ``last_step`` (after the previous segment's)."""

    last_step: int
    conditioning: EncodedPrompts


@dataclass
class _EncoderSlot:
    """One tokenizer / text encoder pair of the pipeline."""

    name: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    sequence_length: int  # 77
    comma_token_id: int | None

    @property
    def num_layers(self) -> int:
        return int(self.text_encoder.config.num_hidden_layers)

    def empty_row(self) -> list[int]:
        """The padding chunk: ``[BOS, EOS, pad, ...]``, the row of an empty prompt."""
        tokenizer = self.tokenizer
        return [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (self.sequence_length - 2)


@dataclass
class _SideOutput:
    """One side (positive or negative) of one encoder: weighted hidden states and, maybe, the pooled vector."""

    hidden_states: torch.Tensor  # [chunks, 77, width]
    padding_chunk: torch.Tensor | None  # [77, width], present when this side needs padding
    pooled: torch.Tensor | None  # [1, projection dim] from the first chunk


@dataclass(frozen=True)
class _Texts:
    """The four prompt fields of one request (or of one segment of an edited prompt), as given."""

    prompt: str
    prompt_2: str | None
    negative_prompt: str | None
    negative_prompt_2: str | None


@dataclass
class _Tokenized:
    """Every side's chunks per encoder, and each text's parse (for metadata)."""

    positive: list[TokenChunks]
    negative: list[TokenChunks] | None
    parsed: dict[str, list[tuple[str, float]]]

    @property
    def num_chunks(self) -> int:
        return max(chunks.num_chunks for chunks in self.positive + (self.negative or []))


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
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: ByteBoundedCache[EncodedPrompts] = ByteBoundedCache(cache_bytes, EncodedPrompts.nbytes)
        self._generation = 0
        self._placement_memo: tuple[tuple, tuple[torch.device, list[torch.device]]] | None = None
        self._adapter_layers_memo: dict[tuple, list[Any]] = {}
        self._graphs = EncoderGraphs() if cuda_graphs else None

        # Same list diffusers builds: without text_encoder (a refiner) only text_encoder_2 is used, and it then gets
        # the first text (``prompt``) because diffusers zips [prompt, prompt_2] with the encoders it has.
        self._slots: list[_EncoderSlot] = []
        for name in ENCODER_NAMES:
            tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
            text_encoder = getattr(pipe, name, None)
            if tokenizer is None or text_encoder is None:
                continue
            self._slots.append(
                _EncoderSlot(
                    name=name,
                    tokenizer=tokenizer,
                    text_encoder=text_encoder,
                    sequence_length=int(tokenizer.model_max_length),
                    comma_token_id=tokenizer.get_vocab().get(",</w>"),
                )
            )
        if not self._slots:
            raise ValueError("the pipeline has no text encoder with a tokenizer")
        lengths = {slot.sequence_length for slot in self._slots}
        if len(lengths) != 1 or min(lengths) < 3:
            raise ValueError(f"the tokenizers' model_max_length must be equal and >= 3, got {sorted(lengths)}")
        self.sequence_length = lengths.pop()
        self._tokenization_groups, self._differing_added_tokens = tokenization_groups(
            [slot.tokenizer for slot in self._slots]
        )

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
        for field_name, value in zip(FIELD_NAMES, (prompt, prompt_2, negative_prompt, negative_prompt_2), strict=True):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{field_name}: expected a string, got {type(value).__name__}")
        if prompt is None:
            raise TypeError("prompt: expected a string, got None")
        positive_layer = self._hidden_state_index(clip_skip)
        texts = _Texts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        schedule = self._schedule(texts, steps) if steps is not None else None
        if schedule is None:
            return self._encode_cached(texts, positive_layer, do_classifier_free_guidance, min_chunks=0)

        distinct = list(dict.fromkeys(segment_texts for _, segment_texts in schedule))
        # Every segment is padded to the longest one's chunk count, on both sides, so what a schedule holds is
        # distinct texts x that count, not the sum of their lengths: bound that (one text of 63 chunks and 149 of
        # one chunk summed to 212 but held 9,450 padded chunks, 5.5 GiB of fp16 SDXL conditioning). Checked while
        # tokenizing, so a refused schedule costs at most the texts that prove it too large.
        tokenized: dict[_Texts, _Tokenized] = {}
        target = 0
        for segment_texts in distinct:
            tokenized[segment_texts] = self._tokenize_texts(segment_texts, do_classifier_free_guidance)
            target = max(target, tokenized[segment_texts].num_chunks)
            if len(distinct) * target > MAX_CHUNKS_PER_SCHEDULE:
                raise self._schedule_too_large(texts, len(distinct), target)
        # A segment that needs no padding is the plain encode of its texts, and shares its cache entry.
        encoded = {
            segment_texts: self._encode_cached(
                segment_texts,
                positive_layer,
                do_classifier_free_guidance,
                target if tokenized[segment_texts].num_chunks < target else 0,
                tokenized[segment_texts],
            )
            for segment_texts in distinct
        }
        segments = tuple(ScheduledSegment(last_step, encoded[segment_texts]) for last_step, segment_texts in schedule)
        first = segments[0].conditioning
        info = copy.deepcopy(first.info)
        info["cache_hit"] = all(result.info["cache_hit"] for result in encoded.values())
        info["schedule"] = _describe_schedule(schedule, distinct)
        return EncodedPrompts(
            first.prompt_embeds.clone(),
            first.pooled_prompt_embeds.clone(),
            None if first.negative_prompt_embeds is None else first.negative_prompt_embeds.clone(),
            None if first.negative_pooled_prompt_embeds is None else first.negative_pooled_prompt_embeds.clone(),
            info,
            first.chunk_length,
            segments,
        )

    def clear_cache(self) -> None:
        """Forget every cached result; call whenever the text encoders' weights or adapters change."""
        self._cache.clear()
        self._generation += 1
        self._placement_memo = None
        self._adapter_layers_memo.clear()

    def tokenize(self, text: str, encoder_index: int = 0) -> TokenChunks:
        """The chunked rows one text gives for one encoder (0: ``text_encoder``, 1: ``text_encoder_2``)."""
        return self._tokenize(text, encoder_index, "prompt")[1]

    # -- prompt editing ---------------------------------------------------------------------------------------------

    @staticmethod
    def _schedule_too_large(texts: _Texts, distinct: int, chunks: int) -> InvalidRequest:
        fields = [name for name, text in zip(FIELD_NAMES, vars(texts).values(), strict=True) if text is not None]
        edited = [name for name in fields if has_editing_syntax(getattr(texts, name))]
        return InvalidRequest(
            f"{' and '.join(edited)}: prompt editing makes {distinct} distinct texts, each held at the longest one's "
            f"length ({chunks} chunks or more): at least {distinct * chunks} chunks of conditioning, over the limit of "
            f"{MAX_CHUNKS_PER_SCHEDULE}; use fewer alternations ([a|b]) or edits, or shorten the longest text"
        )

    @staticmethod
    def _schedule(texts: _Texts, steps: int) -> list[tuple[int, _Texts]] | None:
        """``[(last_step, texts), ...]`` when any field uses prompt editing; None when none does.

        The union of the fields' segment ends splits the steps; consecutive segments with equal texts merge, and
        segments ending before step 0 (a negative ``when``) are never used, so they are left out.
        """
        fields = (texts.prompt, texts.prompt_2, texts.negative_prompt, texts.negative_prompt_2)
        if not any(text is not None and has_editing_syntax(text) for text in fields):
            return None
        schedules = [None if text is None else prompt_schedule(text, steps) for text in fields]
        ends = sorted({end for schedule in schedules if schedule for end, _ in schedule if end >= 0})
        segments: list[tuple[int, _Texts]] = []
        for end in ends:
            at_end = _Texts(*(None if schedule is None else text_at_step(schedule, end) for schedule in schedules))
            if segments and segments[-1][1] == at_end:
                segments[-1] = (end, at_end)
            else:
                segments.append((end, at_end))
        if len(segments) == 1 and segments[0][1] == texts:
            return None  # editing-like brackets that edit nothing: exactly the plain encode
        return segments

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

    def _sides(self, texts: _Texts, cfg: bool) -> tuple[list[tuple[str, str]], str, list[tuple[str, str]] | None]:
        """(field, text) per encoder for each side, with diffusers' defaults, and where the negative comes from."""
        # diffusers' ``or``: an empty prompt_2 falls back to the prompt.
        positive = [
            ("prompt", texts.prompt),
            ("prompt_2", texts.prompt_2) if texts.prompt_2 else ("prompt", texts.prompt),
        ]
        if not cfg:
            return positive, "none", None
        if texts.negative_prompt is None and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return positive, "zeros", None
        negative_1 = ("negative_prompt", texts.negative_prompt or "")
        negative_2 = ("negative_prompt_2", texts.negative_prompt_2) if texts.negative_prompt_2 else negative_1
        return positive, "encoded", [negative_1, negative_2]

    def _encode_cached(
        self,
        texts: _Texts,
        positive_layer: int,
        cfg: bool,
        min_chunks: int,
        tokenized: _Tokenized | None = None,
    ) -> EncodedPrompts:
        positive, negative_source, negative = self._sides(texts, cfg)
        device, input_devices = self._placement()
        output_dtype = self._output_dtype()
        key = (
            tuple(text for _, text in positive),
            negative_source,
            tuple(text for _, text in negative) if negative else None,
            positive_layer,
            self.weighting,
            min_chunks,
            str(device),
            str(output_dtype),
            self._generation,
            self._adapter_fingerprint(),
        )
        cached = self._cache.get(key) if self._cache.max_bytes else None
        if cached is not None:
            self.cache_hits += 1
            result = cached.clone()
            result.info["cache_hit"] = True
            return result

        self.cache_misses += 1
        if tokenized is None:
            tokenized = self._tokenize_texts(texts, cfg)
        with torch.no_grad():
            encoded = self._encode_tokenized(
                positive,
                negative_source,
                negative,
                tokenized,
                max(min_chunks, tokenized.num_chunks),
                positive_layer,
                device,
                input_devices,
                output_dtype,
            )
        if self._cache.max_bytes and self._cache.put(key, encoded):
            return encoded.clone()  # the cache keeps its own copy
        return encoded

    def _output_dtype(self) -> torch.dtype:
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            return self.pipe.text_encoder_2.dtype
        return self.pipe.unet.dtype

    def _placement(self) -> tuple[torch.device, list[torch.device]]:
        """``pipe._execution_device`` and each text encoder's input device, as diffusers computes them, memoized.

        diffusers finds both by walking every submodule of every component looking for offload hooks: about 2,700
        modules for SDXL, more than the whole encode of a short prompt on a GPU (``bench/prompt_encode.py``). The
        result only changes when components, their top-level offload hooks or their devices change, which a cheap
        signature notices; ``clear_cache()`` forgets it too.
        """
        signature = self._placement_signature()
        if self._placement_memo is None or self._placement_memo[0] != signature:
            from diffusers.utils.torch_utils import get_module_execution_device

            devices = [get_module_execution_device(slot.text_encoder) for slot in self._slots]
            self._placement_memo = (signature, (self.pipe._execution_device, devices))
        return self._placement_memo[1]

    def _placement_signature(self) -> tuple:
        parts = []
        for name, component in self.pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            accelerate_hook = getattr(component, "_hf_hook", None)
            diffusers_hook = getattr(component, "_diffusers_hook", None)
            # Under an offload hook the weights move in and out; the hook decides the device, not the weights.
            first = next(component.parameters(), None) if accelerate_hook is None else None
            device = first.device if first is not None else None
            parts.append((name, id(component), id(accelerate_hook), id(diffusers_hook), device))
        return tuple(parts)

    def _adapter_fingerprint(self) -> tuple | None:
        """Active PEFT adapters, their scales and merge state: a cache key part that changes with text-encoder LoRAs.

        Costs nothing when no adapter was ever loaded into a text encoder (no ``peft_config``); otherwise it reads the
        state of the encoder's adapter layers (found once per set of adapter names).
        """
        parts = []
        for slot in self._slots:
            peft_config = getattr(slot.text_encoder, "peft_config", None)
            if not peft_config:
                continue
            layers_key = (id(slot.text_encoder), tuple(sorted(peft_config)))
            layers = self._adapter_layers_memo.get(layers_key)
            if layers is None:
                layers = [
                    module
                    for module in slot.text_encoder.modules()
                    if isinstance(getattr(module, "scaling", None), dict) and hasattr(module, "active_adapters")
                ]
                self._adapter_layers_memo[layers_key] = layers
            state = tuple(
                (
                    tuple(layer.active_adapters),
                    tuple(sorted(layer.scaling.items())),
                    tuple(getattr(layer, "merged_adapters", ())),
                    bool(getattr(layer, "disable_adapters", False)),
                )
                for layer in layers
            )
            parts.append((slot.name, layers_key[1], hash(state)))
        return tuple(parts) or None

    def _tokenize_texts(self, texts: _Texts, cfg: bool) -> _Tokenized:
        """Every side's chunks per encoder; texts are paired with encoders positionally, like diffusers' zip."""
        positive, _, negative = self._sides(texts, cfg)
        memo: dict[tuple, list[list[int]]] = {}
        parsed: dict[str, list[tuple[str, float]]] = {}
        positive_tokens: list[TokenChunks] = []
        negative_tokens: list[TokenChunks] | None = [] if negative is not None else None
        for index in range(len(self._slots)):
            for side, tokens in ((positive, positive_tokens), (negative, negative_tokens)):
                if side is not None and index < len(side):
                    field_name, text = side[index]
                    parsed[text], chunks = self._tokenize(text, index, field_name, memo)
                    tokens.append(chunks)
        return _Tokenized(positive_tokens, negative_tokens, parsed)

    def _tokenize(
        self, text: str, slot_index: int, field_name: str, memo: dict[tuple, list[list[int]]] | None = None
    ) -> tuple[list[tuple[str, float]], TokenChunks]:
        """Parse ``text`` and chunk its tokens for one encoder; ``memo`` shares token ids between equal tokenizers."""
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
        convert = self._textual_inversion_converter(slot)
        if convert is not None:
            fragments = [convert(fragment) for fragment in fragments]
        # SDXL's two tokenizers are the same BPE; they differ only in an added token ("!", tokenizer_2's pad), so for
        # a text without it one tokenizer call serves both encoders.
        differing = self._differing_added_tokens[slot_index]
        shareable = memo is not None and not any(
            token in fragment or token.lower() in fragment.lower() for token in differing for fragment in fragments
        )
        key = (self._tokenization_groups[slot_index], tuple(fragments))
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
            comma_token_id=slot.comma_token_id,
            chunk_length=slot.sequence_length - 2,
        )
        if chunks.num_chunks > MAX_CHUNKS_PER_PROMPT:
            raise InvalidRequest(
                f"{field_name}: {chunks.num_chunks} chunks of {slot.sequence_length - 2} tokens is over the limit of "
                f"{MAX_CHUNKS_PER_PROMPT} per prompt ({MAX_CHUNKS_PER_PROMPT * (slot.sequence_length - 2)} tokens; "
                "every BREAK starts a new chunk); shorten the text or use fewer BREAKs"
            )
        return parsed, chunks

    def _textual_inversion_converter(self, slot: _EncoderSlot) -> Callable[[str], str] | None:
        """diffusers' multi-vector textual-inversion rewrite, only when the tokenizer has tokens beyond its specials."""
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        tokenizer = slot.tokenizer
        if convert is None or not set(tokenizer.added_tokens_encoder) - set(tokenizer.all_special_tokens):
            return None
        return lambda text: convert(text, tokenizer)

    def _weighted(self, hidden_states: torch.Tensor, chunks: TokenChunks) -> torch.Tensor:
        if not chunks.is_weighted:
            return hidden_states
        return apply_token_weights(hidden_states, torch.tensor(chunks.weights), self.weighting)

    def _run_encoder(self, slot: _EncoderSlot, rows: list[list[int]], device: torch.device) -> Any:
        input_ids = torch.tensor(rows, dtype=torch.long).to(device)
        if self._graphs is not None and self._graphs.applies_to(slot.text_encoder, input_ids):
            return self._graphs.run(slot.name, slot.text_encoder, input_ids)
        # Through the module's __call__, so accelerate's offload hooks move the weights in and out.
        return slot.text_encoder(input_ids, output_hidden_states=True)

    def _encode_slot(
        self,
        slot: _EncoderSlot,
        sides: list[tuple[TokenChunks, int]],
        target_chunks: int,
        need_pooled: bool,
        input_device: torch.device,
    ) -> list[_SideOutput]:
        """Encode each side's chunks with one encoder; ``sides`` holds (chunks, hidden-state index) per side."""
        outputs: list[_SideOutput] = []
        if all(chunks.num_chunks == 1 for chunks, _ in sides) and target_chunks == 1:
            # Short prompts: one batch-of-one call per side, exactly as diffusers calls the encoder.
            for chunks, layer in sides:
                output = self._run_encoder(slot, chunks.input_ids, input_device)
                pooled = output[0] if need_pooled and output[0].ndim == 2 else None
                outputs.append(_SideOutput(self._weighted(output.hidden_states[layer], chunks), None, pooled))
            return outputs

        # Long prompts: every chunk of every side in one batch, plus one padding chunk if any side is short.
        rows: list[list[int]] = []
        starts = []
        for chunks, _ in sides:
            starts.append(len(rows))
            rows.extend(chunks.input_ids)
        needs_padding = any(chunks.num_chunks < target_chunks for chunks, _ in sides)
        padding_row = len(rows)
        if needs_padding:
            rows.append(slot.empty_row())
        output = self._run_encoder(slot, rows, input_device)
        for (chunks, layer), start in zip(sides, starts, strict=True):
            all_hidden = output.hidden_states[layer]
            hidden = self._weighted(all_hidden[start : start + chunks.num_chunks], chunks)
            pooled = output[0][start : start + 1] if need_pooled and output[0].ndim == 2 else None
            padding = all_hidden[padding_row] if chunks.num_chunks < target_chunks else None
            outputs.append(_SideOutput(hidden, padding, pooled))
        return outputs

    def _assemble(self, side_outputs: list[_SideOutput], target_chunks: int) -> torch.Tensor:
        """Pad each encoder's chunks to ``target_chunks`` and lay them out as ``[1, 77 * T, sum of widths]``."""
        per_encoder = []
        for side in side_outputs:
            hidden = side.hidden_states
            missing = target_chunks - hidden.shape[0]
            if missing:
                hidden = torch.cat([hidden, side.padding_chunk.unsqueeze(0).expand(missing, -1, -1)])
            per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
        return torch.concat(per_encoder, dim=-1)

    def _encode_tokenized(
        self,
        positive: list[tuple[str, str]],
        negative_source: str,
        negative: list[tuple[str, str]] | None,
        tokenized: _Tokenized,
        target_chunks: int,
        positive_layer: int,
        device: torch.device,
        input_devices: list[torch.device],
        output_dtype: torch.dtype,
    ) -> EncodedPrompts:
        positive_outputs: list[_SideOutput] = []
        negative_outputs: list[_SideOutput] = []
        for index, slot in enumerate(self._slots):
            sides = [(tokenized.positive[index], positive_layer)]
            if tokenized.negative is not None:
                sides.append((tokenized.negative[index], -2))  # diffusers: the negative ignores clip_skip
            # The pooled vector comes from the first encoder whose first output is 2-D (text_embeds), as in diffusers.
            need_pooled = not any(side.pooled is not None for side in positive_outputs)
            outputs = self._encode_slot(slot, sides, target_chunks, need_pooled, input_devices[index])
            positive_outputs.append(outputs[0])
            if tokenized.negative is not None:
                negative_outputs.append(outputs[1])

        prompt_embeds = self._assemble(positive_outputs, target_chunks)
        pooled_prompt_embeds = next((side.pooled for side in positive_outputs if side.pooled is not None), None)
        if pooled_prompt_embeds is None:
            raise ValueError("no text encoder of the pipeline returns pooled (projected) embeddings")

        negative_prompt_embeds = negative_pooled_prompt_embeds = None
        if negative_source == "zeros":
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        elif negative_source == "encoded":
            negative_prompt_embeds = self._assemble(negative_outputs, target_chunks)
            negative_pooled_prompt_embeds = next(side.pooled for side in negative_outputs if side.pooled is not None)

        prompt_embeds = prompt_embeds.to(dtype=output_dtype, device=device)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=output_dtype, device=device)

        info = self._describe(positive, tokenized, negative_source, negative)
        info["num_chunks"] = target_chunks
        return EncodedPrompts(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            info=info,
            chunk_length=self.sequence_length,
        )

    def _describe(
        self,
        positive: list[tuple[str, str]],
        tokenized: _Tokenized,
        negative_source: str,
        negative: list[tuple[str, str]] | None,
    ) -> dict[str, Any]:
        """JSON-able metadata: tokens and chunks per encoder and side, what was weighted, the weighting mode."""

        def per_encoder(tokens: list[TokenChunks]) -> dict[str, dict[str, int]]:
            return {
                slot.name: {"tokens": chunks.num_tokens, "chunks": chunks.num_chunks}
                for slot, chunks in zip(self._slots, tokens, strict=False)
            }

        # Each distinct (field, text, weight) once, with its count: "(cat:1.5), " * 100 is one entry, not 100.
        weighted: dict[tuple[str, str, float], int] = {}
        fields = [("prompt", positive[0][1]), ("prompt_2", positive[1][1])]
        if negative is not None:
            fields += [("negative_prompt", negative[0][1]), ("negative_prompt_2", negative[1][1])]
        breaks: dict[str, int] = {}
        for index, (field_name, text) in enumerate(fields):
            if index % 2 and text == fields[index - 1][1]:
                continue  # prompt_2 defaulting to prompt (or the same text): report its weights once
            parsed = tokenized.parsed.get(text) or parse_prompt_attention(text)
            for run_text, weight in weighted_runs(parsed):
                shown = run_text if len(run_text) <= _MAX_METADATA_TEXT else run_text[: _MAX_METADATA_TEXT - 1] + "…"
                key = (field_name, shown, round(weight, 6))
                weighted[key] = weighted.get(key, 0) + 1
            if parsed.count(BREAK):
                breaks[field_name] = parsed.count(BREAK)
        weighted_list = [
            {"field": field_name, "text": text, "weight": weight, "count": count}
            for (field_name, text, weight), count in weighted.items()
        ]
        return {
            "weighting": self.weighting,
            "cache_hit": False,
            "positive": per_encoder(tokenized.positive),
            "negative": per_encoder(tokenized.negative) if tokenized.negative is not None else None,
            "negative_source": negative_source,  # "encoded", "zeros" (force_zeros_for_empty_prompt) or "none"
            "weighted": weighted_list[:_MAX_METADATA_RUNS],
            "weighted_not_shown": max(0, len(weighted_list) - _MAX_METADATA_RUNS),
            "breaks": breaks,
        }


def _describe_schedule(schedule: list[tuple[int, _Texts]], distinct: list[_Texts]) -> dict[str, Any]:
    """The prompt-editing schedule for metadata: each distinct set of texts once, and the steps that use it."""
    segments, first_step = [], 0
    for last_step, texts in schedule:
        segments.append({"steps": [first_step, last_step], "texts": distinct.index(texts)})
        first_step = last_step + 1

    def shown(text: str) -> str:
        return text if len(text) <= _MAX_SCHEDULE_TEXT else text[: _MAX_SCHEDULE_TEXT - 1] + "…"

    return {
        "texts": [
            {
                name: shown(value)
                for name, value in zip(FIELD_NAMES, vars(texts).values(), strict=True)
                if value is not None
            }
            for texts in distinct
        ],
        "segments": segments,
    }
