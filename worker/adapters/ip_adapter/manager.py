"""IP-Adapters per job: check the names, read the images, load adapters and encoders, encode the images, and put the
adapters into the UNet for the job's base calls only.

:meth:`IpAdapterManager.prepare` runs once per job, in an order that makes a bad request cheap and harmless: every
name is resolved and checked against the served UNet and an encoder folder first (headers and JSON only), then every
image is fetched and decoded, and only then are adapters and encoders loaded (:mod:`.cache`) and the images encoded
(:mod:`.image_prompt`). :meth:`IpAdapterManager.applied` puts the job's adapters into the UNet around its pipeline
calls and takes them out after (:mod:`.install`), so a job without IP-Adapters runs exactly the fresh worker's UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from core.errors import InvalidRequest
from core.settings import Settings
from model_build.ip_adapter_layout import cross_attention_layers
from worker.adapters.ip_adapter.cache import IpAdapterCache
from worker.adapters.ip_adapter.files import AdapterFile, check_fits, find, inspect, usable
from worker.adapters.ip_adapter.image_prompt import AppliedIpAdapter, ImagePrompt, encode_image
from worker.adapters.ip_adapter.install import installed
from worker.request.input_images import load_input_image
from worker.request.ip_adapter import IpAdapterUnit


class IpAdapterManager:
    """Owns the loaded IP-Adapters of one engine's base UNet; :meth:`prepare` is called once per job that asks for
    any, :meth:`applied` around its pipeline calls."""

    def __init__(self, unet: Any, dtype: Any, settings: Settings, placement: Any) -> None:
        self.unet = unet
        self.widths = [width for _, width in cross_attention_layers(unet)]
        self.cross_attention_dim = unet.config.cross_attention_dim
        self.settings = settings
        self.roots = settings.ip_adapter_roots
        self.offload, self.device = placement.plan.offload, placement.plan.device
        self.cache = IpAdapterCache(settings.ip_adapter_cache_size, dtype, unet, placement.adopt)
        self.eager_unet = settings.compile != "off"

    def check(self, units: Sequence[IpAdapterUnit]) -> list[AdapterFile]:
        """Resolve every unit's name, check it fits the served UNet and has an encoder (headers and JSON only)."""
        if units and self.offload == "sequential":
            raise InvalidRequest(
                "ip_adapters: OFFLOAD=sequential streams the UNet's weights layer by layer, and IP-Adapter layers "
                "put into it for a job would not be streamed; serve IP-Adapter jobs with OFFLOAD=model or none"
            )
        files = []
        for index, unit in enumerate(units):
            where = f"ip_adapters[{index}].name"
            path, root = find(unit.name, self.roots, where)
            adapter = inspect(unit.name, path, root, where)
            check_fits(adapter, self.widths, self.cross_attention_dim, where)
            files.append(adapter)
        return files

    def prepare(self, units: Sequence[IpAdapterUnit]) -> ImagePrompt | None:
        """Everything a job's IP-Adapters need, or None for a job without any; nothing is loaded for a bad one."""
        if not units:
            return None
        files = self.check(units)
        sources = [
            load_input_image(unit.image, self.settings, f"ip_adapters[{index}].image")
            for index, unit in enumerate(units)
        ]
        applied = []
        for index, (unit, file, source) in enumerate(zip(units, files, sources, strict=True)):
            field = f"ip_adapters[{index}].name"
            adapter, adapter_hit = self.cache.adapter(file, field)
            encoder, encoder_hit = self.cache.encoder(file.encoder, field)
            with self._encoder_on_device(encoder.model):
                embeds = encode_image(source, encoder, file.shape.output_hidden_states, self.device)
            applied.append(AppliedIpAdapter(unit, adapter, encoder, source.size, embeds, (adapter_hit, encoder_hit)))
        self.cache.evict_to_bound(file.identity for file in files)
        if not any(unit.scale for unit in units):
            unet = "as without IP-Adapters (every scale is 0)"
        elif self.eager_unet:
            unet = f"eager (COMPILE={self.settings.compile} set aside for this job)"
        else:
            unet = "eager"
        return ImagePrompt(applied, unet)

    @contextlib.contextmanager
    def _encoder_on_device(self, model: Any) -> Any:
        """With model offload the encoder waits on the CPU and runs on the GPU, as diffusers offloads a pipeline's
        image encoder; otherwise it is where the placement put it."""
        if self.offload != "model":
            yield
            return
        model.to(self.device)
        try:
            yield
        finally:
            model.to("cpu")

    def applied(self, prompt: ImagePrompt | None) -> contextlib.AbstractContextManager:
        """Where a job's base calls run: the UNet with its IP-Adapters in it (nothing changes for None)."""
        if prompt is None or not prompt.active:
            return contextlib.nullcontext()
        return installed(self.unet, prompt.adapters, prompt.scales, self.eager_unet)

    def loaded(self) -> list[dict[str, Any]]:
        """The adapters in memory, least recently used first (for logs and health checks)."""
        return [
            {"name": adapter.file.name, "path": str(adapter.file.path), "mb": round(adapter.param_bytes / 2**20, 1)}
            for adapter in self.cache.adapters.values()
        ]


def ip_adapter_reserve(settings: Settings, dtype: Any) -> dict[str, int]:
    """Memory to plan for the IP-Adapters jobs may load: the ``IP_ADAPTER_CACHE_SIZE`` largest usable adapter files
    found and the image encoders they read, in the engine's dtype."""
    itemsize = getattr(dtype, "itemsize", 2)
    adapters = sorted(usable(settings.ip_adapter_roots), key=lambda file: file.values, reverse=True)
    chosen = adapters[: settings.ip_adapter_cache_size]
    encoders = {file.encoder.identity: file.encoder.values for file in chosen}
    reserved = {f"ip_adapter.{index}": file.values * itemsize for index, file in enumerate(chosen)}
    reserved.update({f"image_encoder.{index}": values * itemsize for index, values in enumerate(encoders.values())})
    return reserved
