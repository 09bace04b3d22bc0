"""A job's UNet LoRAs merged into the UNet's own weights, and those weights restored bit for bit after it.

The UNet then runs its original modules (no peft wrapper: no cost per step, and the module structure a compiled
UNet was traced with, so compiled code keeps serving LoRA jobs without recompiling); the weights change in place,
which compiled code and CUDA graphs read at run time. Restoring copies the saved weights back rather than
subtracting the delta (which would not round back exactly). DoRA and bias LoRAs, CPU offload and ``LORA_FUSE=0``
are left to peft's layers (:mod:`.layers`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from worker.adapters.lora.layers import WrappedLayer, offload_mode

log = logging.getLogger(__name__)


class UnetFusion:
    """Owns the exact copies of the UNet weights the current job's merged LoRAs changed."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.saved: list[tuple[Any, Any]] = []  # (UNet weight, its exact copy from before the job's LoRAs)
        self._merged: tuple = ()  # (layer records, names, scales) the merged weights hold now

    def holds(self, records: list[WrappedLayer], names: list[str], scales: list[float]) -> bool:
        """True when these very LoRAs are merged into these very layers already (a repeated LoRA set)."""
        return bool(self._merged) and self._merged[0] is records and self._merged[1:] == (names, scales)

    def possible(self, records: list[WrappedLayer], names: list[str]) -> bool:
        """Merging needs weights of its own (no offload hooks, nothing on meta) and plain LoRA layers."""
        if offload_mode(self.pipe) is not None:
            return False
        for record in records:
            layer = record.wrapper
            for name in names:
                if name not in layer.lora_A:
                    continue
                # DoRA rescales the merged weight by a norm and a bias LoRA adds a bias term: peft runs those.
                if getattr(layer, "use_dora", {}).get(name) or getattr(layer, "lora_bias", {}).get(name):
                    return False
                if layer.get_base_layer().weight.device.type == "meta":
                    return False
        return True

    def merge(self, records: list[WrappedLayer], names: list[str], scales: list[float]) -> None:
        """Merge the adapters into the weights they touch, keeping an exact copy of each weight changed."""
        import torch

        started = time.perf_counter()
        touched = []
        for record in records:
            record.attach(False)
            lora_a = record.wrapper.lora_A
            present = [(name, scale) for name, scale in zip(names, scales, strict=True) if name in lora_a]
            if present:
                touched.append((record.wrapper, present))
        self._merged = (records, list(names), list(scales))
        if not touched:
            return
        weights = [layer.get_base_layer().weight for layer, _ in touched]
        backup_device = _backup_device(weights)
        with torch.no_grad():
            for (layer, present), weight in zip(touched, weights, strict=True):
                delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                for name, scale in present:
                    if layer.lora_A[name].weight.device != weight.device:
                        layer._move_adapter_to_device_of_base_layer(name)
                    layer.set_scale(name, scale)
                    delta += layer.get_delta_weight(name).float()
                self.saved.append((weight, weight.detach().to(backup_device, copy=True)))
                weight.copy_((weight.float() + delta).to(weight.dtype))
        log.debug("merged %d LoRA layers into the UNet in %.3f s", len(touched), time.perf_counter() - started)

    def restore(self) -> None:
        """Copy every changed weight back, bit for bit."""
        self._merged = ()
        if not self.saved:
            return
        import torch

        with torch.no_grad():
            for weight, original in self.saved:
                weight.copy_(original)
        self.saved.clear()


def _backup_device(weights: list[Any]) -> Any:
    """Keep the copies beside the weights (a restore is a device copy) unless the GPU is short of room."""
    import torch

    device = weights[0].device
    if device.type != "cuda":
        return device
    needed = sum(weight.numel() * weight.element_size() for weight in weights)
    free = torch.cuda.mem_get_info(device)[0]
    # 4 GiB stays free for a 1024² job's activations; otherwise the copies go to host memory (slower restore).
    return device if free > needed + 4 * 2**30 else torch.device("cpu")
