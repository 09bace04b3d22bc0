"""Token chunks -> SDXL conditioning: running the two CLIP text encoders, weighting and laying out their outputs.

Encoding
    Each 77-token chunk goes through each text encoder independently (A1111 and compel semantics: a chunk attends
    only to itself). A prompt whose sides are one chunk each is encoded exactly as diffusers does it (one
    batch-of-one call per side); otherwise all chunks of both sides, plus one padding chunk if needed, go through
    each encoder as a single batch (two encoder calls per prompt, whatever its length). The hidden states are those
    diffusers uses: ``hidden_states[-2]``, or ``hidden_states[-(clip_skip + 2)]``; diffusers encodes the negative
    with ``hidden_states[-2]`` whatever ``clip_skip`` is, and that is kept. Chunks are concatenated along the
    sequence, then the two encoders along the features (768 + 1280 = 2048 for SDXL), then the result is cast to
    ``text_encoder_2.dtype`` on ``pipe._execution_device``, as diffusers does. Token weights: :mod:`.weighting`.

Padding
    Chunk counts can differ between the encoders (``prompt_2`` is a different text), between the positive and
    negative side and between the segments of an edited prompt. Every side of every encoder is brought to the
    caller's count, ``T``, with whole padding chunks: the encoding of the empty chunk ``[BOS, EOS, pad...]`` (what
    A1111 appends, and what diffusers itself encodes for ``negative_prompt=""``). Padding goes at the end, so the
    first chunk stays in place. The result is ``[1, 77 * T, 2048]`` for every tensor.

Pooled embeddings
    From the first chunk of ``text_encoder_2`` (its projected ``text_embeds``), as A1111 and compel do. The first
    chunk holds the start of the prompt, which is where people put the subject, and it is exactly what SDXL was
    trained with (a truncated prompt's pooled vector); averaging the chunks' vectors would blend in padding chunks
    and give a vector the model never saw. Weights do not touch the pooled vector (as in A1111).

On a GPU the encoders run from CUDA graphs (:mod:`.graphs`) where replay is exactly the eager computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.prompting.chunks import TokenChunks
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.graphs import EncoderGraphs
from worker.prompting.slots import EncoderSlot
from worker.prompting.vocabulary import Tokenized
from worker.prompting.weighting import apply_token_weights

NEGATIVE_LAYER = -2  # diffusers: the negative side ignores clip_skip


@dataclass
class _SideOutput:
    """One side (positive or negative) of one encoder: weighted hidden states and, maybe, the pooled vector."""

    hidden_states: torch.Tensor  # [chunks, 77, width]
    padding_chunk: torch.Tensor | None  # [77, width], present when this side needs padding
    pooled: torch.Tensor | None  # [1, projection dim] from the first chunk


@dataclass(frozen=True)
class EncoderRun:
    """How to run the encoders for one result: the layer, the chunk count, devices and dtypes, weighting, graphs."""

    target_chunks: int  # T: every side is padded to it
    positive_layer: int  # the hidden-state index of the positive side (clip_skip)
    device: torch.device  # pipe._execution_device: where the result goes
    input_devices: list[torch.device]  # per encoder, where its input ids go
    output_dtype: torch.dtype
    weighting: str
    graphs: EncoderGraphs | None


def encode_tokenized(
    slots: list[EncoderSlot], tokenized: Tokenized, negative_source: str, run: EncoderRun
) -> EncodedPrompts:
    """The four tensors for ``tokenized`` (its ``info`` left empty); ``negative_source`` as in :class:`.texts.Sides`."""
    positive_outputs: list[_SideOutput] = []
    negative_outputs: list[_SideOutput] = []
    for index, slot in enumerate(slots):
        sides = [(tokenized.positive[index], run.positive_layer)]
        if tokenized.negative is not None:
            sides.append((tokenized.negative[index], NEGATIVE_LAYER))
        # The pooled vector comes from the first encoder whose first output is 2-D (text_embeds), as in diffusers.
        need_pooled = not any(side.pooled is not None for side in positive_outputs)
        outputs = _encode_slot(slot, sides, need_pooled, run.input_devices[index], run)
        positive_outputs.append(outputs[0])
        if tokenized.negative is not None:
            negative_outputs.append(outputs[1])

    prompt_embeds = _assemble(positive_outputs, run.target_chunks)
    pooled_prompt_embeds = next((side.pooled for side in positive_outputs if side.pooled is not None), None)
    if pooled_prompt_embeds is None:
        raise ValueError("no text encoder of the pipeline returns pooled (projected) embeddings")

    negative_prompt_embeds = negative_pooled_prompt_embeds = None
    if negative_source == "zeros":
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
    elif negative_source == "encoded":
        negative_prompt_embeds = _assemble(negative_outputs, run.target_chunks)
        negative_pooled_prompt_embeds = next(side.pooled for side in negative_outputs if side.pooled is not None)

    prompt_embeds = prompt_embeds.to(dtype=run.output_dtype, device=run.device)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=run.output_dtype, device=run.device)
    return EncodedPrompts(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        chunk_length=slots[0].sequence_length,
    )


def _run_encoder(slot: EncoderSlot, rows: list[list[int]], device: torch.device, graphs: EncoderGraphs | None) -> Any:
    input_ids = torch.tensor(rows, dtype=torch.long).to(device)
    if graphs is not None and graphs.applies_to(slot.text_encoder, input_ids):
        return graphs.run(slot.name, slot.text_encoder, input_ids)
    # Through the module's __call__, so accelerate's offload hooks move the weights in and out.
    return slot.text_encoder(input_ids, output_hidden_states=True)


def _weighted(hidden_states: torch.Tensor, chunks: TokenChunks, weighting: str) -> torch.Tensor:
    if not chunks.is_weighted:
        return hidden_states
    return apply_token_weights(hidden_states, torch.tensor(chunks.weights), weighting)


def _encode_slot(
    slot: EncoderSlot,
    sides: list[tuple[TokenChunks, int]],
    need_pooled: bool,
    input_device: torch.device,
    run: EncoderRun,
) -> list[_SideOutput]:
    """Encode each side's chunks with one encoder; ``sides`` holds (chunks, hidden-state index) per side."""
    outputs: list[_SideOutput] = []
    if all(chunks.num_chunks == 1 for chunks, _ in sides) and run.target_chunks == 1:
        # Short prompts: one batch-of-one call per side, exactly as diffusers calls the encoder.
        for chunks, layer in sides:
            output = _run_encoder(slot, chunks.input_ids, input_device, run.graphs)
            pooled = output[0] if need_pooled and output[0].ndim == 2 else None
            outputs.append(_SideOutput(_weighted(output.hidden_states[layer], chunks, run.weighting), None, pooled))
        return outputs

    # Long prompts: every chunk of every side in one batch, plus one padding chunk if any side is short.
    rows: list[list[int]] = []
    starts = []
    for chunks, _ in sides:
        starts.append(len(rows))
        rows.extend(chunks.input_ids)
    needs_padding = any(chunks.num_chunks < run.target_chunks for chunks, _ in sides)
    padding_row = len(rows)
    if needs_padding:
        rows.append(slot.empty_row())
    output = _run_encoder(slot, rows, input_device, run.graphs)
    for (chunks, layer), start in zip(sides, starts, strict=True):
        all_hidden = output.hidden_states[layer]
        hidden = _weighted(all_hidden[start : start + chunks.num_chunks], chunks, run.weighting)
        pooled = output[0][start : start + 1] if need_pooled and output[0].ndim == 2 else None
        padding = all_hidden[padding_row] if chunks.num_chunks < run.target_chunks else None
        outputs.append(_SideOutput(hidden, padding, pooled))
    return outputs


def _assemble(side_outputs: list[_SideOutput], target_chunks: int) -> torch.Tensor:
    """Pad each encoder's chunks to ``target_chunks`` and lay them out as ``[1, 77 * T, sum of widths]``."""
    per_encoder = []
    for side in side_outputs:
        hidden = side.hidden_states
        missing = target_chunks - hidden.shape[0]
        if missing:
            hidden = torch.cat([hidden, side.padding_chunk.unsqueeze(0).expand(missing, -1, -1)])
        per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
    return torch.concat(per_encoder, dim=-1)
