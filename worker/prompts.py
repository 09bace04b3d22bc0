"""Long, weighted prompts for SDXL (LPW-SDXL): A1111 attention syntax, no 77-token limit, exact for short prompts.

``PromptEncoder(pipe).encode(prompt, ...)`` returns the four tensors a ``StableDiffusionXLPipeline`` takes as
``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``.

Parsing
    ``worker.prompt_syntax.parse_prompt_attention``: ``(x)``, ``(x:1.3)``, ``[x]``, escapes, ``BREAK``.

Chunking (per tokenizer: each tokenizer tokenizes its own text, ``prompt`` for ``tokenizer`` and ``prompt_2`` for
``tokenizer_2``)
    Every weighted run is tokenized on its own (as A1111 does: a weight boundary is a token boundary) and the tokens
    are laid into chunks of 75. A chunk is ``[BOS] + up to 75 tokens + [EOS]``, padded to 77 with that tokenizer's
    pad id (``<|endoftext|>`` for ``tokenizer``, ``!`` = 0 for ``tokenizer_2``): exactly the row diffusers builds for a
    short prompt. No token is ever dropped. ``BREAK`` closes the current chunk (a ``BREAK`` at the start or right
    after another one has no chunk to close and does nothing, rather than add an empty chunk). A1111's comma
    backtrack: when a chunk is full and a comma lies within its last 20 tokens, the tokens after that comma move to
    the next chunk, so a phrase is not cut in two.

Encoding
    Each 77-token chunk goes through each text encoder independently (A1111 and compel semantics: a chunk attends
    only to itself). A prompt whose sides are one chunk each is encoded exactly as diffusers does it (one
    batch-of-one call per side); otherwise all chunks of both sides, plus one padding chunk if needed, go through
    each encoder as a single batch (two encoder calls per prompt, whatever its length). The hidden states are those
    diffusers uses: ``hidden_states[-2]``, or ``hidden_states[-(clip_skip + 2)]``. Chunks are concatenated along the
    sequence, then the two encoders along the features (768 + 1280 = 2048 for SDXL), then the result is cast to
    ``text_encoder_2.dtype`` on ``pipe._execution_device``, as diffusers does.

    Chunk counts can differ between the encoders (``prompt_2`` is a different text) and between the positive and
    negative side. Every side of every encoder is brought to the largest count, ``T``, with whole padding chunks:
    the encoding of the empty chunk ``[BOS, EOS, pad...]`` (what A1111 appends, and what diffusers itself encodes
    for ``negative_prompt=""``). Padding goes at the end, so the first chunk stays in place. The result is
    ``[1, 77 * T, 2048]`` for every tensor: the UNet's cross-attention takes any sequence length.

Pooled embeddings
    From the first chunk of ``text_encoder_2`` (its projected ``text_embeds``), as A1111 and compel do. The first
    chunk holds the start of the prompt, which is where people put the subject, and it is exactly what SDXL was
    trained with (a truncated prompt's pooled vector); averaging the chunks' vectors would blend in padding chunks
    and give a vector the model never saw. Weights do not touch the pooled vector (as in A1111).

Weighting (``weighting=``), applied per chunk and per encoder to that chunk's hidden states, in float32
    - ``"multiply"`` (A1111's "No norm"): each token's row is multiplied by its weight. Only weighted tokens change.
    - ``"restore_mean"`` (A1111's "Original"): multiply, then rescale the whole chunk so its mean equals the
      unweighted mean. Every row of the chunk changes, BOS and padding included, by a factor that depends on the
      chunk's mean; when that mean is near zero the factor is unbounded (a guard falls back to plain multiplication
      when the new mean is zero or the factor is not finite).
    A chunk whose weights are all 1 is never touched, so unweighted prompts are bit-identical in both modes.

    Default ``"multiply"``, by measurement (``bench/prompt_encode.py``, ``weighting_measurement`` lines, prompts with
    30% of their words weighted 0.5 to 2.0, against the same tokens unweighted). With ``multiply`` a weighted row
    scales by exactly its weight and no other row moves. ``restore_mean`` rescales whole chunks by a ratio of two
    means: with SDXL's full-size encoders (random weights) the factor was 0.94 to 1.0, so weights acted up to 6%
    weaker than written and every other row of a weighted chunk (BOS, the other words, padding) shrank by up to 6%;
    on the dev model, whose chunk means are near zero, the factor ranged from -2.8 to 2.9 and flipped the sign of 2
    chunks in 80. Random weights cannot show image quality, but they show that restore_mean's effect depends on the
    chunk's statistics rather than on the weights written, with no bound as the mean nears zero. A1111 itself
    describes "No norm" as working better for SDXL, and the sd-webui-prevent-artifact extension traces broken SDXL
    images to this normalisation. Both cost the same (a few element-wise operations on weighted chunks only).

Negative prompt (only with ``do_classifier_free_guidance``), as in diffusers
    ``negative_prompt=None`` with ``force_zeros_for_empty_prompt`` (SDXL base) gives zeros of the positive's shape.
    Otherwise ``negative_prompt or ""`` goes to encoder 1 and ``negative_prompt_2 or negative_prompt`` to encoder 2,
    and both sides are padded to the same length. diffusers encodes the negative with ``hidden_states[-2]`` whatever
    ``clip_skip`` is; that is kept, so short prompts match stock diffusers exactly.

Equivalence with diffusers
    For texts of at most 75 tokens without attention syntax every tensor equals ``pipe.encode_prompt(...)``
    bit for bit: the same token rows, the same batch-of-one encoder calls (a batched call may pick other GEMM
    kernels and differ in the last bits), the same layers, dtypes and devices.

Cache
    A bounded LRU of results keyed by every input that changes them (texts, clip_skip layer, guidance flag,
    weighting, device, dtype, a fingerprint of the text encoders' PEFT adapters) and a generation counter that
    :meth:`PromptEncoder.clear_cache` bumps (the LoRA code calls it whenever text-encoder adapters change; the
    fingerprint is a safety net, not the contract). Every call returns fresh clones, so callers may modify them.
    Not thread-safe: one encoder per worker thread.

Speed
    ``pipe._execution_device`` and diffusers' per-encoder device lookup walk every module of the pipeline (~2,700
    for SDXL, milliseconds per call); they are memoized against a cheap signature of the components, their
    top-level offload hooks and devices. When both tokenizers agree on a text (SDXL's differ only on "!", the pad
    token tokenizer_2 registers as an added token) one tokenizer call serves both encoders.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from worker.prompt_syntax import BREAK, parse_prompt_attention, weighted_runs

log = logging.getLogger(__name__)

WEIGHTING_MODES: Final = ("multiply", "restore_mean")
DEFAULT_WEIGHTING: Final = "multiply"
COMMA_BACKTRACK: Final = 20  # A1111's default "comma_padding_backtrack"
ENCODER_NAMES: Final = ("text_encoder", "text_encoder_2")
_MAX_METADATA_TEXT: Final = 120  # characters of a weighted run shown in metadata
_MAX_METADATA_RUNS: Final = 32  # distinct weighted runs shown in metadata


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
) -> TokenChunks:
    """Lay weighted token runs into ``[BOS] + chunk_length + [EOS]`` rows padded with ``pad_token_id``.

    ``runs`` holds ``(token_ids, weight)`` per text run and ``None`` where a ``BREAK`` forces a chunk boundary.
    The same chunks as A1111's ``tokenize_line`` (comma backtrack included), except that a ``BREAK`` with nothing
    before it in its chunk adds no empty chunk. Every token ends up in exactly one chunk, in order.
    """
    # Sections between BREAKs, as flat token and weight lists; an empty section makes no chunk.
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
    for tokens, weights in sections:
        start = 0
        while len(tokens) - start > chunk_length:
            end = start + chunk_length
            if comma_backtrack > 0 and tokens[end] != comma_token_id:
                for position in range(end - 1, max(start, end - comma_backtrack) - 1, -1):
                    if tokens[position] == comma_token_id:
                        end = position + 1
                        break
            chunks.append((tokens[start:end], weights[start:end]))
            start = end
        if start < len(tokens):
            chunks.append((tokens[start:], weights[start:]))
    if not chunks:
        chunks.append(([], []))

    rows, row_weights = [], []
    for chunk_tokens, chunk_weights in chunks:
        padding = chunk_length - len(chunk_tokens)
        # diffusers' row: BOS, the tokens, EOS, then the pad id up to 77 (pad == EOS for CLIP-L, "!" for bigG).
        rows.append([bos_token_id, *chunk_tokens, eos_token_id] + [pad_token_id] * padding)
        row_weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
    is_weighted = any(run is not None and run[1] != 1.0 and run[0] for run in runs)
    return TokenChunks(rows, row_weights, sum(len(chunk_tokens) for chunk_tokens, _ in chunks), is_weighted)


def apply_token_weights(hidden_states: torch.Tensor, weights: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weight ``hidden_states`` ``[chunks, 77, width]`` by ``weights`` ``[chunks, 77]``, chunk by chunk.

    Chunks whose weights are all 1 are returned untouched (bit for bit); the arithmetic runs in float32. Pass
    ``weights`` on the CPU: deciding whether anything is weighted then needs no device synchronisation.
    """
    if weighting not in WEIGHTING_MODES:
        raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTING_MODES)}")
    weighted_rows = (weights != 1.0).any(dim=1)
    if not bool(weighted_rows.any()):
        return hidden_states
    weights = weights.to(device=hidden_states.device, dtype=torch.float32)
    weighted_rows = weighted_rows.to(hidden_states.device)
    original = hidden_states.float()
    weighted = original * weights.unsqueeze(-1)
    if weighting == "restore_mean":
        original_mean = original.mean(dim=(1, 2), keepdim=True)
        new_mean = weighted.mean(dim=(1, 2), keepdim=True)
        factor = original_mean / new_mean
        # A zero new mean would give inf or NaN: keep the plain multiplication for such a chunk.
        factor = torch.where(torch.isfinite(factor) & (new_mean != 0), factor, torch.ones_like(factor))
        weighted = weighted * factor
    # Large weights (or a large restore_mean factor) must not overflow fp16 into inf, which would give NaN images.
    limit = torch.finfo(hidden_states.dtype).max
    weighted = weighted.clamp(-limit, limit).to(hidden_states.dtype)
    return torch.where(weighted_rows[:, None, None], weighted, hidden_states)


@dataclass
class EncodedPrompts:
    """What the pipeline takes as ``prompt_embeds=...`` etc., plus JSON-able metadata."""

    prompt_embeds: torch.Tensor  # [1, 77 * T, sum of both encoder widths]
    pooled_prompt_embeds: torch.Tensor  # [1, projection dim]
    negative_prompt_embeds: torch.Tensor | None  # same shape as prompt_embeds; None only when guidance is off
    negative_pooled_prompt_embeds: torch.Tensor | None
    info: dict[str, Any] = field(default_factory=dict)
    chunk_length: int = 77

    @property
    def num_chunks(self) -> int:
        """T: prompts with equal T can share one pipeline call (the batch runner groups on it)."""
        return self.prompt_embeds.shape[1] // self.chunk_length

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
        )


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


def _tokenization_groups(tokenizers: Sequence[Any]) -> tuple[list[int], list[frozenset[str]]]:
    """Group tokenizers that give the same ids for any text free of the added tokens they disagree on.

    Returns, per tokenizer, its group (the index of the first equal one) and the added tokens on which the group's
    members differ. Fast (``tokenizers``-backed) tokenizers only; two are equal when their serialised pipelines
    (normaliser, pre-tokenizer, model, decoder) are, padding and post-processing aside (the chunker adds BOS, EOS and
    padding itself).
    """
    specs: list[tuple[str, dict[str, str]] | None] = []
    for tokenizer in tokenizers:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            specs.append(None)
            continue
        spec = json.loads(backend.to_str())
        added = {entry["content"]: json.dumps(entry, sort_keys=True) for entry in spec.pop("added_tokens", None) or []}
        for key in ("padding", "truncation", "post_processor"):
            spec.pop(key, None)
        specs.append((json.dumps([type(tokenizer).__name__, spec], sort_keys=True), added))
    groups = list(range(len(tokenizers)))
    for index, spec in enumerate(specs):
        for earlier in range(index):
            if spec is not None and specs[earlier] is not None and specs[earlier][0] == spec[0]:
                groups[index] = groups[earlier]
                break
    differing: list[frozenset[str]] = []
    for index in range(len(tokenizers)):
        members = [specs[other][1] for other in range(len(tokenizers)) if groups[other] == groups[index]]
        contents = set().union(*members) if specs[index] is not None else set()
        differing.append(frozenset(c for c in contents if len({member.get(c) for member in members}) > 1))
    return groups, differing


class EncoderGraphs:
    """CUDA graphs of text-encoder forwards, one per (encoder, input shape), captured on first use.

    Used only where replay is exactly the eager computation: the encoder's weights on a CUDA device, no accelerate
    offload hook moving them, no PEFT adapter whose scales Python would read at call time. Outputs are copied out of
    the graph's static buffers, since the next replay overwrites them. A replay reads the weights' memory, so
    in-place weight changes (fused LoRAs) are seen; weights replaced by new tensors change the key. Each graph keeps
    its own memory pool: a pool shared by graphs that were all freed is released, and capturing into it again trips
    an allocator assertion (seen on an H200 with torch 2.11).
    """

    def __init__(self, max_graphs: int = 16) -> None:
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = OrderedDict()
        self.broken: str | None = None  # set when capture failed once; eager from then on

    @staticmethod
    def applies_to(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> bool:
        return (
            input_ids.is_cuda
            and getattr(text_encoder, "_hf_hook", None) is None
            and not getattr(text_encoder, "peft_config", None)
            and next(text_encoder.parameters()).is_cuda
        )

    def clear(self) -> None:
        self._graphs.clear()

    def run(self, name: str, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> Any:
        if self.broken is not None:
            return text_encoder(input_ids, output_hidden_states=True)
        weight = next(text_encoder.parameters())
        key = (name, id(text_encoder), weight.data_ptr(), weight.dtype, tuple(input_ids.shape), input_ids.device)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(text_encoder, input_ids)
            except Exception as error:  # an encoder that cannot be captured still works eagerly
                self.broken = f"{type(error).__name__}: {error}"
                log.warning("text encoder CUDA graph capture failed, encoding eagerly: %s", self.broken)
                return text_encoder(input_ids, output_hidden_states=True)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_input, static_output = entry
        static_input.copy_(input_ids)
        graph.replay()
        return _clone_output(static_output)

    def _capture(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> tuple:
        static_input = input_ids.clone()
        side_stream = torch.cuda.Stream(device=input_ids.device)
        side_stream.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side_stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph: lazy initialisation must not be captured
                text_encoder(static_input, output_hidden_states=True)
        torch.cuda.current_stream(input_ids.device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_output = text_encoder(static_input, output_hidden_states=True)
        return graph, static_input, static_output


def _clone_output(output: Any) -> Any:
    """A copy of a transformers model output whose tensors no later graph replay can overwrite."""
    copied = copy.copy(output)
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            copied[key] = value.clone()
        elif isinstance(value, tuple):
            copied[key] = tuple(item.clone() if isinstance(item, torch.Tensor) else item for item in value)
    return copied


class PromptEncoder:
    """Long-prompt, A1111-weighted ``encode_prompt`` for a ``StableDiffusionXLPipeline``; see the module docstring."""

    def __init__(self, pipe: Any, cache_size: int = 32, weighting: str = DEFAULT_WEIGHTING) -> None:
        if weighting not in WEIGHTING_MODES:
            raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTING_MODES)}")
        if cache_size < 0:
            raise ValueError(f"cache_size: {cache_size} must be >= 0 (0 disables the cache)")
        self.pipe = pipe
        self.weighting = weighting
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: OrderedDict[tuple, EncodedPrompts] = OrderedDict()
        self._generation = 0
        self._placement_memo: tuple[tuple, tuple[torch.device, list[torch.device]]] | None = None
        self._adapter_layers_memo: dict[tuple, list[Any]] = {}
        # Eager CLIP on a GPU is bound by kernel launches (~17 ms for one chunk through both full-size encoders on
        # an H200), not by arithmetic; replaying a captured CUDA graph per batch shape removes most of that.
        self._graphs = EncoderGraphs() if os.environ.get("PROMPT_ENCODER_CUDA_GRAPHS", "1") != "0" else None

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
        self._tokenization_groups, self._differing_added_tokens = _tokenization_groups(
            [slot.tokenizer for slot in self._slots]
        )

    # -- public API -------------------------------------------------------------------------------------------------

    def encode(
        self,
        prompt: str,
        prompt_2: str | None = None,
        negative_prompt: str | None = None,
        negative_prompt_2: str | None = None,
        clip_skip: int | None = None,
        do_classifier_free_guidance: bool = True,
    ) -> EncodedPrompts:
        """Encode a prompt (and its negative) of any length; returns tensors the caller owns."""
        for field_name, value in (
            ("prompt", prompt),
            ("prompt_2", prompt_2),
            ("negative_prompt", negative_prompt),
            ("negative_prompt_2", negative_prompt_2),
        ):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{field_name}: expected a string, got {type(value).__name__}")
        if prompt is None:
            raise TypeError("prompt: expected a string, got None")
        positive_layer = self._hidden_state_index(clip_skip)

        # diffusers' defaults, with its ``or``: an empty prompt_2 falls back to the prompt.
        positive_texts = [prompt, prompt_2 or prompt]
        if not do_classifier_free_guidance:
            negative_source, negative_texts = "none", None
        elif negative_prompt is None and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            negative_source, negative_texts = "zeros", None
        else:
            negative_source = "encoded"
            negative_texts = [negative_prompt or "", negative_prompt_2 or negative_prompt or ""]

        device, input_devices = self._placement()
        output_dtype = self._output_dtype()
        key = (
            tuple(positive_texts),
            negative_source,
            tuple(negative_texts) if negative_texts else None,
            positive_layer,
            self.weighting,
            str(device),
            str(output_dtype),
            self._generation,
            self._adapter_fingerprint(),
        )
        cached = self._cache.get(key) if self.cache_size else None
        if cached is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            result = cached.clone()
            result.info["cache_hit"] = True
            return result

        self.cache_misses += 1
        with torch.no_grad():
            encoded = self._encode_uncached(
                positive_texts, negative_source, negative_texts, positive_layer, device, input_devices, output_dtype
            )
        if self.cache_size:
            self._cache[key] = encoded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return encoded.clone()  # the cache keeps its own copy
        return encoded

    def clear_cache(self) -> None:
        """Forget every cached result; call whenever the text encoders' weights or adapters change."""
        self._cache.clear()
        self._generation += 1
        self._placement_memo = None
        self._adapter_layers_memo.clear()

    def tokenize(self, text: str, encoder_index: int = 0) -> TokenChunks:
        """The chunked rows one text gives for one encoder (0: ``text_encoder``, 1: ``text_encoder_2``)."""
        return self._tokenize(text, encoder_index)[1]

    # -- internals --------------------------------------------------------------------------------------------------

    def _hidden_state_index(self, clip_skip: int | None) -> int:
        if clip_skip is None:
            return -2
        deepest = min(slot.num_layers for slot in self._slots) - 1
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= deepest:
            raise ValueError(
                f"clip_skip: {clip_skip!r} is out of range for this model; use 0..{deepest} "
                "(0 or None is SDXL's usual penultimate layer)"
            )
        return -(clip_skip + 2)  # "2" because SDXL always indexes from the penultimate layer (diffusers)

    def _output_dtype(self) -> torch.dtype:
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            return self.pipe.text_encoder_2.dtype
        return self.pipe.unet.dtype

    def _placement(self) -> tuple[torch.device, list[torch.device]]:
        """``pipe._execution_device`` and each text encoder's input device, as diffusers computes them, memoized.

        diffusers finds both by walking every submodule of every component looking for offload hooks: about 2,700
        modules for SDXL, milliseconds per call, more than the whole encode of a short prompt on a GPU. The result
        only changes when components, their top-level offload hooks or their devices change, which a cheap signature
        notices; ``clear_cache()`` forgets it too.
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

    def _tokenize(
        self, text: str, slot_index: int, memo: dict[tuple, list[list[int]]] | None = None
    ) -> tuple[list[tuple[str, float]], TokenChunks]:
        """Parse ``text`` and chunk its tokens for one encoder; ``memo`` shares token ids between equal tokenizers."""
        slot = self._slots[slot_index]
        parsed = parse_prompt_attention(text)
        fragments = [item[0] for item in parsed if item != BREAK]
        convert = self._textual_inversion_converter(slot)
        if convert is not None:
            fragments = [convert(fragment) for fragment in fragments]
        # SDXL's two tokenizers are the same BPE; they differ only in an added token ("!", tokenizer_2's pad), so for
        # a text without it one tokenizer call serves both encoders (tokenizing is ~1 ms per 300 tokens).
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

    def _encode_uncached(
        self,
        positive_texts: list[str],
        negative_source: str,
        negative_texts: list[str] | None,
        positive_layer: int,
        device: torch.device,
        input_devices: list[torch.device],
        output_dtype: torch.dtype,
    ) -> EncodedPrompts:
        # Texts are paired with encoders positionally, like diffusers' zip.
        memo: dict[tuple, list[list[int]]] = {}
        parsed: dict[str, list[tuple[str, float]]] = {}
        positive_tokens: list[TokenChunks] = []
        negative_tokens: list[TokenChunks] | None = [] if negative_texts is not None else None
        for index in range(len(self._slots)):
            for texts, tokens in ((positive_texts, positive_tokens), (negative_texts, negative_tokens)):
                if texts is not None and index < len(texts):
                    parsed[texts[index]], chunks = self._tokenize(texts[index], index, memo)
                    tokens.append(chunks)
        target_chunks = max(chunks.num_chunks for chunks in positive_tokens + (negative_tokens or []))

        positive_outputs: list[_SideOutput] = []
        negative_outputs: list[_SideOutput] = []
        for index, slot in enumerate(self._slots):
            sides = [(positive_tokens[index], positive_layer)]
            if negative_tokens is not None:
                sides.append((negative_tokens[index], -2))  # diffusers: the negative ignores clip_skip
            # The pooled vector comes from the first encoder whose first output is 2-D (text_embeds), as in diffusers.
            need_pooled = not any(side.pooled is not None for side in positive_outputs)
            outputs = self._encode_slot(slot, sides, target_chunks, need_pooled, input_devices[index])
            positive_outputs.append(outputs[0])
            if negative_tokens is not None:
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

        info = self._describe(positive_texts, positive_tokens, negative_source, negative_texts, negative_tokens, parsed)
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
        positive_texts: list[str],
        positive_tokens: list[TokenChunks],
        negative_source: str,
        negative_texts: list[str] | None,
        negative_tokens: list[TokenChunks] | None,
        parsed_texts: dict[str, list[tuple[str, float]]],
    ) -> dict[str, Any]:
        """JSON-able metadata: tokens and chunks per encoder and side, what was weighted, the weighting mode."""

        def per_encoder(tokens: list[TokenChunks]) -> dict[str, dict[str, int]]:
            return {
                slot.name: {"tokens": chunks.num_tokens, "chunks": chunks.num_chunks}
                for slot, chunks in zip(self._slots, tokens, strict=False)
            }

        # Each distinct (field, text, weight) once, with its count: "(cat:1.5), " * 100 is one entry, not 100.
        weighted: dict[tuple[str, str, float], int] = {}
        fields = [("prompt", positive_texts[0]), ("prompt_2", positive_texts[1])]
        if negative_texts is not None:
            fields += [("negative_prompt", negative_texts[0]), ("negative_prompt_2", negative_texts[1])]
        breaks: dict[str, int] = {}
        for index, (field_name, text) in enumerate(fields):
            if index % 2 and text == fields[index - 1][1]:
                continue  # prompt_2 defaulting to prompt (or the same text): report its weights once
            parsed = parsed_texts.get(text) or parse_prompt_attention(text)
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
            "positive": per_encoder(positive_tokens),
            "negative": per_encoder(negative_tokens) if negative_tokens is not None else None,
            "negative_source": negative_source,  # "encoded", "zeros" (force_zeros_for_empty_prompt) or "none"
            "weighted": weighted_list[:_MAX_METADATA_RUNS],
            "weighted_not_shown": max(0, len(weighted_list) - _MAX_METADATA_RUNS),
            "breaks": breaks,
        }
