"""ControlNets per job: check the names, read the images, load the nets, and hand the pipeline call what it takes.

:meth:`ControlNetManager.prepare` runs once per job, in an order that makes a bad request cheap and harmless: every
name is resolved and checked against the served UNet first (JSON only), then every image is fetched and decoded,
and only then are nets loaded (:mod:`.cache`). It returns :class:`ControlInputs`, which builds the job's pipeline
from the base's own modules plus the nets (``StableDiffusionXLControlNetPipeline`` or its img2img twin; several
units become diffusers' ``MultiControlNetModel``, whose residuals add up) and the call's keyword arguments, with
each control image fitted and preprocessed at the output size (:mod:`.preprocess`). Nothing of a job stays in the
base pipeline: the ControlNet pipeline is a new object over the same modules, and the base never holds a net.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from core.errors import ControlNetFailed, InvalidRequest
from core.settings import Settings
from worker.adapters.controlnet.cache import ControlNetCache, LoadedControlNet
from worker.adapters.controlnet.folders import ControlNetFolder, check_fits, find
from worker.adapters.controlnet.preprocess import ControlImage, control_image
from worker.request.controlnet import ControlNetUnit
from worker.request.input_images import load_input_image

# Pipeline arguments the plain pipelines take and the ControlNet ones may lack: their neutral values, and the request
# fields they come from (for the refusal's message).
_NEUTRAL: dict[str, Any] = {"guidance_rescale": 0.0}
_ARGUMENT_FIELDS = {
    "guidance_rescale": "guidance_rescale",
    "timesteps": "the schedule type or timesteps",
    "sigmas": "the schedule type or sigmas",
}


@dataclass
class AppliedControlNet:
    """One unit of a job: what it asked for, the net that ran, the control image it got."""

    unit: ControlNetUnit
    loaded: LoadedControlNet
    source: Image.Image
    cache_hit: bool
    control: ControlImage | None = None  # set when the pipeline call is prepared

    def stable(self) -> dict[str, Any]:
        unit = self.unit
        entry: dict[str, Any] = {
            "name": unit.name,
            "manifest_hash": self.loaded.folder.manifest_hash,
            "config": self.loaded.folder.config_name,
            "conditioning_scale": unit.conditioning_scale,
            "control_guidance_start": unit.control_guidance_start,
            "control_guidance_end": unit.control_guidance_end,
            "preprocessor": unit.preprocessor,
            "applied_to": "base",  # SDXL ControlNets fit the base's UNet; a refiner stage runs without them
        }
        if unit.preprocessor == "canny":
            entry.update(low_threshold=unit.low_threshold, high_threshold=unit.high_threshold)
        if self.control is not None:
            entry.update(self.control.describe())
        return entry

    def volatile(self) -> dict[str, Any]:
        return {
            "name": self.unit.name,
            "cache_hit": self.cache_hit,
            "load_s": 0.0 if self.cache_hit else round(self.loaded.load_s, 4),
        }


@dataclass
class ControlInputs:
    """A job's ControlNets, ready for one pipeline call of the base (text-to-image or img2img)."""

    applied: list[AppliedControlNet]
    eager_unet: bool  # run the UNet eagerly in these calls (COMPILE=unet: residuals are new inputs of its graph)
    used: bool = False  # whether a pipeline call took them (the engine refuses a job whose mode did not)
    _pipelines: dict[bool, Any] = field(default_factory=dict)

    @property
    def controlnet(self) -> Any:
        nets = [applied.loaded.model for applied in self.applied]
        return nets[0] if len(nets) == 1 else nets  # a list becomes diffusers' MultiControlNetModel

    def pipeline(self, base: Any, img2img: bool) -> Any:
        """The base's own modules under diffusers' ControlNet pipeline (no weight is copied)."""
        if img2img not in self._pipelines:
            from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline

            pipeline_class = (
                StableDiffusionXLControlNetImg2ImgPipeline if img2img else StableDiffusionXLControlNetPipeline
            )
            pipe = pipeline_class(**base.components, controlnet=self.controlnet)
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[img2img] = pipe
        return self._pipelines[img2img]

    @staticmethod
    def check_arguments(pipe: Any, arguments: dict[str, Any]) -> None:
        """Refuse what the ControlNet pipeline would silently drop; remove the arguments it lacks that do nothing.

        diffusers' SDXL ControlNet pipelines take unknown keyword arguments without a word: neither has
        ``guidance_rescale``, and the img2img one has no ``timesteps``/``sigmas`` (custom schedules, and schedule
        types such as Simple or Align Your Steps that are given as them).
        """
        import inspect

        accepted = inspect.signature(pipe.__call__).parameters
        lacking = [name for name in arguments if name not in accepted]
        effective = [name for name in lacking if arguments[name] is not None and arguments[name] != _NEUTRAL.get(name)]
        if effective:
            fields = "; ".join(f"{name} (from {_ARGUMENT_FIELDS.get(name, name)})" for name in effective)
            raise InvalidRequest(
                f"controlnets: diffusers' {type(pipe).__name__} has no {', '.join(effective)} argument, so this job "
                f"cannot run with ControlNets as asked: {fields}. Leave those out, or send the job without controlnets"
            )
        for name in lacking:
            del arguments[name]

    def call_kwargs(self, size: tuple[int, int], img2img: bool) -> dict[str, Any]:
        """The pipeline call's ControlNet arguments, the control images fitted and preprocessed at ``size``."""
        self.used = True
        for applied in self.applied:
            applied.control = control_image(applied.source, size, applied.unit)
        images = [applied.control.image for applied in self.applied if applied.control is not None]
        units = [applied.unit for applied in self.applied]
        single = len(units) == 1

        def per_unit(values: list[float]) -> float | list[float]:
            return values[0] if single else values

        return {
            "control_image" if img2img else "image": images[0] if single else images,
            "controlnet_conditioning_scale": per_unit([unit.conditioning_scale for unit in units]),
            "control_guidance_start": per_unit([unit.control_guidance_start for unit in units]),
            "control_guidance_end": per_unit([unit.control_guidance_end for unit in units]),
        }

    def unet_context(self) -> Any:
        """Where the pipeline call runs: with the whole-UNet compile set aside when ``eager_unet``."""
        import contextlib

        import torch

        return torch.compiler.set_stance("force_eager") if self.eager_unet else contextlib.nullcontext()

    def stable(self) -> list[dict[str, Any]]:
        return [applied.stable() for applied in self.applied]

    def volatile(self) -> list[dict[str, Any]]:
        return [applied.volatile() for applied in self.applied]


class ControlNetManager:
    """Owns the loaded ControlNets of one engine; :meth:`prepare` is called once per job that asks for any."""

    def __init__(self, unet_config: Any, dtype: Any, settings: Settings, place: Any) -> None:
        self.unet_config = dict(unet_config)
        self.settings = settings
        self.roots = settings.controlnet_roots
        self.cache = ControlNetCache(settings.controlnet_cache_size, dtype, place)
        self.eager_unet = settings.compile == "unet"

    def check(self, units: Sequence[ControlNetUnit]) -> list[ControlNetFolder]:
        """Resolve every unit's name and check it fits the served UNet (reads JSON only)."""
        folders = []
        for index, unit in enumerate(units):
            where = f"controlnets[{index}].name"
            folder = find(unit.name, self.roots, where)
            check_fits(folder, _folder_config(folder, where), self.unet_config, where)
            folders.append(folder)
        return folders

    def prepare(self, units: Sequence[ControlNetUnit]) -> ControlInputs | None:
        """Everything a job's ControlNets need, or None for a job without any; nothing is loaded for a bad one."""
        if not units:
            return None
        folders = self.check(units)
        sources = [
            load_input_image(unit.image, self.settings, f"controlnets[{index}].image")
            for index, unit in enumerate(units)
        ]
        applied = []
        for index, (unit, folder, source) in enumerate(zip(units, folders, sources, strict=True)):
            loaded, hit = self.cache.get(folder, f"controlnets[{index}].name")
            applied.append(AppliedControlNet(unit, loaded, source, hit))
        self.cache.evict_to_bound(folder.identity for folder in folders)
        return ControlInputs(applied, self.eager_unet)

    def loaded(self) -> list[dict[str, Any]]:
        """The nets in memory, least recently used first (for logs and health checks)."""
        return [
            {"name": net.folder.name, "path": str(net.folder.path), "mb": round(net.param_bytes / 2**20, 1)}
            for net in self.cache.nets.values()
        ]


def _folder_config(folder: ControlNetFolder, field: str) -> dict[str, Any]:
    """The folder's config.json: what ``from_pretrained`` builds the net from."""
    import json

    try:
        return json.loads((folder.path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ControlNetFailed(
            f"{field}: ControlNet {folder.name!r} has no readable config.json ({error}); convert it again with --force"
        ) from None


def controlnet_reserve(settings: Settings, dtype: Any) -> dict[str, int]:
    """Memory to plan for the ControlNets jobs may load: the ``CONTROLNET_CACHE_SIZE`` largest converted ones found,
    in the engine's dtype (their folders hold fp16 weights unless converted otherwise)."""
    from worker.adapters.controlnet.folders import largest_weights

    factor = getattr(dtype, "itemsize", 2) / 2
    sizes = largest_weights(settings.controlnet_roots, settings.controlnet_cache_size)
    return {f"controlnet.{index}": int(size * factor) for index, size in enumerate(sizes)}
