"""Where the pipeline lives: all on the GPU, model CPU offload, or sequential offload.

"Smart CPU offload": with enough free GPU memory everything stays on the GPU (fastest); with
less, diffusers' model CPU offload keeps one component on the GPU at a time; with very little,
sequential offload streams layer by layer. ``OFFLOAD=auto|none|model|sequential`` overrides.
The decision is a pure function of the figures, so it is tested with made-up free-memory values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError
from core.safetensors_files import read_header
from core.setting_values import OFFLOAD_MODES

GIB = 1 << 30
# Working memory for a 1024x1024 SDXL step at batch 2 (CFG) plus the VAE decode, measured roughly.
ACTIVATION_HEADROOM = 6 * GIB


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda" or "cpu"
    offload: str  # "none", "model" or "sequential"
    reason: str

    @property
    def loads_on_device(self) -> bool:
        """Whether weights can be read straight into GPU memory (``from_pretrained(device_map=...)``): they stay
        there, so they never take a copy in host memory (no faster, measured: :mod:`worker.model.pipelines`)."""
        return self.device == "cuda" and self.offload == "none"


def plan_device(
    requested: str,
    cuda_available: bool,
    free_gpu_bytes: int | None,
    component_bytes: dict[str, int],
) -> DevicePlan:
    """Choose where the pipeline runs from the request (OFFLOAD) and the memory figures."""
    requested = (requested or "auto").strip().lower()
    if requested not in OFFLOAD_MODES:
        raise ConfigurationError(f"OFFLOAD={requested!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if not cuda_available:
        if requested not in ("auto", "none"):
            raise ConfigurationError(f"OFFLOAD={requested} needs a CUDA GPU and none is available; use OFFLOAD=auto")
        return DevicePlan("cpu", "none", "no CUDA GPU: running on the CPU")
    total = sum(component_bytes.values())
    largest = max(component_bytes.values(), default=0)
    free_text = f"{free_gpu_bytes / GIB:.1f} GiB free" if free_gpu_bytes is not None else "free memory unknown"
    if requested != "auto":
        return DevicePlan("cuda", requested, f"OFFLOAD={requested} set ({free_text})")
    if free_gpu_bytes is None or free_gpu_bytes >= total + ACTIVATION_HEADROOM:
        return DevicePlan(
            "cuda", "none", f"{free_text} >= model {total / GIB:.1f} GiB + headroom: whole pipeline on the GPU"
        )
    if free_gpu_bytes >= largest + ACTIVATION_HEADROOM:
        return DevicePlan(
            "cuda",
            "model",
            f"{free_text} < model {total / GIB:.1f} GiB + headroom: model CPU offload (one component at a time)",
        )
    return DevicePlan(
        "cuda",
        "sequential",
        f"{free_text} < largest component {largest / GIB:.1f} GiB + headroom: sequential CPU offload (slow)",
    )


def folder_component_bytes(folder: Path, components: Sequence[str], itemsize: int) -> dict[str, int]:
    """Bytes each component's floating-point weights take once loaded at ``itemsize`` bytes a value, read from the
    folder's safetensors headers (two small reads a file): the plan is known before a weight is read, so weights
    that will live on the GPU can be loaded straight into it."""
    sizes: dict[str, int] = {}
    for component in components:
        headers = [read_header(path) for path in sorted((folder / component).glob("*.safetensors"))]
        values = sum(
            math.prod(entry.shape) for header in headers for entry in header.tensors.values() if entry.is_float
        )
        if values:
            sizes[component] = values * itemsize
    return sizes


def model_component_bytes(
    model_dir: Path, refiner_dir: Path | None, refiner_shares: Sequence[str], itemsize: int
) -> dict[str, int]:
    """Bytes per component of the base and the refiner, a component the refiner shares with the base counted once."""
    from model_build.architectures import COMPONENTS, REFINER_COMPONENTS

    sizes = folder_component_bytes(model_dir, COMPONENTS, itemsize)
    if refiner_dir is not None:
        own = [name for name in REFINER_COMPONENTS if name not in refiner_shares]
        sizes.update(
            {f"refiner.{name}": size for name, size in folder_component_bytes(refiner_dir, own, itemsize).items()}
        )
    return sizes


class Placement:
    """Puts the pipelines where the plan says, and hands the model-offload hooks to the pipeline that runs.

    With model offload, accelerate's hooks follow one pipeline's component order, and the base, its img2img twin and
    the refiner share modules: :meth:`use` moves the hooks to a pipeline before it runs. Pipelines loaded with
    ``device_map`` set to the plan's device (:attr:`DevicePlan.loads_on_device`) are already in place.
    """

    def __init__(self, plan: DevicePlan, pipe: Any, refiner: Any | None) -> None:
        import torch

        self.plan = plan
        vae = pipe.vae
        if pipe.unet.dtype == torch.float16 and vae.config.get("force_upcast", False):
            # The stock SDXL VAE overflows in fp16 (NaN/black images); keep it in fp32 for good
            # instead of casting back and forth on every job as the stock pipeline does.
            vae.to(torch.float32)
        pipes = [pipe] + ([refiner] if refiner is not None else [])
        if plan.offload == "none":
            for each in pipes:
                each.to(plan.device)  # a no-op for weights loaded on the device
        elif plan.offload == "model":
            pipe.enable_model_cpu_offload()  # the other pipelines take the hooks when they run (use)
        else:
            for each in pipes:
                each.enable_sequential_cpu_offload()
        self._owner: Any = pipe

    def adopt(self, module: Any) -> None:
        """Place a module loaded after start-up (a ControlNet) as the plan places the pipeline's.

        With model offload it stays on the CPU: the ControlNet pipeline's own offload hooks (:meth:`use`) move it to
        the GPU while it runs, as diffusers does for every module outside its offload sequence.
        """
        if self.plan.offload == "none":
            module.to(self.plan.device)
        elif self.plan.offload == "sequential":
            import torch
            from accelerate import cpu_offload

            cpu_offload(module, torch.device("cuda", torch.cuda.current_device()))

    def use(self, pipe: Any) -> Any:
        """``pipe``, with the model-offload hooks moved to it when offloading by model."""
        if self.plan.offload == "model" and self._owner is not pipe:
            pipe.enable_model_cpu_offload()
            self._owner = pipe
        return pipe
