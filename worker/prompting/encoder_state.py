"""What the text encoders are right now, read cheaply: where they run and which PEFT adapters act on them.

Both go into the prompt cache's key, so both are read on every encode, cache hits included. Both are found by
walking modules, which costs more than a cached encode, so each is memoized against something cheap to compare.

Placement
    ``pipe._execution_device`` and diffusers' per-encoder device lookup walk every submodule of every component
    looking for offload hooks: about 2,700 modules for SDXL, more than the whole encode of a short prompt on a GPU
    (``bench/prompt_encode.py``). The result only changes when components, their top-level offload hooks or their
    devices change, which a cheap signature notices.

Adapters
    A fingerprint of the text encoders' active PEFT adapters, their scales and merge state. The LoRA code calls
    ``PromptEncoder.clear_cache()`` whenever text-encoder adapters change; the fingerprint is a safety net, not the
    contract.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.prompting.slots import EncoderSlot


class EncoderState:
    """Memoized reads of the pipeline's text encoders; :meth:`forget` drops the memos."""

    def __init__(self, pipe: Any, slots: list[EncoderSlot]) -> None:
        self._pipe = pipe
        self._slots = slots
        self._placement_memo: tuple[tuple, tuple[torch.device, list[torch.device]]] | None = None
        self._adapter_layers_memo: dict[tuple, list[Any]] = {}

    def forget(self) -> None:
        self._placement_memo = None
        self._adapter_layers_memo.clear()

    def output_dtype(self) -> torch.dtype:
        """The dtype diffusers casts the prompt embeddings to."""
        if getattr(self._pipe, "text_encoder_2", None) is not None:
            return self._pipe.text_encoder_2.dtype
        return self._pipe.unet.dtype

    def placement(self) -> tuple[torch.device, list[torch.device]]:
        """``pipe._execution_device`` and each text encoder's input device, as diffusers computes them, memoized."""
        signature = self._placement_signature()
        if self._placement_memo is None or self._placement_memo[0] != signature:
            from diffusers.utils.torch_utils import get_module_execution_device

            devices = [get_module_execution_device(slot.text_encoder) for slot in self._slots]
            self._placement_memo = (signature, (self._pipe._execution_device, devices))
        return self._placement_memo[1]

    def _placement_signature(self) -> tuple:
        parts = []
        for name, component in self._pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            accelerate_hook = getattr(component, "_hf_hook", None)
            diffusers_hook = getattr(component, "_diffusers_hook", None)
            # Under an offload hook the weights move in and out; the hook decides the device, not the weights.
            first = next(component.parameters(), None) if accelerate_hook is None else None
            device = first.device if first is not None else None
            parts.append((name, id(component), id(accelerate_hook), id(diffusers_hook), device))
        return tuple(parts)

    def adapter_fingerprint(self) -> tuple | None:
        """Active PEFT adapters, their scales and merge state: changes with text-encoder LoRAs.

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
