"""The LoRA adapters living in a pipeline: loaded through diffusers' peft loaders, kept in an LRU, removed cleanly.

Each LoRA file becomes one peft adapter in the UNet and/or text encoders, named from the file's identity (path,
size, mtime, ...), so a changed file loads again under a new name. Adapters stay after their job, bounded by count
and parameter memory, which makes a repeat cost no disk read. A LoRA that does not fit the model is refused before
anything is injected (:mod:`.files`); should a loader still fail, the half-loaded adapter is removed and the
pipeline's offload hooks are restored, so the next job is unaffected.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from core.errors import first_line
from worker.adapters.lora.files import LORA_TARGETS, PreparedLora, prepare_lora, read_lora_file
from worker.adapters.lora.layers import LayerIndex, offload_mode, restore_offload
from worker.adapters.lora.merged_files import MergedLora, is_merged_only, prepare_merged
from worker.adapters.lora.sources import LoraError, LoraSettings, LoraSource

log = logging.getLogger(__name__)


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
    kind: str = "LoRA"  # what the file is: "LoRA", or for merged files "LoHa", "LoKr", "LoRA+DoRA", ...
    merged: MergedLora | None = None  # layers merged into the weights per job, instead of peft layers


def adapter_name(source: LoraSource) -> str:
    """A peft-safe identifier (no dots) that changes whenever the file does."""
    return "lora_" + hashlib.sha256(source.identity.encode()).hexdigest()[:16]


class AdapterCache:
    """Owns which adapters are in the pipeline, least recently used first.

    ``layers`` is the manager's index of wrapped layers (forgotten whenever adapters come or go);
    ``after_removal`` re-asserts the current job's choice (peft may activate another adapter when one is deleted).
    """

    def __init__(
        self, pipe: Any, settings: LoraSettings, layers: LayerIndex, after_removal: Callable[[], None]
    ) -> None:
        self.pipe, self.settings, self.layers, self.after_removal = pipe, settings, layers, after_removal
        self.adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.wrapped: set[str] = set()  # components peft has put wrappers into (they stay, detached or not)
        self.hits = self.loads = self.evictions = 0

    def get(self, source: LoraSource) -> LoadedAdapter | None:
        return self.adapters.get(adapter_name(source))

    @property
    def param_bytes(self) -> int:
        return sum(adapter.param_bytes for adapter in self.adapters.values())

    def ensure_loaded(self, source: LoraSource, keep: set[str]) -> tuple[LoadedAdapter, bool]:
        """The adapter of ``source``, loading it (and evicting others, never one in ``keep``); and whether cached."""
        name = adapter_name(source)
        cached = self.adapters.get(name)
        if cached is not None:
            self.adapters.move_to_end(name)
            self.hits += 1
            return cached, True

        started = time.perf_counter()
        lora_file = read_lora_file(source.path, source.label)
        read_done = time.perf_counter()
        merged: MergedLora | None = None
        if is_merged_only(list(lora_file.tensors)):
            merged = prepare_merged(self.pipe, lora_file, source.label)
            lora_format, components, layers, incoming = (
                merged.format,
                merged.components,
                merged.layer_counts,
                merged.nbytes,
            )
        else:
            prepared = prepare_lora(self.pipe, lora_file, source.label)
            lora_format, components, layers = prepared.format, prepared.components, dict(prepared.layers)
            incoming = sum(tensor.numel() * tensor.element_size() for tensor in prepared.state_dict.values())
        prepare_done = time.perf_counter()
        self._make_room(incoming, keep)
        if merged is None:
            self._inject(name, prepared, source.label)
        finished = time.perf_counter()
        adapter = LoadedAdapter(
            adapter_name=name,
            source=source,
            sha256=lora_file.sha256,
            format=lora_format,
            components=components,
            layers=layers,
            param_bytes=incoming if merged is not None else self._adapter_bytes(name),
            load_s=finished - started,
            phases={
                "read_s": read_done - started,
                "prepare_s": prepare_done - read_done,
                "inject_s": finished - prepare_done,
            },
            kind=merged.kind if merged is not None else "LoRA",
            merged=merged,
        )
        self.adapters[name] = adapter
        self.loads += 1
        log.info(
            "loaded LoRA %s (%s %s, %s, %.1f MiB) in %.2f s",
            source.label,
            adapter.format,
            adapter.kind,
            "+".join(adapter.components),
            adapter.param_bytes / 2**20,
            adapter.load_s,
        )
        return adapter, False

    def evict_to_bounds(self, keep: set[str]) -> None:
        """After a job: bounds hold again, except for what the job itself needs (a job may exceed them)."""
        max_count, max_bytes = self.settings.cache_size, self.settings.cache_mb * 2**20
        for name in list(self.adapters):
            if len(self.adapters) <= max_count and self.param_bytes <= max_bytes:
                return
            if name not in keep:
                self.evict(name)

    def evict(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        if adapter.merged is None:
            self._remove_adapter(name)
        else:
            self.after_removal()  # nothing in the model to delete; its merged weights (if any) are restored
        self.evictions += 1
        log.info("unloaded LoRA %s (least recently used)", adapter.source.label)

    def _make_room(self, incoming_bytes: int, keep: set[str]) -> None:
        """Evict least recently used adapters (never one this job uses) until the new one fits the bounds."""
        max_count, max_bytes = self.settings.cache_size, self.settings.cache_mb * 2**20
        for name in list(self.adapters):
            if len(self.adapters) + 1 <= max_count and self.param_bytes + incoming_bytes <= max_bytes:
                return
            if name not in keep:
                self.evict(name)

    def _inject(self, name: str, prepared: PreparedLora, label: str) -> None:
        pipe = self.pipe
        offload = offload_mode(pipe)
        self.layers.attach_all()  # peft must see every wrapper it made, or it wraps a base layer twice
        self.layers.forget()  # injection wraps more layers
        common = {"adapter_name": name, "_pipeline": pipe, "low_cpu_mem_usage": True}
        self.wrapped.update(prepared.components)
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
            self._remove_adapter(name)
            if offload is not None and offload_mode(pipe) is None:
                restore_offload(pipe, offload)
            reason = first_line(error, limit=300)
            raise LoraError(f"LoRA {label!r} could not be loaded: {type(error).__name__}: {reason}") from None

    def _remove_adapter(self, name: str) -> None:
        """Delete the adapter from every component that has it (also after a half-finished load)."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        self.layers.attach_all()
        self.layers.forget()
        for component in LORA_TARGETS:
            model = getattr(self.pipe, component, None)
            if model is None or name not in (getattr(model, "peft_config", None) or {}):
                continue
            with warnings.catch_warnings():
                # peft announces which adapter it activates instead; after_removal decides that.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                if component == "unet":
                    model.delete_adapters([name])
                else:
                    delete_adapter_layers(model, name)
        self.after_removal()

    def _adapter_bytes(self, name: str) -> int:
        from peft.tuners.tuners_utils import BaseTunerLayer

        total = 0
        for component in LORA_TARGETS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    for layer_dict in (module.lora_A, module.lora_B):
                        if name in layer_dict:
                            total += sum(p.numel() * p.element_size() for p in layer_dict[name].parameters())
        return total


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
