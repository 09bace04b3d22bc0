"""peft's LoRA layers in a pipeline: finding them, swapping their wrappers in and out, activating adapters fast.

A peft wrapper costs Python time on every call even with no adapter active, so a layer with none of the job's
adapters gets its original module (the wrapper's base layer) put back in its parent; :class:`WrappedLayer` does
that swap. The fast activation writes what peft's ``set_adapter``/``set_scale``/``enable_adapters`` leave behind,
without their per-adapter ``requires_grad`` bookkeeping and whole-model walks; it checks itself against peft's
public attributes and falls back to the public API when peft changes.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class WrappedLayer:
    """A peft LoRA wrapper and where it sits; detached, its parent holds the original module (the base layer)."""

    __slots__ = ("attached", "attribute", "parent", "wrapper")

    def __init__(self, parent: Any, attribute: str, wrapper: Any) -> None:
        self.parent, self.attribute, self.wrapper = parent, attribute, wrapper
        self.attached = True

    def attach(self, attached: bool) -> None:
        if attached == self.attached:
            return
        base = self.wrapper.get_base_layer()
        if attached:
            # Detached adapter weights do not follow .to() or offload moves of the model: catch up first.
            for adapter_name in self.wrapper.lora_A:
                if self.wrapper.lora_A[adapter_name].weight.device != base.weight.device:
                    self.wrapper._move_adapter_to_device_of_base_layer(adapter_name)
        setattr(self.parent, self.attribute, self.wrapper if attached else base)
        self.attached = attached


class LayerIndex:
    """Each component's peft LoRA layers, found once per change of the loaded adapters (while all are attached)."""

    def __init__(self) -> None:
        self._records: dict[str, list[WrappedLayer]] = {}

    def of(self, component: str, model: Any) -> list[WrappedLayer]:
        records = self._records.get(component)
        if records is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            records = []
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    parent_name, _, attribute = name.rpartition(".")
                    records.append(WrappedLayer(model.get_submodule(parent_name), attribute, module))
            self._records[component] = records
        return records

    def attach_all(self) -> None:
        """Put every peft wrapper back in its place (before peft or diffusers walk the model)."""
        for records in self._records.values():
            for record in records:
                record.attach(True)

    def forget(self) -> None:
        """After adapters were added or removed: the layers are found again on next use."""
        self._records.clear()


class Activation:
    """Runs exactly the given adapters in a component's LoRA layers (the fast way while it matches peft)."""

    def __init__(self) -> None:
        self.fast = True

    def apply(
        self, component: str, model: Any, records: list[WrappedLayer], names: list[str], scales: list[float]
    ) -> None:
        if self.fast:
            for record in records:
                layer = record.wrapper
                for name, scale in zip(names, scales, strict=True):
                    layer.set_scale(name, scale)  # ignores adapters this layer does not have
                layer._active_adapter = list(names)
                layer._disable_adapters = not names
            probe = records[0].wrapper if records else None
            if probe is None or (probe.active_adapters == names and probe.disable_adapters == (not names)):
                # A layer with none of the job's adapters gets its original module back (bench/lora_switch.py
                # --diagnose-idle measures what an idle wrapper costs).
                for record in records:
                    record.attach(any(name in record.wrapper.lora_A for name in names))
                return
            log.warning("peft's adapter attributes changed; switching LoRAs through the slower public API")
            self.fast = False
        for record in records:
            record.attach(True)  # the public API walks the model: it must see every wrapper
        _apply_public(component, model, names, scales)


def _apply_public(component: str, model: Any, names: list[str], scales: list[float]) -> None:
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    if component == "unet":
        if names:
            model.set_adapters(names, scales)
            model.enable_lora()
        else:
            model.disable_lora()
    elif names:
        set_adapters_for_text_encoder(names, model, scales)
        enable_lora_for_text_encoder(model)
    else:
        disable_lora_for_text_encoder(model)


def offload_mode(pipe: Any) -> str | None:
    """'model' or 'sequential' when accelerate's CPU-offload hooks are installed (as diffusers detects them)."""
    from accelerate.hooks import AlignDevicesHook, CpuOffload

    for component in pipe.components.values():
        hook = getattr(component, "_hf_hook", None)
        if hook is None:
            continue
        if isinstance(hook, CpuOffload):
            return "model"
        if isinstance(hook, AlignDevicesHook) or (
            hasattr(hook, "hooks") and hook.hooks and isinstance(hook.hooks[0], AlignDevicesHook)
        ):
            return "sequential"
    return None


def restore_offload(pipe: Any, mode: str) -> None:
    """diffusers removes the offload hooks while loading and re-adds them only on success; re-add them on failure."""
    if mode == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_sequential_cpu_offload()
