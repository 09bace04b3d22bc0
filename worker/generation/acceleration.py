"""Speed-ups applied to a loaded SDXL pipeline, each opt-in and measured by ``bench/engine_speed.py``.

:func:`apply_speedups` changes the pipeline in place and returns an :class:`Accelerator`; the engine then
calls :meth:`Accelerator.warm_up` once at start-up (never inside a paid job), which compiles for the
warm-up shapes, or loads that compilation from the persistent compile cache, and then *freezes*
compilation: from then on a call whose shape, dtype or module structure was not warmed up runs eagerly
(``torch.compiler.set_stance("eager_on_recompile")``) instead of spending minutes recompiling inside
a job. So a 768x1344 request, a 300-token prompt (longer cross-attention sequence), a job without
classifier-free guidance (unless ``WARMUP_GUIDANCE`` compiled that UNet batch too) or a job with LoRAs run
as peft layers (``LORA_FUSE=0``, DoRA; peft wrappers change the module graph) are served correctly by the
eager modules, and 1024x1024 jobs get the compiled code, with or without LoRAs merged into the UNet's weights
(``LORA_FUSE=1``, the default: same modules, new values, which compiled code and CUDA graphs read at run time).

What each option does and why it is safe:

- ``channels_last``: the UNet's convolutions in NHWC, the layout cuDNN's and Triton's fp16/bf16
  kernels prefer (not the VAE's: its decode measured 40-50 % slower in NHWC on the H200). A
  memory-format change only: the same arithmetic up to kernel choice. CUDA only: on the CPU (the
  dev model, the tests) it gained nothing measurable and changed the last bits.
- ``fuse_qkv``: one matmul for q, k and v (diffusers' ``fuse_qkv_projections``). Off by default:
  the fused processor reads ``to_qkv``, so a LoRA injected into ``to_q``/``to_k``/``to_v`` would be
  silently ignored; only for deployments without LoRAs.
- ``compile``: ``"unet"`` compiles the whole UNet forward (fullgraph, static shapes); ``"regional"``
  compiles only its repeated transformer blocks (diffusers' ``compile_repeated_blocks``): far shorter
  compile, a smaller gain; ``"aot"`` compiles the whole UNet ahead of time with AOTInductor into packages
  kept in the cache folder, which a warm start loads without tracing (:mod:`worker.generation.aot_unet`);
  its ``compile_mode`` splits in two: ``max-autotune*`` autotunes the package's kernels when it is built,
  ``reduce-overhead`` and ``max-autotune`` replay each package call from a CUDA graph.
  ``compile_vae`` compiles the VAE decoder too.
- ``quantize``: ``"fp8"`` runs the UNet's transformer linears in float8 (:mod:`worker.generation.fp8`; compute
  capability 8.9+, refused with a configuration error elsewhere). The weights stay 16-bit parameters and
  are quantised per call, so merged LoRAs are quantised with them and restored bit for bit. Off by
  default and experimental: on an H200 it was no faster than fp16 (the FP8 GEMMs gain ~1 ms a step, the
  quantisation passes cost more) and further from fp32 than the quality threshold allows on random
  weights (bench/results/README.md, "FP8 on Hopper").
- ``vae_dtype``: the stock SDXL VAE overflows in fp16, so the engine keeps it in fp32 when its config
  says ``force_upcast``; bf16 has fp32's range and avoids the fp32 decode cost. ``None`` keeps the engine's choice.
- the compile cache: torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``), one
  file per (torch, GPU, model architecture, options) key, written atomically after a compiling warm-up
  and loaded before the next one, so a warm start skips Inductor's code generation and autotuning.

Timesteps: schedulers hand the UNet int64 (DDIM, DPM++) or float32 (Euler, Heun) timesteps, which
would be two compiled graphs; the compiled UNet gets them as float32, which is exact (SDXL's timesteps
are integers below 1000, and the UNet's time embedding casts them to float32 first thing).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigurationError
from worker.generation.compile_cache import (
    compile_cache_file,
    config_digest,
    load_compile_cache,
    save_compile_cache,
)

log = logging.getLogger(__name__)

COMPILE_TARGETS = ("off", "unet", "regional", "aot")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
QUANTIZE_MODES = ("off", "fp8")
WARMUP_GUIDANCE = ("cfg", "none", "both")
VAE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class SpeedupOptions:
    """Which speed-ups to apply; the defaults change nothing numerically but the memory layout."""

    channels_last: bool = True
    fuse_qkv: bool = False
    compile: str = "off"  # one of COMPILE_TARGETS
    compile_mode: str = "default"  # one of COMPILE_MODES
    compile_vae: bool = False
    quantize: str = "off"  # one of QUANTIZE_MODES
    vae_dtype: str | None = None  # one of VAE_DTYPES, or None for the engine's choice
    cache_dir: Path | None = None  # where compile-cache files live; None: no persistent cache
    # Shapes compiled at warm-up: (width, height) and images per pipeline call. Other shapes run eagerly.
    warmup_sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    warmup_batch_sizes: tuple[int, ...] = (1,)
    # The UNet batch a call has: with classifier-free guidance (2 per image) or without (guidance 0/1: few-step
    # models such as Lightning, LCM, Turbo; 1 per image). Each is its own graph.
    warmup_guidance: str = "cfg"  # one of WARMUP_GUIDANCE

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_TARGETS:
            raise ValueError(f"compile={self.compile!r}: use one of {', '.join(COMPILE_TARGETS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={self.quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
        if self.warmup_guidance not in WARMUP_GUIDANCE:
            raise ValueError(f"warmup_guidance={self.warmup_guidance!r}: use one of {', '.join(WARMUP_GUIDANCE)}")
        if self.vae_dtype is not None and self.vae_dtype not in VAE_DTYPES:
            raise ValueError(f"vae_dtype={self.vae_dtype!r}: use one of {', '.join(VAE_DTYPES)} or leave it unset")

    @property
    def compiles(self) -> bool:
        return self.compile != "off" or self.compile_vae

    def warmup_calls(self) -> list[dict[str, Any]]:
        """The pipeline calls the warm-up makes: every size x images per call x guidance asked for."""
        guidance = {"cfg": (True,), "none": (False,), "both": (True, False)}[self.warmup_guidance]
        return [
            {"width": width, "height": height, "batch": batch, "cfg": cfg}
            for width, height in self.warmup_sizes
            for batch in self.warmup_batch_sizes
            for cfg in guidance
        ]


@dataclass
class WarmUpReport:
    """What the warm-up did and cost; the bench prints it and the worker logs it."""

    seconds: float = 0.0
    cache_file: str | None = None
    aot_packages: list[dict[str, Any]] = field(default_factory=list)  # COMPILE=aot: each package, loaded or built
    cache_hit: bool = False
    cache_load_s: float = 0.0
    cache_save_s: float = 0.0
    cache_bytes: int = 0
    shapes: list[dict[str, Any]] = field(default_factory=list)
    graphs_compiled: int = 0
    error: str | None = None  # compilation failed: the worker serves eagerly instead of not at all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _FloatTimestepUNet:
    """``unet.forward`` replacement: the compiled forward with the timestep as float32 (see the module doc)."""

    def __init__(self, compiled_forward: Any) -> None:
        self.compiled_forward = compiled_forward

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(timestep):
            if timestep.dtype != torch.float32:
                timestep = timestep.to(torch.float32)
        else:
            timestep = torch.tensor(float(timestep), dtype=torch.float32, device=sample.device)
        return self.compiled_forward(sample, timestep, *args, **kwargs)


class Accelerator:
    """The speed-ups applied to one pipeline, and its one-time warm-up."""

    def __init__(
        self,
        pipe: Any,
        options: SpeedupOptions,
        applied: list[str],
        aot: Any = None,
        refiner: bool = False,
        aot_vae: Any = None,
    ) -> None:
        self.pipe = pipe
        self.options = options
        self.applied = applied
        self.frozen = False
        self.report: WarmUpReport | None = None
        self.aot = aot  # COMPILE=aot's worker.generation.aot_unet.AotUNet
        self.aot_vae = aot_vae  # and with COMPILE_VAE=1 its AotVaeDecoder
        # A refiner is warmed up as the engine runs it: img2img from the base's latents, no decode (the VAE is the
        # base's, warmed with it).
        self.dummy_call = _run_dummy_refinement if refiner else _run_dummy_generation

    @property
    def aot_modules(self) -> list[Any]:
        """The packaged modules (COMPILE=aot): the UNet's, and the VAE decoder's with COMPILE_VAE=1."""
        return [module for module in (self.aot, self.aot_vae) if module is not None]

    def describe(self) -> dict[str, Any]:
        """For metadata and logs: what runs, whether compilation is frozen, and why it was dropped if it was."""
        error = self.report.error if self.report is not None else None
        return {"applied": list(self.applied), "frozen": self.frozen, "compile_error": error}

    def warm_up(self, steps: int = 3) -> WarmUpReport:
        """Run each warm-up shape once (compiling, or loading the compiled code from the cache), then freeze.

        Does nothing heavy when no compilation is configured. Call once, at start-up, before serving jobs.
        """
        report = WarmUpReport()
        started = time.perf_counter()
        cache_file = compile_cache_file(self.pipe, self.options) if self.options.compiles else None
        if cache_file is not None:
            report.cache_file = str(cache_file)
            report.cache_hit, report.cache_load_s, report.cache_bytes = load_compile_cache(cache_file)
        graphs_before = _unique_graphs()
        if self.options.compiles:  # the stance is process-wide: an earlier engine's freeze must not stop this compile
            torch.compiler.set_stance("default")
        try:
            if self.options.compiles:
                device = self.pipe.unet.device
                for call in self.options.warmup_calls():
                    self.dummy_call(self.pipe, steps=steps, device=device, **call)
                    report.shapes.append(call)
        except ConfigurationError:
            raise  # a setting that cannot work here (COMPILE=aot, no package, no compiler): the start's error
        except Exception as error:  # a compiler or out-of-memory failure must not cost the worker its model
            report.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.error("compilation failed, serving without it (COMPILE=off skips it): %s", report.error)
            torch.compiler.set_stance("force_eager")
            for module in self.aot_modules:
                module.disable()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        report.graphs_compiled = _unique_graphs() - graphs_before
        report.aot_packages = [
            {**record.to_dict(), "module": module.what} for module in self.aot_modules for record in module.records
        ]
        if cache_file is not None and not report.cache_hit and report.error is None:
            report.cache_save_s, saved_bytes = save_compile_cache(cache_file)
            report.cache_bytes = saved_bytes or report.cache_bytes
        if report.error is None:
            self.freeze()
        else:
            self.frozen = True
        report.seconds = time.perf_counter() - started
        self.report = report
        log.info("warm-up: %s", json.dumps(report.to_dict()))
        return report

    def freeze(self) -> None:
        """No more compiling: cached compiled code where its guards hold, eager code everywhere else."""
        if self.options.compiles:
            torch.compiler.set_stance("eager_on_recompile")
        for module in self.aot_modules:
            module.freeze()
        self.frozen = True


def options_from_settings(settings: Any) -> SpeedupOptions:
    """The speed-ups a :class:`core.settings.Settings` asks for; the compile cache defaults to the volume."""
    from core.settings import VOLUME

    cache_dir = settings.compile_cache_dir
    if cache_dir is None and settings.compile != "off" and VOLUME.is_dir():
        cache_dir = VOLUME / "cache" / "torch-compile"
    return SpeedupOptions(
        channels_last=settings.channels_last,
        compile=settings.compile,
        compile_mode=settings.compile_mode,
        compile_vae=settings.compile_vae,
        quantize=settings.quantize,
        vae_dtype=settings.vae_dtype or None,
        cache_dir=cache_dir,
        warmup_sizes=settings.warmup_sizes,
        warmup_batch_sizes=settings.warmup_batch_sizes,
        warmup_guidance=settings.warmup_guidance,
    )


def accelerate(pipe: Any, settings: Any) -> Accelerator:
    """The engine's one call: apply what ``settings`` asks for and warm up (compiling) before any job."""
    accelerator = apply_speedups(pipe, options_from_settings(settings))
    accelerator.warm_up()
    log.info("speed-ups active: %s", json.dumps(accelerator.describe()))  # a failed compile shows as compile_error
    return accelerator


def accelerate_refiner(refiner: Any, settings: Any, base: Accelerator) -> Accelerator:
    """The refiner's UNet gets the base's ``COMPILE`` (at the same warm-up sizes, batches and guidance), so a refiner
    job's refining steps are compiled too. The VAE and the second text encoder are the base's: already set up, so
    ``COMPILE_VAE`` and ``VAE_DTYPE`` are not applied twice. ``QUANTIZE`` stays with the base UNet.

    A refiner whose compile fails serves eagerly without taking the base's compiled code with it: the warm-up's
    failure path makes every Dynamo-compiled module eager, so the base's freeze is put back (a failed compile leaves
    no compiled code behind for the refiner, which then runs its own forward)."""
    options = replace(options_from_settings(settings), compile_vae=False, vae_dtype=None, quantize="off")
    accelerator = apply_speedups(refiner, options, refiner=True)
    report = accelerator.warm_up()
    if report.error is not None and base.options.compiles and base.report is not None and base.report.error is None:
        torch.compiler.set_stance("eager_on_recompile")
    log.info("refiner speed-ups active: %s", json.dumps(accelerator.describe()))
    return accelerator


def apply_speedups(pipe: Any, options: SpeedupOptions, refiner: bool = False) -> Accelerator:
    """Apply ``options`` to ``pipe`` (whole pipeline on one CUDA device, or CPU for tests) in place; ``refiner``:
    ``pipe`` is the refiner, whose VAE is the base's (not fused or compiled again)."""
    applied: list[str] = []
    if options.compile == "aot":
        _check_aot(options)
    offloaded = any(getattr(getattr(pipe, name, None), "_hf_hook", None) is not None for name in ("unet", "vae"))
    if options.quantize == "fp8":  # before anything changes: a refused setting leaves the pipeline as it was
        from worker.generation.fp8 import enable_fp8, require_fp8

        unet_device = pipe.unet.device
        if offloaded and unet_device.type != "cuda" and torch.cuda.is_available():
            unet_device = torch.device("cuda", torch.cuda.current_device())  # offload hooks move it per call
        require_fp8(unet_device)
        applied.append(f"fp8_linears:{len(enable_fp8(pipe.unet))}")
        log.warning(
            "QUANTIZE=fp8 is experimental: on an H200 it measured 4-7 %% slower per image than fp16 and below the "
            "quality threshold (latents cosine 0.985 < 0.999) with random weights; see bench/results/README.md"
        )
    if offloaded:
        # accelerate's offload hooks replace forward and move weights per call: neither layout nor compile holds.
        if options.compiles:
            log.warning("COMPILE is ignored: the pipeline uses CPU offload (OFFLOAD=none on a GPU that holds it)")
        return Accelerator(pipe, replace(options, compile="off", compile_vae=False), applied, refiner=refiner)
    if options.vae_dtype is not None:
        pipe.vae.to(VAE_DTYPES[options.vae_dtype])
        applied.append(f"vae_{options.vae_dtype}")
    if options.channels_last and pipe.unet.device.type == "cuda":  # on the CPU it gained nothing and moved bits
        # The UNet only: the VAE decoder measured slower in channels_last (H200, fp32 0.165 s vs 0.116 s NCHW).
        pipe.unet.to(memory_format=torch.channels_last)
        applied.append("channels_last_unet")
    if options.fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=not refiner)
        applied.append("fused_qkv")
    if options.compiles:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        # 1x1 convolutions as matmuls: the UNet's proj_in/proj_out and shortcut convs get Triton/cuBLAS GEMMs.
        inductor_config.conv_1x1_as_mm = True
        # Dynamo keeps at most recompile_limit (8) compiled variants per code object, and the base's and the
        # refiner's UNets (their transformer blocks, regionally) share theirs: room for every warm-up shape of
        # both, with margin. After the warm-up nothing compiles (the frozen stance), so the room cannot be misused.
        room = 8 * 2 * len(options.warmup_calls())
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, room)
    compile_kwargs = {"fullgraph": True, "dynamic": False, "mode": _mode_argument(options.compile_mode)}
    if options.compile == "unet":
        unet = pipe.unet
        unet.forward = _FloatTimestepUNet(torch.compile(unet.forward, **compile_kwargs))
        applied.append(f"compile_unet:{options.compile_mode}")
    elif options.compile == "regional":
        pipe.unet.compile_repeated_blocks(**compile_kwargs)
        applied.append(f"compile_regional:{options.compile_mode}")
    aot = aot_vae = None
    if options.compile == "aot":
        from worker.generation.aot_unet import AotUNet, AotVaeDecoder

        aot = _install_aot(AotUNet, pipe.unet, _aot_options_digest(pipe, options), options)
        applied.append(f"compile_unet_aot:{options.compile_mode}")
        if options.compile_vae:
            aot_vae = _install_aot(AotVaeDecoder, pipe.vae.decoder, _aot_vae_options_digest(pipe), options)
            applied.append(f"compile_vae_decoder_aot:{options.compile_mode}")
    elif options.compile_vae:
        pipe.vae.decoder.compile(**compile_kwargs)
        applied.append(f"compile_vae_decoder:{options.compile_mode}")
    return Accelerator(pipe, options, applied, aot, refiner=refiner, aot_vae=aot_vae)


def _check_aot(options: SpeedupOptions) -> None:
    if options.quantize != "off":
        raise ConfigurationError(
            f"COMPILE=aot with QUANTIZE={options.quantize} is not supported: use QUANTIZE=off, or COMPILE=unet"
        )


def _install_aot(kind: Any, module: Any, options_digest: str, options: SpeedupOptions) -> Any:
    """``kind`` (AotUNet or AotVaeDecoder) installed on ``module``, packages in the cache folder's ``aot/``."""
    return kind.install(
        module,
        None if options.cache_dir is None else Path(options.cache_dir) / "aot",
        options_digest,
        # The mode's two halves: autotuning is compiled into the package, CUDA graphs are captured around it.
        {"conv_1x1_as_mm": True, "max_autotune": options.compile_mode.startswith("max-autotune")},
        cuda_graphs=options.compile_mode in ("reduce-overhead", "max-autotune"),
    )


def _aot_code_digest(model: Any, first_weight: torch.Tensor, *more: str) -> str:
    """What an AOT package of ``model`` depends on besides torch, the GPU and the call's shapes: its architecture and
    the diffusers code that runs it (version, attention processors), dtype, memory layout and ``more`` (not its
    weights, which the package reads from the live model)."""
    import diffusers

    layout = "channels_last" if first_weight.is_contiguous(memory_format=torch.channels_last) else "nchw"
    processors = sorted({type(processor).__name__ for processor in model.attn_processors.values()})
    parts = [config_digest(model.config), f"diffusers={diffusers.__version__}", ",".join(processors)]
    return "|".join([*parts, str(first_weight.dtype), layout, *more])


def _aot_options_digest(pipe: Any, options: SpeedupOptions) -> str:
    """The UNet package's: its code, and whether its attention projections are fused."""
    return _aot_code_digest(pipe.unet, pipe.unet.conv_in.weight, f"fuse_qkv={options.fuse_qkv}")


def _aot_vae_options_digest(pipe: Any) -> str:
    """The VAE decoder package's: the VAE's code."""
    return _aot_code_digest(pipe.vae, pipe.vae.decoder.conv_in.weight, "vae-decoder")


def _mode_argument(mode: str) -> str | None:
    return None if mode == "default" else mode


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.no_grad()
def _run_dummy_generation(
    pipe: Any, width: int, height: int, batch: int, steps: int, device: torch.device, cfg: bool = True
) -> None:
    """One short text-to-image call with the shapes and dtypes a real job of that size has, with classifier-free
    guidance (``cfg``: the UNet sees 2 x ``batch``) or without (guidance 0: ``batch``)."""
    latents = _run_dummy_call(pipe, batch, steps, device, cfg, width=width, height=height)
    vae = pipe.vae
    vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run_dummy_refinement(
    pipe: Any, width: int, height: int, batch: int, steps: int, device: torch.device, cfg: bool = True
) -> None:
    """One short refiner call as the engine makes it (:meth:`worker.generation.stages.StageRunner.refine`): img2img
    from latents of a ``width`` x ``height`` image, the refiner's prompt embeddings, aesthetic-score conditioning.
    No decode: the VAE is the base's, warmed with it."""
    shape = (batch, pipe.unet.config.in_channels, height // 8, width // 8)
    image = torch.zeros(shape, dtype=pipe.text_encoder_2.dtype, device=device)
    _run_dummy_call(pipe, batch, steps, device, cfg, image=image, strength=1.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_dummy_call(
    pipe: Any, batch: int, steps: int, device: torch.device, cfg: bool, **size_or_image: Any
) -> torch.Tensor:
    """``pipe`` called with zero prompt embeddings of its UNet's width, Euler, seed 0, and ``size_or_image`` (width
    and height for text to image, the latents and strength for img2img); its latents."""
    from diffusers.schedulers import EulerDiscreteScheduler

    dtype = pipe.text_encoder_2.dtype
    embeds = torch.zeros(batch, 77, pipe.unet.config.cross_attention_dim, dtype=dtype, device=device)
    pooled_embeds = torch.zeros(batch, pipe.text_encoder_2.config.projection_dim, dtype=dtype, device=device)
    scheduler = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    try:
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled_embeds,
            negative_prompt_embeds=embeds,
            negative_pooled_prompt_embeds=pooled_embeds,
            **size_or_image,
            num_inference_steps=steps,
            guidance_scale=5.0 if cfg else 0.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        ).images
    finally:
        pipe.scheduler = scheduler


# -- the persistent compile cache ------------------------------------------------------------------------------
