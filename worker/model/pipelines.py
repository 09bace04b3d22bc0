"""The served model, loaded: each converted folder checked against its manifest and its family, the memory plan
made from the folders' headers, the pipelines built with ``from_pretrained`` only (never a single file, never the
Hub) and placed where the plan says.

Weights that will live on the GPU are read straight into it (``device_map``), so they never take a copy in host
memory. It is not faster: 3.3 s against 3.0-3.3 s for load + ``.to("cuda")`` on the H200 (``bench/cold_start.py``,
2026-12-03, which measures every phase from process start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.settings import Settings
from model_build.layout import BASE_FAMILY, INPAINT_FAMILY, REFINER_FAMILY
from model_build.manifest import Manifest, manifest_hash, verify
from worker.adapters.controlnet.manager import controlnet_reserve
from worker.adapters.ip_adapter.manager import ip_adapter_reserve
from worker.model.loading import PhaseClock, load_refiner, require_family, shared_with_base
from worker.model.placement import Placement, model_component_bytes, plan_device


@dataclass
class LoadedModel:
    """The base pipeline (and refiner) in place, with the facts about them that jobs and metadata need."""

    model_dir: Path
    manifest: Manifest
    model_hash: str
    is_inpainting_model: bool  # an SDXL inpainting folder (9-channel UNet) serves masked jobs only
    dtype: torch.dtype
    pipe: Any
    refiner: Any | None
    info: dict[str, Any] | None  # the refiner's: name, manifest hash, what it shares with the base
    placement: Placement
    img2img: Any  # the base's modules under diffusers' img2img and inpainting loops: no second copy in memory
    inpaint: Any

    def dir_facts(self) -> tuple[Path, Manifest, str, str]:
        """(folder, manifest, name, manifest hash)."""
        return self.model_dir, self.manifest, self.model_dir.name, self.model_hash


def load_model(
    model_dir: Path,
    refiner_dir: Path | None,
    settings: Settings,
    offload: str,
    clock: PhaseClock,
) -> LoadedModel:
    """Load and place the model, leaving room in the plan for the ControlNets jobs may load later. Laps ``clock`` at
    each phase (import_pipelines_s, verify_s, cuda_init_s, plan_s, load_s, load_refiner_s, to_device_s)."""
    import diffusers
    import transformers
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    # Loading bars would interleave with the worker's and the batch runner's own output.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    clock.lap("import_pipelines_s")
    manifest = verify(model_dir)  # raises ModelFolderError with the command to run
    family = require_family(manifest, model_dir, (BASE_FAMILY, INPAINT_FAMILY), "MODEL_DIR")
    refiner_manifest = None
    if refiner_dir is not None:
        refiner_manifest = verify(refiner_dir)
        require_family(refiner_manifest, refiner_dir, REFINER_FAMILY, "REFINER_DIR")
    model_hash = manifest_hash(model_dir)
    clock.lap("verify_s")

    cuda = torch.cuda.is_available()
    # The start's first call that needs CUDA's context (earlier ones only query the device), so it creates it.
    free = torch.cuda.mem_get_info()[0] if cuda else None
    clock.lap("cuda_init_s")
    dtype = torch.float16 if cuda else torch.float32
    shares = shared_with_base(refiner_manifest, manifest) if refiner_manifest is not None else []
    sizes = model_component_bytes(model_dir, refiner_dir, shares, dtype.itemsize)
    # modules loaded later that share the GPU with the pipeline
    reserved = {**controlnet_reserve(settings, dtype), **ip_adapter_reserve(settings, dtype)}
    plan = plan_device(offload, cuda, free, {**sizes, **reserved})
    device_map = {"device_map": plan.device} if plan.loads_on_device else {}
    clock.lap("plan_s")

    pipe = StableDiffusionXLPipeline.from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, use_safetensors=True, **device_map
    )
    pipe.set_progress_bar_config(disable=True)
    clock.lap("load_s")
    refiner, refiner_info = None, None
    if refiner_dir is not None and refiner_manifest is not None:
        refiner, refiner_info = load_refiner(
            refiner_dir, refiner_manifest, pipe, shares, dtype, StableDiffusionXLImg2ImgPipeline, device_map
        )
        clock.lap("load_refiner_s")
    placement = Placement(plan, pipe, refiner)
    clock.lap("to_device_s")
    # Not from_pipe(): without a dtype it casts every shared module to float32 (an fp32 UNet on the GPU ran 3.5x
    # slower, H200 2026-11-30).
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    inpaint = StableDiffusionXLInpaintPipeline(**pipe.components)
    for twin in (img2img, inpaint):
        twin.set_progress_bar_config(disable=True)
    inpainting = family == INPAINT_FAMILY
    return LoadedModel(
        model_dir, manifest, model_hash, inpainting, dtype, pipe, refiner, refiner_info, placement, img2img, inpaint
    )
