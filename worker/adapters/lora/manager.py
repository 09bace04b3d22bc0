"""LoRAs per job: resolve the names, make sure their adapters are loaded, activate exactly those asked for.

Per job, each adapted layer runs exactly the requested adapters with their scales, and a layer with none of them
gets its original module back in place of the peft wrapper: a job without LoRAs runs the very modules of a fresh
worker, bit-identical and at the same speed. In the UNet (``LORA_FUSE=1``, the default) the job's adapters are
merged into the weights instead, as A1111 applies LoRAs (:mod:`.fusion`); the text encoders (run once per job) keep
peft's layers (:mod:`.layers`). LoHa, LoKr, Tucker LoCon and DoRA files are merged in every component
(:mod:`.merged_files`). A LoRA with scale 0 contributes nothing, so it is resolved (a typo is still an error) but
never loaded.

State, each piece owned by one object: which adapters are loaded (:class:`.cache.AdapterCache`), where the wrapped
layers are (:class:`.layers.LayerIndex`), how they are activated (:class:`.layers.Activation`), what the merged
weights hold and their saved originals (:class:`.fusion.WeightMerges`); this manager only decides, per job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.settings import Settings
from worker.adapters.lora.cache import AdapterCache, LoadedAdapter, adapter_name
from worker.adapters.lora.files import LORA_TARGETS
from worker.adapters.lora.fusion import Step, WeightMerges
from worker.adapters.lora.layers import Activation, LayerIndex
from worker.adapters.lora.sources import LoraError, LoraResolver, LoraSettings, LoraSource


@dataclass(frozen=True)
class AppliedLora:
    """What one requested LoRA did in a job: the metadata's entry (stable part) and its cache facts (volatile)."""

    name: str
    scale: float
    source: LoraSource
    adapter: LoadedAdapter | None  # None: scale 0 and never loaded
    cache_hit: bool

    @property
    def active(self) -> bool:
        return self.scale != 0.0

    def stable(self) -> dict[str, Any]:
        """What follows from the request and the file: the same on every worker and run."""
        entry: dict[str, Any] = {"name": self.name, "scale": self.scale, "active": self.active}
        if self.source.origin in ("hf", "url"):
            entry[self.source.origin] = self.source.label
        else:
            entry["path"] = str(self.source.path)
        if not self.active:
            entry["note"] = "scale 0 contributes nothing; not applied"
        if self.adapter is not None:
            entry.update(
                sha256=self.adapter.sha256[:12],
                format=self.adapter.format,
                type=self.adapter.kind,
                components=self.adapter.components,
            )
        return entry

    def volatile(self) -> dict[str, Any]:
        """What depends on this worker's history: whether the adapter was cached, how long loading took."""
        entry: dict[str, Any] = {"name": self.name}
        if self.adapter is not None and self.active:
            entry.update(cache_hit=self.cache_hit, load_s=0.0 if self.cache_hit else round(self.adapter.load_s, 4))
        return entry


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
        self.layers = LayerIndex()
        self.activation = Activation()
        self.fusion = WeightMerges(pipe)
        self.cache = AdapterCache(pipe, self.settings, self.layers, after_removal=self._reapply)
        self._current_weights: dict[str, float] = {}  # adapter name -> scale, as the current job asked
        self._text_encoder_state: tuple = ()  # what the text encoders run now: ((component, ((name, w), ...)), ...)

    # -- public API -----------------------------------------------------------------------------------------------

    def activate(self, loras: Sequence[Any]) -> list[AppliedLora]:
        """Make exactly ``loras`` (objects with ``name``, ``scale`` and maybe ``sha256``) active; say what was applied.

        Raises :class:`LoraError` (a :class:`core.errors.LoraFailed`) for anything the caller must fix;
        the pipeline is then left with no LoRA active. ``activate([])`` runs no LoRA (adapters stay
        loaded for later jobs).
        """
        sources = [
            self.resolver.resolve(
                lora.name,
                field=f"loras[{index}].name",
                sha256=getattr(lora, "sha256", None),
                sha256_field=f"loras[{index}].sha256",
            )
            for index, lora in enumerate(loras)
        ]
        # A URL's query may carry a download token: reports (errors, metadata, PNG parameters) show it without.
        names = [
            source.label if source.origin == "url" else lora.name for lora, source in zip(loras, sources, strict=True)
        ]
        seen: dict[str, int] = {}
        for index, source in enumerate(sources):
            first = seen.setdefault(str(source.path), index)
            if first != index:
                raise LoraError(
                    f"loras[{index}].name: {names[index]!r} is the same file as loras[{first}] "
                    f"({names[first]!r}); list it once with the combined scale"
                )

        keep = {adapter_name(source) for lora, source in zip(loras, sources, strict=True) if lora.scale != 0.0}
        applied: list[AppliedLora] = []
        try:
            for lora, source, name in zip(loras, sources, names, strict=True):
                if lora.scale == 0.0:
                    applied.append(AppliedLora(name, lora.scale, source, self.cache.get(source), False))
                    continue
                adapter, hit = self.cache.ensure_loaded(source, keep)
                applied.append(AppliedLora(name, lora.scale, source, adapter, hit))
        except BaseException:
            self._set_active({})  # a failed job leaves no LoRA active
            raise
        self._set_active({a.adapter.adapter_name: a.scale for a in applied if a.active and a.adapter is not None})
        self.cache.evict_to_bounds(keep)
        return applied

    def clear(self) -> None:
        """Remove every adapter from the pipeline."""
        self._set_active({})
        for name in list(self.cache.adapters):
            self.cache.evict(name)

    def loaded(self) -> list[dict[str, Any]]:
        """The adapters in the pipeline, least recently used first (for logs and health checks)."""
        return [
            {"name": adapter.source.label, "adapter": adapter.adapter_name, "mb": round(adapter.param_bytes / 2**20, 2)}
            for adapter in self.cache.adapters.values()
        ]

    @property
    def loaded_bytes(self) -> int:
        return self.cache.param_bytes

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def loads(self) -> int:
        return self.cache.loads

    @property
    def evictions(self) -> int:
        return self.cache.evictions

    # -- activation -----------------------------------------------------------------------------------------------

    def _set_active(self, weights: dict[str, float]) -> None:
        self._current_weights = dict(weights)
        self._reapply()

    def _reapply(self) -> None:
        """Per component: run exactly the current adapters it has, or disable its LoRA layers entirely."""
        text_encoder_state = []
        for component in LORA_TARGETS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            present = getattr(model, "peft_config", None) or {}
            steps: list[Step] = []  # the job's adapters this component has, in request order
            for name, scale in self._current_weights.items():
                adapter = self.cache.adapters.get(name)
                if adapter is not None and adapter.merged is not None:
                    if component in adapter.merged.layers:
                        steps.append((name, float(scale), adapter.merged.layers[component]))
                elif name in present:
                    steps.append((name, float(scale), None))
            self._activate_component(component, model, steps)
            if component != "unet":
                text_encoder_state.append((component, tuple((name, scale) for name, scale, _ in steps)))
        state = tuple(entry for entry in text_encoder_state if entry[1])
        if state != self._text_encoder_state:
            self._text_encoder_state = state
            if self.on_text_encoder_change is not None:
                self.on_text_encoder_change()  # cached prompt embeddings were made with other text-encoder weights

    def _activate_component(self, component: str, model: Any, steps: list[Step]) -> None:
        """Merge what is merged (see :mod:`.fusion`), run the rest in peft's layers."""
        peft_names = [name for name, _, layers in steps if layers is None]
        peft_scales = [scale for _, scale, layers in steps if layers is None]
        records = self.layers.of(component, model) if component in self.cache.wrapped else []
        fuse = component == "unet" and self.settings.fuse_unet and self.fusion.fusable(records, peft_names)
        merged_steps = [step for step in steps if fuse or step[2] is not None]
        fused_records = records if fuse and records else None
        if not self.fusion.holds(component, fused_records, merged_steps):
            # The previous job's merged weights out first, whatever this job does.
            self.fusion.restore(component)
            self.fusion.merge(component, model, fused_records, merged_steps)
        if records and not fuse:
            self.activation.apply(component, model, records, peft_names, peft_scales)
