"""CUDA graphs of text-encoder forwards: on a GPU, eager CLIP is bound by kernel launches, not by arithmetic.

``bench/prompt_encode.py --full-size`` measures the encode time with and without them
(``PROMPT_ENCODER_CUDA_GRAPHS=0`` turns them off).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch

log = logging.getLogger(__name__)


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
