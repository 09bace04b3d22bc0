"""LoRAs per job: load through diffusers' peft loaders, keep recently used ones, activate exactly those asked for.

Each LoRA file becomes one peft adapter in the UNet and/or text encoders, named from the file's
identity (path, size, mtime, ...), so a changed file loads again under a new name. Adapters stay
in the model after their job (an LRU bounded by count and parameter memory), which makes a repeat
cost no disk read. Per job, each adapted layer runs exactly the requested adapters with their
scales, and a layer with none of them gets its original module back in place of the peft wrapper:
a job without LoRAs runs the very modules of a fresh worker, bit-identical and at the same speed.

In the UNet (``LORA_FUSE=1``, the default) the job's adapters are merged into the weights instead, as
A1111 applies LoRAs, and the original weights are copied back after the job: a LoRA then adds no work
per denoising step (merging costs once per change of LoRA set) and a compiled UNet keeps its compiled
code. The text encoders (run once per job) keep peft's layers. DoRA or bias LoRAs, CPU offload and
``LORA_FUSE=0`` use peft's layers in the UNet too.

A LoRA with scale 0 contributes nothing, so it is resolved (a typo is still an error) but never
loaded. A LoRA that does not fit the model is refused before anything is injected
(:mod:`worker.lora_files`); should a loader still fail, the half-loaded adapter is removed and
the pipeline's offload hooks are restored, so the next job is unaffected.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import first_line
from core.settings import Settings
from worker.lora_files import LORA_TARGETS, PreparedLora, prepare_lora, read_lora_file
from worker.lora_sources import LoraError, LoraResolver, LoraSettings, LoraSource

log = logging.getLogger(__name__)

__all__ = ["LoraError", "LoraManager", "LoraSettings"]


@dataclass
class LoadedAdapter:
    """An adapter living in the pipeline (active or not)."""

    adapter_name: str  # peft's name: a safe identifier derived from the file's identity
    source: LoraSource
    sha256: str
    format: str
    components: list[str]
    layers: dict[str, int]
    param_bytes: int
    load_s: float
    phases: dict[str, float]  # read (disk + sha256), prepare (convert + check), inject (peft)


class LoraManager:
    """Owns every LoRA adapter in one pipeline; :meth:`activate` is called once per job."""

    def __init__(
        self,
        pipe: Any,
        on_text_encoder_change: Callable[[], None] | None = None,
        settings: LoraSettings | None = None,
    ) -> None:
        self.pipe = pipe
        # The engine passes its settings; a manager made on its own gets the defaults.
        self.settings = settings or LoraSettings.from_settings(Settings())
        self.resolver = LoraResolver(self.settings)
        self.on_text_encoder_change = on_text_encoder_change
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # adapter name -> adapter, oldest first
        self._current_weights: dict[str, float] = {}  # adapter name -> scale, as the current job asked
        self._layer_cache: dict[str, list[_WrappedLayer]] = {}  # component -> its peft LoRA layers
        self._fast_activation = True
        self._wrapped: set[str] = set()  # components peft has put wrappers into (they stay, detached or not)
        self._text_encoder_state: tuple = ()  # what the text encoders run now: ((component, ((name, w), ...)), ...)
        self._fused: list[tuple[Any, Any]] = []  # (UNet weight, its exact copy from before the job's LoRAs)
        self._fused_for: tuple = ()  # (layer records, names, scales) the merged weights hold now
        self.hits = 0
        self.loads = 0
        self.evictions = 0

    # -- public API -----------------------------------------------------------------------------------------------

    def activate(self, loras: Sequence[Any]) -> list[dict[str, Any]]:
        """Make exactly ``loras`` (objects with ``name`` and ``scale``) active; describe what was applied.

        Raises :class:`LoraError` (a :class:`core.errors.LoraFailed`) for anything the caller must fix;
        the pipeline is then left with no LoRA active. ``activate([])`` runs no LoRA (adapters stay
        loaded for later jobs).
        """
        sources = [self.resolver.resolve(lora.name, field=f"loras[{index}].name") for index, lora in enumerate(loras)]
        seen: dict[str, int] = {}
        for index, source in enumerate(sources):
            first = seen.setdefault(str(source.path), index)
            if first != index:
                raise LoraError(
                    f"loras[{index}].name: {loras[index].name!r} is the same file as loras[{first}] "
                    f"({loras[first].name!r}); list it once with the combined scale"
                )

        wanted = [(lora, source) for lora, source in zip(loras, sources, strict=True) if lora.scale != 0.0]
        keep = {_adapter_name(source) for _, source in wanted}
        applied: list[tuple[Any, LoraSource, LoadedAdapter | None, bool]] = []
        try:
            for lora, source in zip(loras, sources, strict=True):
                if lora.scale == 0.0:
                    applied.append((lora, source, self._loaded.get(_adapter_name(source)), False))
                    continue
                adapter, hit = self._ensure_loaded(source, keep)
                applied.append((lora, source, adapter, hit))
        except BaseException:
            self._set_active({})  # a failed job leaves no LoRA active
            raise
        self._set_active({adapter.adapter_name: lora.scale for lora, _, adapter, _ in applied if lora.scale != 0.0})
        self._evict_to_bounds(keep)
        return [self._describe(lora, source, adapter, hit) for lora, source, adapter, hit in applied]

    def clear(self) -> None:
        """Remove every adapter from the pipeline."""
        self._set_active({})
        for adapter_name in list(self._loaded):
            self._evict(adapter_name)

    def loaded(self) -> list[dict[str, Any]]:
        """The adapters in the pipeline, least recently used first (for logs and health checks)."""
        return [
            {"name": adapter.source.label, "adapter": adapter.adapter_name, "mb": round(adapter.param_bytes / 2**20, 2)}
            for adapter in self._loaded.values()
        ]

    @property
    def loaded_bytes(self) -> int:
        return sum(adapter.param_bytes for adapter in self._loaded.values())

    # -- loading and the cache ------------------------------------------------------------------------------------

    def _ensure_loaded(self, source: LoraSource, keep: set[str]) -> tuple[LoadedAdapter, bool]:
        adapter_name = _adapter_name(source)
        cached = self._loaded.get(adapter_name)
        if cached is not None:
            self._loaded.move_to_end(adapter_name)
            self.hits += 1
            return cached, True

        started = time.perf_counter()
        lora_file = read_lora_file(source.path, source.label)
        read_done = time.perf_counter()
        prepared = prepare_lora(self.pipe, lora_file, source.label)
        prepare_done = time.perf_counter()
        incoming = sum(tensor.numel() * tensor.element_size() for tensor in prepared.state_dict.values())
        self._make_room(incoming, keep)
        self._inject(adapter_name, prepared, source.label)
        finished = time.perf_counter()
        adapter = LoadedAdapter(
            adapter_name=adapter_name,
            source=source,
            sha256=lora_file.sha256,
            format=prepared.format,
            components=prepared.components,
            layers=dict(prepared.layers),
            param_bytes=self._adapter_bytes(adapter_name),
            load_s=finished - started,
            phases={
                "read_s": read_done - started,
                "prepare_s": prepare_done - read_done,
                "inject_s": finished - prepare_done,
            },
        )
        self._loaded[adapter_name] = adapter
        self.loads += 1
        log.info(
            "loaded LoRA %s (%s, %s, %.1f MiB) in %.2f s",
            source.label,
            prepared.format,
            "+".join(adapter.components),
            adapter.param_bytes / 2**20,
            adapter.load_s,
        )
        return adapter, False

    def _inject(self, adapter_name: str, prepared: PreparedLora, label: str) -> None:
        pipe = self.pipe
        offload = _offload_mode(pipe)
        self._attach_all()  # peft must see every wrapper it made, or it wraps a base layer twice
        self._layer_cache.clear()  # injection wraps more layers
        common = {"adapter_name": adapter_name, "_pipeline": pipe, "low_cpu_mem_usage": True}
        self._wrapped.update(prepared.components)
        try:
            with _quiet_adapter_load_report():
                if "unet" in prepared.components:
                    pipe.load_lora_into_unet(
                        prepared.state_dict,
                        network_alphas=prepared.network_alphas,
                        unet=pipe.unet,
                        metadata=prepared.metadata.get("unet"),
                        **common,
                    )
                for component in ("text_encoder", "text_encoder_2"):
                    if component in prepared.components:
                        pipe.load_lora_into_text_encoder(
                            prepared.state_dict,
                            network_alphas=prepared.network_alphas,
                            text_encoder=getattr(pipe, component),
                            prefix=component,
                            lora_scale=1.0,
                            metadata=prepared.metadata.get(component),
                            **common,
                        )
        except Exception as error:
            # prepare_lora checked names and shapes, so this is unexpected; leave the model as it was.
            log.exception("loading LoRA %s failed", label)
            self._remove_adapter(adapter_name)
            if offload is not None and _offload_mode(pipe) is None:
                _restore_offload(pipe, offload)
            reason = first_line(error, limit=300)
            raise LoraError(f"LoRA {label!r} could not be loaded: {type(error).__name__}: {reason}") from None

    def _make_room(self, incoming_bytes: int, keep: set[str]) -> None:
        """Evict least recently used adapters (never one this job uses) until the new one fits the bounds."""
        max_count, max_bytes = self.settings.cache_size, self.settings.cache_mb * 2**20
        for adapter_name in list(self._loaded):
            if len(self._loaded) + 1 <= max_count and self.loaded_bytes + incoming_bytes <= max_bytes:
                return
            if adapter_name not in keep:
                self._evict(adapter_name)

    def _evict_to_bounds(self, keep: set[str]) -> None:
        """After a job: bounds hold again, except for what the job itself needs (a job may exceed them)."""
        max_count, max_bytes = self.settings.cache_size, self.settings.cache_mb * 2**20
        for adapter_name in list(self._loaded):
            if len(self._loaded) <= max_count and self.loaded_bytes <= max_bytes:
                return
            if adapter_name not in keep:
                self._evict(adapter_name)

    def _evict(self, adapter_name: str) -> None:
        adapter = self._loaded.pop(adapter_name)
        self._remove_adapter(adapter_name)
        self.evictions += 1
        log.info("unloaded LoRA %s (least recently used)", adapter.source.label)

    def _remove_adapter(self, adapter_name: str) -> None:
        """Delete the adapter from every component that has it (also after a half-finished load)."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        self._attach_all()
        self._layer_cache.clear()
        for component in LORA_TARGETS:
            model = getattr(self.pipe, component, None)
            if model is None or adapter_name not in (getattr(model, "peft_config", None) or {}):
                continue
            with warnings.catch_warnings():
                # peft announces which adapter it activates instead; the line below decides that.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                if component == "unet":
                    model.delete_adapters([adapter_name])
                else:
                    delete_adapter_layers(model, adapter_name)
        # peft may make another adapter active when the active one is deleted: reassert the current choice.
        self._apply_active(self._current_weights)

    def _adapter_bytes(self, adapter_name: str) -> int:
        from peft.tuners.tuners_utils import BaseTunerLayer

        total = 0
        for component in LORA_TARGETS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    for layer_dict in (module.lora_A, module.lora_B):
                        if adapter_name in layer_dict:
                            total += sum(p.numel() * p.element_size() for p in layer_dict[adapter_name].parameters())
        return total

    # -- activation -----------------------------------------------------------------------------------------------

    def _set_active(self, weights: dict[str, float]) -> None:
        self._current_weights = dict(weights)
        self._apply_active(self._current_weights)

    def _apply_active(self, weights: dict[str, float]) -> None:
        """Per component: run exactly the adapters in ``weights`` it has, or disable its LoRA layers entirely."""
        text_encoder_state = []
        for component in LORA_TARGETS:
            model = getattr(self.pipe, component, None)
            present = getattr(model, "peft_config", None) or {}
            if model is None or component not in self._wrapped:
                continue  # no peft wrapper was ever put into it
            names = [name for name in weights if name in present]
            scales = [float(weights[name]) for name in names]
            self._activate_component(component, model, names, scales)
            if component != "unet":
                text_encoder_state.append((component, tuple(zip(names, scales, strict=True))))
        state = tuple(entry for entry in text_encoder_state if entry[1])
        if state != self._text_encoder_state:
            self._text_encoder_state = state
            if self.on_text_encoder_change is not None:
                self.on_text_encoder_change()  # cached prompt embeddings were made with other text-encoder weights

    def _activate_component(self, component: str, model: Any, names: list[str], scales: list[float]) -> None:
        records = self._tuner_layers(component, model)
        if component == "unet":
            merged_now = self._fused_for and self._fused_for[0] is records and self._fused_for[1:] == (names, scales)
            if merged_now and self.settings.fuse_unet:
                return  # the same LoRAs merged into the same layers: the weights already hold this job's values
            self._unfuse()  # the previous job's merged weights out first, whatever this job does
            if self._can_fuse(records, names):
                self._fuse(records, names, scales)
                self._fused_for = (records, list(names), list(scales))
                return
        if self._fast_activation:
            # What peft's set_adapter/set_scale/enable_adapters leave behind, without their per-adapter
            # requires_grad bookkeeping and whole-model walks, which dominate a switch with ~1000 LoRA layers in a
            # full SDXL (bench/lora_switch.py times the cached switch). Inference never needs gradients.
            for record in records:
                layer = record.wrapper
                for name, scale in zip(names, scales, strict=True):
                    layer.set_scale(name, scale)  # ignores adapters this layer does not have
                layer._active_adapter = list(names)
                layer._disable_adapters = not names
            probe = records[0].wrapper if records else None
            if probe is None or (probe.active_adapters == names and probe.disable_adapters == (not names)):
                # A layer with none of the job's adapters gets its original module back: even disabled, a peft
                # wrapper costs Python time per call (bench/lora_switch.py --diagnose-idle measures it).
                for record in records:
                    record.attach(any(name in record.wrapper.lora_A for name in names))
                return
            log.warning("peft's adapter attributes changed; switching LoRAs through the slower public API")
            self._fast_activation = False
        for record in records:
            record.attach(True)  # the public API walks the model: it must see every wrapper
        self._activate_component_public(component, model, names, scales)

    # -- fused UNet LoRAs ------------------------------------------------------------------------------------------

    def _can_fuse(self, records: list[_WrappedLayer], names: list[str]) -> bool:
        """Merging needs weights of its own (no offload hooks, nothing on meta) and plain LoRA layers."""
        if not self.settings.fuse_unet or _offload_mode(self.pipe) is not None:
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

    def _fuse(self, records: list[_WrappedLayer], names: list[str], scales: list[float]) -> None:
        """Merge the job's adapters into the UNet's own weights, keeping an exact copy of each weight changed.

        The UNet then runs its original modules (no peft wrapper: no cost per step, and the module structure a
        compiled UNet was traced with, so compiled code keeps serving LoRA jobs without recompiling); the weights
        change in place, which compiled code and CUDA graphs read at run time. :meth:`_unfuse` copies the saved
        weights back, bit for bit, rather than subtracting the delta (which would not round back exactly).
        """
        import torch

        started = time.perf_counter()
        touched = []
        for record in records:
            record.attach(False)
            lora_a = record.wrapper.lora_A
            present = [(name, scale) for name, scale in zip(names, scales, strict=True) if name in lora_a]
            if present:
                touched.append((record.wrapper, present))
        if not touched:
            return
        weights = [layer.get_base_layer().weight for layer, _ in touched]
        backup_device = self._backup_device(weights)
        with torch.no_grad():
            for (layer, present), weight in zip(touched, weights, strict=True):
                delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                for name, scale in present:
                    if layer.lora_A[name].weight.device != weight.device:
                        layer._move_adapter_to_device_of_base_layer(name)
                    layer.set_scale(name, scale)
                    delta += layer.get_delta_weight(name).float()
                self._fused.append((weight, weight.detach().to(backup_device, copy=True)))
                weight.copy_((weight.float() + delta).to(weight.dtype))
        log.debug("merged %d LoRA layers into the UNet in %.3f s", len(touched), time.perf_counter() - started)

    def _unfuse(self) -> None:
        self._fused_for = ()
        if not self._fused:
            return
        import torch

        with torch.no_grad():
            for weight, original in self._fused:
                weight.copy_(original)
        self._fused.clear()

    @staticmethod
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

    @staticmethod
    def _activate_component_public(component: str, model: Any, names: list[str], scales: list[float]) -> None:
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

    def _tuner_layers(self, component: str, model: Any) -> list[_WrappedLayer]:
        """The component's peft LoRA layers, found once per change of the loaded set (while all are attached)."""
        records = self._layer_cache.get(component)
        if records is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            records = []
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    parent_name, _, attribute = name.rpartition(".")
                    records.append(_WrappedLayer(model.get_submodule(parent_name), attribute, module))
            self._layer_cache[component] = records
        return records

    def _attach_all(self) -> None:
        """Put every peft wrapper back in its place (before peft or diffusers walk the model)."""
        for records in self._layer_cache.values():
            for record in records:
                record.attach(True)

    # -- reporting ------------------------------------------------------------------------------------------------

    def _describe(self, lora: Any, source: LoraSource, adapter: LoadedAdapter | None, hit: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": lora.name, "scale": lora.scale, "active": lora.scale != 0.0}
        if source.origin == "hf":
            entry["hf"] = source.label
        else:
            entry["path"] = str(source.path)
        if lora.scale == 0.0:
            entry["note"] = "scale 0 contributes nothing; not applied"
        if adapter is not None:
            entry.update(sha256=adapter.sha256[:12], format=adapter.format, components=adapter.components)
            if lora.scale != 0.0:
                entry.update(cache_hit=hit, load_s=0.0 if hit else round(adapter.load_s, 4))
        return entry


class _WrappedLayer:
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


def _adapter_name(source: LoraSource) -> str:
    """A peft-safe identifier (no dots) that changes whenever the file does."""
    return "lora_" + hashlib.sha256(source.identity.encode()).hexdigest()[:16]


# -- offload hooks ----------------------------------------------------------------------------------------------------


def _offload_mode(pipe: Any) -> str | None:
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


def _restore_offload(pipe: Any, mode: str) -> None:
    """diffusers removes the offload hooks while loading and re-adds them only on success; re-add them on failure."""
    if mode == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_sequential_cpu_offload()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # transformers reports every base weight as "MISSING" when an adapter alone is loaded into a text
        # encoder: a false alarm (the weights are untouched), and a long one.
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_adapter_load_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.integrations.peft")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            # peft warns on every second adapter in a model; several adapters are this module's design.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        logger.removeFilter(drop)
