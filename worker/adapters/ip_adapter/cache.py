"""Loaded IP-Adapters, least recently used first, bounded by ``IP_ADAPTER_CACHE_SIZE``, and the image encoders they
read (an encoder stays while a cached adapter reads it).

An adapter is loaded as diffusers loads it (``load_ip_adapter``: the file split into ``image_proj`` and
``ip_adapter``, then the UNet's own converters build one ``IPAdapterAttnProcessor2_0`` per cross-attention layer and
the image projection) but into modules of its own: nothing is put into the UNet here (:mod:`.install` does that for a
job's base calls). An encoder is ``CLIPVisionModelWithProjection.from_pretrained`` of its folder with the
``CLIPImageProcessor`` diffusers makes for it. Both are in the engine's dtype and handed to the engine's placement.
A load that fails leaves nothing behind and names the request field.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import IpAdapterFailed, first_line
from worker.adapters.ip_adapter.files import AdapterFile, EncoderFolder

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    file: AdapterFile
    processors: dict[str, Any]  # cross-attention processor name -> diffusers' IP-Adapter processor of this adapter
    projection: Any  # diffusers' ImageProjection / IPAdapterPlusImageProjection
    param_bytes: int
    load_s: float


@dataclass
class LoadedEncoder:
    folder: EncoderFolder
    model: Any  # transformers' CLIPVisionModelWithProjection
    processor: Any  # transformers' CLIPImageProcessor, as diffusers' load_ip_adapter makes it
    param_bytes: int
    load_s: float


def _bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class IpAdapterCache:
    """Owns the loaded adapters and encoders; ``place`` puts a freshly loaded module where the pipeline runs."""

    def __init__(self, size: int, dtype: Any, unet: Any, place: Callable[[Any], None]) -> None:
        self.size, self.dtype, self.unet, self.place = size, dtype, unet, place
        self.adapters: OrderedDict[tuple[str, int, int], LoadedAdapter] = OrderedDict()
        self.encoders: dict[tuple[str, int, int], LoadedEncoder] = {}
        self.hits = self.loads = self.evictions = 0

    def adapter(self, file: AdapterFile, field: str) -> tuple[LoadedAdapter, bool]:
        """The loaded adapter of ``file`` and whether it was cached; loads it otherwise."""
        key = file.identity
        if key in self.adapters:
            self.adapters.move_to_end(key)
            self.hits += 1
            return self.adapters[key], True
        for stale in [other for other in self.adapters if other[0] == key[0]]:
            self._evict(stale)  # the same path, another file since
        loaded = self._load_adapter(file, field)
        self.adapters[key] = loaded
        self.loads += 1
        return loaded, False

    def encoder(self, folder: EncoderFolder, field: str) -> tuple[LoadedEncoder, bool]:
        key = folder.identity
        if key in self.encoders:
            return self.encoders[key], True
        for stale in [other for other in self.encoders if other[0] == key[0]]:
            del self.encoders[stale]
        self.encoders[key] = self._load_encoder(folder, field)
        return self.encoders[key], False

    def _load_adapter(self, file: AdapterFile, field: str) -> LoadedAdapter:
        import torch
        from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
        from safetensors import safe_open

        started = time.perf_counter()
        try:
            state: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(str(file.path), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    part, _, rest = key.partition(".")
                    state[part][rest] = handle.get_tensor(key)
            built = self.unet._convert_ip_adapter_attn_to_diffusers([state])
            processors = {
                name: processor
                for name, processor in built.items()
                if isinstance(processor, IPAdapterAttnProcessor | IPAdapterAttnProcessor2_0)
            }
            projection = self.unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"])
            holder = torch.nn.ModuleList([*processors.values(), projection])
            if any(parameter.is_meta for parameter in holder.parameters()):
                raise ValueError("some of its tensors are missing (diffusers left them unloaded)")
            holder.to(self.dtype).eval().requires_grad_(False)
            self.place(holder)
        except Exception as error:  # a damaged or altered file: the job fails, the worker and its cache do not
            raise IpAdapterFailed(
                f"{field}: IP-Adapter {file.name!r} ({file.path}) could not be loaded "
                f"({type(error).__name__}: {first_line(error, 160)}); replace the file"
            ) from None
        seconds = time.perf_counter() - started
        size = _bytes(holder)
        log.info("loaded IP-Adapter %s (%.0f MiB) in %.2f s", file.path, size / 2**20, seconds)
        return LoadedAdapter(file, processors, projection, size, seconds)

    def _load_encoder(self, folder: EncoderFolder, field: str) -> LoadedEncoder:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        started = time.perf_counter()
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(
                folder.path, dtype=self.dtype, local_files_only=True, use_safetensors=True
            )
            model.eval().requires_grad_(False)
            self.place(model)
        except Exception as error:
            raise IpAdapterFailed(
                f"{field}: the image encoder {folder.path} could not be loaded "
                f"({type(error).__name__}: {first_line(error, 160)}); replace its config.json and model.safetensors"
            ) from None
        processor = CLIPImageProcessor(size=folder.image_size, crop_size=folder.image_size)
        seconds = time.perf_counter() - started
        log.info("loaded image encoder %s (%.0f MiB) in %.2f s", folder.path, _bytes(model) / 2**20, seconds)
        return LoadedEncoder(folder, model, processor, _bytes(model), seconds)

    def evict_to_bound(self, keep: Iterable[tuple[str, int, int]]) -> None:
        """Drop the least recently used adapters beyond the bound, never those of the current job (``keep``), and
        the encoders no cached adapter reads."""
        keep = set(keep)
        for key in list(self.adapters):
            if len(self.adapters) <= self.size:
                break
            if key not in keep:
                self._evict(key)
        needed = {adapter.file.encoder.identity for adapter in self.adapters.values()}
        for key in [key for key in self.encoders if key not in needed]:
            log.info("unloading image encoder %s", self.encoders.pop(key).folder.path)

    def _evict(self, key: tuple[str, int, int]) -> None:
        loaded = self.adapters.pop(key)
        log.info("unloading IP-Adapter %s", loaded.file.path)
        self.evictions += 1
