"""Where the pipeline lives: all on the GPU, model CPU offload, or sequential offload.

"Smart CPU offload": with enough free GPU memory everything stays on the GPU (fastest); with
less, diffusers' model CPU offload keeps one component on the GPU at a time; with very little,
sequential offload streams layer by layer. ``OFFLOAD=auto|none|model|sequential`` overrides.
The decision is a pure function of the figures, so it is tested with made-up free-memory values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import ConfigurationError
from core.settings import OFFLOAD_MODES

GIB = 1 << 30
# Working memory for a 1024x1024 SDXL step at batch 2 (CFG) plus the VAE decode, measured roughly.
ACTIVATION_HEADROOM = 6 * GIB


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda" or "cpu"
    offload: str  # "none", "model" or "sequential"
    reason: str


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


def component_bytes(pipe: Any, refiner: Any | None) -> dict[str, int]:
    """Parameter bytes per component of the base and the refiner (a module they share counted once)."""
    from model_build.architectures import COMPONENTS, REFINER_COMPONENTS

    modules: dict[str, Any] = {name: getattr(pipe, name) for name in COMPONENTS}
    if refiner is not None:
        for name in REFINER_COMPONENTS:
            module = getattr(refiner, name)
            if all(module is not other for other in modules.values()):
                modules[f"refiner.{name}"] = module
    return {name: sum(p.numel() * p.element_size() for p in module.parameters()) for name, module in modules.items()}


class Placement:
    """Puts the pipelines where :func:`plan_device` says, and hands the model-offload hooks to the pipeline that runs.

    With model offload, accelerate's hooks follow one pipeline's component order, and the base, its img2img twin and
    the refiner share modules: :meth:`use` moves the hooks to a pipeline before it runs.
    """

    def __init__(
        self, pipe: Any, refiner: Any | None, offload: str, cuda: bool, reserved: dict[str, int] | None = None
    ) -> None:
        import torch

        free = torch.cuda.mem_get_info()[0] if cuda else None
        # ``reserved``: modules loaded later (ControlNets) that share the GPU with the pipeline, planned for now.
        self.plan = plan_device(offload, cuda, free, {**component_bytes(pipe, refiner), **(reserved or {})})
        vae = pipe.vae
        if pipe.unet.dtype == torch.float16 and vae.config.get("force_upcast", False):
            # The stock SDXL VAE overflows in fp16 (NaN/black images); keep it in fp32 for good
            # instead of casting back and forth on every job as the stock pipeline does.
            vae.to(torch.float32)
        pipes = [pipe] + ([refiner] if refiner is not None else [])
        if self.plan.offload == "none":
            for each in pipes:
                each.to(self.plan.device)
        elif self.plan.offload == "model":
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
