"""Loaded ControlNets, least recently used first, bounded by ``CONTROLNET_CACHE_SIZE``.

A ControlNet is loaded with ``ControlNetModel.from_pretrained`` from its converted folder (never a single file),
in the engine's dtype, and handed to the engine's placement (on the GPU, or under its offload hooks). An entry is
keyed by the folder and its manifest hash, so a folder converted again loads again. A load that fails leaves
nothing behind: the half-made module is dropped and the error names the request field.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import ControlNetFailed, first_line
from worker.adapters.controlnet.folders import ControlNetFolder

log = logging.getLogger(__name__)


@dataclass
class LoadedControlNet:
    folder: ControlNetFolder
    model: Any  # diffusers ControlNetModel
    param_bytes: int
    load_s: float


class ControlNetCache:
    """Owns the loaded ControlNets; ``place`` puts a freshly loaded one where the pipeline runs."""

    def __init__(self, size: int, dtype: Any, place: Callable[[Any], None]) -> None:
        self.size, self.dtype, self.place = size, dtype, place
        self.nets: OrderedDict[tuple[str, str], LoadedControlNet] = OrderedDict()
        self.hits = self.loads = self.evictions = 0

    def get(self, folder: ControlNetFolder, field: str) -> tuple[LoadedControlNet, bool]:
        """The loaded ControlNet of ``folder`` and whether it was cached; loads it otherwise."""
        key = folder.identity
        if key in self.nets:
            self.nets.move_to_end(key)
            self.hits += 1
            return self.nets[key], True
        for stale in [other for other in self.nets if other[0] == key[0]]:
            self._evict(stale)  # the same folder, converted again since
        loaded = self._load(folder, field)
        self.nets[key] = loaded
        self.loads += 1
        return loaded, False

    def _load(self, folder: ControlNetFolder, field: str) -> LoadedControlNet:
        from diffusers import ControlNetModel

        started = time.perf_counter()
        try:
            model = ControlNetModel.from_pretrained(
                folder.path, dtype=self.dtype, local_files_only=True, use_safetensors=True
            )
            model.eval()
            model.requires_grad_(False)
            self.place(model)
        except Exception as error:  # a damaged or altered folder: the job fails, the worker and its cache do not
            raise ControlNetFailed(
                f"{field}: ControlNet {folder.name!r} ({folder.path}) could not be loaded "
                f"({type(error).__name__}: {first_line(error, 160)}); convert it again with --force"
            ) from None
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        seconds = time.perf_counter() - started
        log.info("loaded ControlNet %s (%.0f MiB) in %.2f s", folder.path, param_bytes / 2**20, seconds)
        return LoadedControlNet(folder, model, param_bytes, seconds)

    def evict_to_bound(self, keep: Iterable[tuple[str, str]]) -> None:
        """Drop the least recently used nets beyond the bound, never those of the current job (``keep``)."""
        keep = set(keep)
        for key in list(self.nets):
            if len(self.nets) <= self.size:
                break
            if key not in keep:
                self._evict(key)

    def _evict(self, key: tuple[str, str]) -> None:
        loaded = self.nets.pop(key)
        log.info("unloading ControlNet %s", loaded.folder.path)
        del loaded
        self.evictions += 1
