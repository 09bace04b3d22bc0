"""A job's LoRAs merged into the model's own weights, and those weights restored bit for bit after it.

Two kinds of adapter are merged. In the UNet (``LORA_FUSE=1``, the default) the plain LoRAs diffusers loaded as peft
layers: the UNet then runs its original modules (no peft wrapper: no cost per step, and the module structure a
compiled UNet was traced with, so compiled code keeps serving LoRA jobs without recompiling); CPU offload and
``LORA_FUSE=0`` leave those to peft's layers (:mod:`.layers`). In every component the adapters no peft layer runs
faithfully (LoHa, LoKr, Tucker LoCon, DoRA: :mod:`.merged_files`), which are always merged.

Each changed weight is computed once per change of the job's LoRA set, in float32, applying the job's adapters in
request order (as A1111 and ComfyUI patch weights one network after another), and rounded once to its dtype. The
weights change in place, which compiled code, CUDA graphs and offload hooks read at run time. Restoring copies the
saved weights back rather than subtracting (which would not round back exactly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.adapters.lora.layers import WrappedLayer, offload_mode
from worker.adapters.lora.lycoris import LayerUpdate
from worker.adapters.lora.merged_files import base_layer

log = logging.getLogger(__name__)

# One adapter of a job in a component, in request order: (adapter name, scale, its merged layers or None for a
# plain LoRA in peft's layers, which is merged only in the UNet and only when fused).
Step = tuple[str, float, dict[str, LayerUpdate] | None]


class WeightMerges:
    """Owns, per component, the exact copies of the weights the current job's merged adapters changed."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.saved: dict[str, list[tuple[Any, Any]]] = {}  # component -> (weight, its copy from before the job)
        self._held: dict[str, tuple] = {}  # component -> (peft layer records or None, ((name, scale), ...))

    def holds(self, component: str, records: list[WrappedLayer] | None, steps: list[Step]) -> bool:
        """True when these very adapters are merged into this component already (a repeated LoRA set)."""
        held = self._held.get(component)
        if held is None:
            return records is None and not steps  # nothing merged, nothing to merge
        return held[0] is records and held[1] == tuple((name, scale) for name, scale, _ in steps)

    def fusable(self, records: list[WrappedLayer], names: list[str]) -> bool:
        """Whether peft's LoRA layers can be merged: weights of their own (no offload hooks, nothing on meta)."""
        if offload_mode(self.pipe) is not None:
            return False
        for record in records:
            layer = record.wrapper
            for name in names:
                if name not in layer.lora_A:
                    continue
                # A bias LoRA adds a bias term: peft runs it (DoRA files are merged by .merged_files, not loaded here).
                if getattr(layer, "use_dora", {}).get(name) or getattr(layer, "lora_bias", {}).get(name):
                    return False
                if layer.get_base_layer().weight.device.type == "meta":
                    return False
        return True

    def merge(self, component: str, model: Any, records: list[WrappedLayer] | None, steps: list[Step]) -> None:
        """Merge ``steps`` into ``model``'s weights (``records``: peft layers to fuse, detached from the model)."""
        import torch

        started = time.perf_counter()
        for record in records or ():
            record.attach(False)
        self._held[component] = (records, tuple((name, scale) for name, scale, _ in steps))
        changes: dict[int, tuple[Any, list[Callable[[Any], Any]]]] = {}

        def add(weight: Any, change: Callable[[Any], Any]) -> None:
            changes.setdefault(id(weight), (weight, []))[1].append(change)

        for name, scale, layers in steps:
            if layers is None:
                for record in records or ():
                    if name in record.wrapper.lora_A:
                        add(record.wrapper.get_base_layer().weight, _peft_change(record.wrapper, name, scale))
            else:
                for path, update in layers.items():
                    add(base_layer(model, path).weight, _update_change(update, scale))
        if not changes:
            return
        weights = [weight for weight, _ in changes.values()]
        backup_device = _backup_device(weights)
        saved = self.saved.setdefault(component, [])
        try:
            with torch.no_grad():
                for weight, steps_of_weight in changes.values():
                    new = weight.detach().float()
                    for change in steps_of_weight:
                        new = change(new)
                    saved.append((weight, weight.detach().to(backup_device, copy=True)))
                    weight.copy_(new.to(weight.dtype))
        except BaseException:
            self.restore(component)  # nothing half-merged
            raise
        log.debug("merged LoRAs into %d %s weights in %.3f s", len(changes), component, time.perf_counter() - started)

    def restore(self, component: str) -> None:
        """Copy every weight of ``component`` the merges changed back, bit for bit."""
        self._held.pop(component, None)
        saved = self.saved.pop(component, None)
        if not saved:
            return
        import torch

        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def _peft_change(layer: Any, name: str, scale: float) -> Callable[[Any], Any]:
    def change(weight: Any) -> Any:
        if layer.lora_A[name].weight.device != weight.device:
            layer._move_adapter_to_device_of_base_layer(name)
        layer.set_scale(name, scale)
        return weight + layer.get_delta_weight(name).float()

    return change


def _update_change(update: LayerUpdate, scale: float) -> Callable[[Any], Any]:
    return lambda weight: update.apply(weight, scale)


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
