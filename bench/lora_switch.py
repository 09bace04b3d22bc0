"""LoRA benchmark: first load, cached switch, denoising overhead, bit-identity, and torch.compile behaviour.

Prints one JSON object per line. Run:

* ``python bench/lora_switch.py`` (dev architecture on CPU, rank 4, under a minute): checks the logic.
* ``python bench/lora_switch.py --full-size --device cuda --offload --compile`` (about 4 minutes on an
  H100): SDXL base 1.0's architecture with random fp16 weights (bench/fullsize.py, no checkpoint) and
  four random rank-32 LoRAs of realistic size (attention, feed-forward and projections of every
  transformer block plus both text encoders' attention and MLP, ~218 MB each in fp16; three in
  diffusers format, one in Kohya format), saved as safetensors.
* ``python bench/lora_switch.py --full-size --device cpu --dtype fp16 --no-denoise`` (sanity of the
  full-size load and switch path on CPU; slow).

Measured through :class:`worker.adapters.lora.manager.LoraManager`, the worker's own code path: first load (read +
sha256, convert + check, peft injection), cached switch between LoRA sets (target <= 0.2 s), UNet
denoising time with 0/1/3 active adapters merged into the UNet's weights (``LORA_FUSE=1``, the worker's
default) and as peft layers (``LORA_FUSE=0``), that a job without LoRAs after LoRA jobs gives bit-identical
latents in both modes; ``--offload``: loading under
``enable_model_cpu_offload`` keeps the hooks and exactness; ``--compile``: graphs compiled when
switching LoRAs under torch.compile (regional, as ``compile_repeated_blocks``), with the worker's
merging and with diffusers' LoRA hotswap (``enable_lora_hotswap`` + ``hotswap=True``), and whether
dynamo hits its recompile limit (after which it silently runs that code eagerly).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: python bench/lora_switch.py


def emit(**record: Any) -> None:
    print(json.dumps(record, default=str), flush=True)


class Clock:
    def __init__(self, device: str) -> None:
        self.device = device

    def now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


# -- a pipeline with random weights, from the shipped configs ---------------------------------------------------------


def build_pipeline(config: str, device: str, dtype: torch.dtype) -> Any:
    """SDXL pipeline of architecture ``config`` with random weights (bench/fullsize.py), no checkpoint needed."""
    from bench.fullsize import build_random_pipeline

    return build_random_pipeline(config, device=device, dtype=dtype)


# -- LoRAs ------------------------------------------------------------------------------------------------------------


def make_loras(pipe: Any, folder: Path, rank: int, realistic: bool, device: str) -> dict[str, dict[str, Any]]:
    """Four random LoRAs: a, b, c in diffusers format, d in Kohya format (the same layers)."""
    from model_build.dev_lora import (
        TEXT_ATTENTION_TARGETS,
        TEXT_KOHYA_TARGETS,
        UNET_ATTENTION_TARGETS,
        UNET_KOHYA_TARGETS,
        random_lora,
        save_diffusers_lora,
        save_kohya_lora,
    )

    unet_targets = UNET_KOHYA_TARGETS if realistic else UNET_ATTENTION_TARGETS
    text_targets = TEXT_KOHYA_TARGETS if realistic else TEXT_ATTENTION_TARGETS
    made = {}
    for index, name in enumerate(("a", "b", "c", "d")):
        started = time.perf_counter()
        lora = random_lora(
            pipe,
            rank=rank,
            alpha=rank / 2,
            seed=100 + index,
            strength=0.05,
            unet_targets=unet_targets,
            text_targets=text_targets,
            dtype=torch.float16,
            device=device,
        )
        path = folder / f"{name}.safetensors"
        if name == "d":
            save_kohya_lora(lora, pipe, path)
        else:
            save_diffusers_lora(lora, path)
        made[name] = {
            "path": path,
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "layers": {component: len(part) // 2 for component, part in lora.layers.items()},
            "make_s": round(time.perf_counter() - started, 2),
        }
    return made


def adapter_of(manager: Any, label: str) -> Any:
    """The manager's loaded adapter for the LoRA named ``label``."""
    return next(adapter for adapter in manager._loaded.values() if adapter.source.label == label)


def request(*pairs: tuple[str, float]) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=name, scale=scale) for name, scale in pairs]


# -- denoising --------------------------------------------------------------------------------------------------------


def encode(pipe: Any, device: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        embeds = pipe.encode_prompt("a lighthouse on a cliff at dawn", device=device, do_classifier_free_guidance=True)
    keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(keys, embeds, strict=True))


def denoise(pipe: Any, embeds: dict[str, torch.Tensor], steps: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        return pipe(
            **embeds,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=7.0,
            generator=generator,
            output_type="latent",
        ).images


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaN-safe, unlike torch.equal on floats)."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.contiguous().view(integer), b.contiguous().view(integer))


def timed_denoise(
    clock: Clock, pipe: Any, embeds: dict, steps: int, size: int, repeats: int
) -> tuple[float, torch.Tensor]:
    timings, latents = [], None
    for _ in range(repeats):
        started = clock.now()
        latents = denoise(pipe, embeds, steps, size)
        timings.append(clock.now() - started)
    return statistics.median(timings), latents


# -- torch.compile ----------------------------------------------------------------------------------------------------


class _RecompileLimitCounter(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past it, dynamo silently runs that code eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage():
            self.hits += 1


LIMIT_COUNTER = _RecompileLimitCounter()


def compile_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "limit_hits": LIMIT_COUNTER.hits}


def compile_check(args: argparse.Namespace, clock: Clock, pipe: Any, manager: Any, loras: dict, device: str) -> None:
    """Recompilations caused by switching LoRAs: the worker's merging (LORA_FUSE=1) vs diffusers' hotswap.

    Reuses the benchmark's pipeline and manager (a, b, c, d loaded) to save building another full-size one.
    """
    import torch._dynamo

    steps, size = 2, args.compile_size
    logging.getLogger("torch._dynamo").addHandler(LIMIT_COUNTER)
    emit(event="compile", case="settings", recompile_limit=torch._dynamo.config.recompile_limit, size=size, steps=steps)

    def run(label: str, pipe: Any, embeds: dict, **extra: Any) -> None:
        before = compile_counts()
        started = clock.now()
        denoise(pipe, embeds, steps, size)
        after = compile_counts()
        emit(
            event="compile",
            case=label,
            seconds=round(clock.now() - started, 3),
            new_graphs=after["graphs"] - before["graphs"],
            recompile_limit_hits=after["limit_hits"] - before["limit_hits"],
            **extra,
        )

    def load_unet_part(pipe: Any, name: str, hotswap: bool) -> None:
        # diffusers refuses hotswap for text encoders; the UNet is what gets compiled, so only its part is swapped.
        state_dict, alphas, metadata = pipe.lora_state_dict(
            str(loras[name]["path"]), unet_config=pipe.unet.config, return_lora_metadata=True
        )
        unet_metadata = {k: v for k, v in (metadata or {}).items() if k.startswith("unet.")} or None
        pipe.load_lora_into_unet(
            state_dict,
            network_alphas=alphas,
            unet=pipe.unet,
            adapter_name="slot",
            metadata=None if alphas else unet_metadata,
            _pipeline=pipe,
            hotswap=hotswap,
        )

    # 1. The worker's way (adapters stay loaded; activation merges the job's into the UNet's weights, restored
    # exactly afterwards), UNet compiled regionally.
    torch._dynamo.reset()
    embeds = encode(pipe, device)
    manager.activate(request(("a", 1.0)))
    pipe.unet.compile_repeated_blocks(fullgraph=False, dynamic=False)
    run("worker (merged): first run, a@1.0", pipe, embeds, mode="merged")
    run("worker (merged): same again", pipe, embeds, mode="merged")
    for label, lora_request in (
        ("switch to b@1.0", request(("b", 1.0))),
        ("a@0.5 (scale change)", request(("a", 0.5))),
        ("a+b", request(("a", 1.0), ("b", 1.0))),
        ("no LoRA", request()),
        ("back to a@1.0", request(("a", 1.0))),
    ):
        switch_started = clock.now()
        manager.activate(lora_request)
        switch_s = clock.now() - switch_started
        run(f"worker (merged): {label}", pipe, embeds, mode="merged", switch_s=round(switch_s, 4))

    # 2. diffusers' hotswap: one adapter slot, weights replaced in place, scaling kept as tensors.
    manager.clear()
    pipe.unload_lora_weights()  # no LoRA layers left: hotswap must be prepared before the first adapter
    torch._dynamo.reset()
    embeds = encode(pipe, device)
    pipe.unet.enable_lora_hotswap(target_rank=args.rank)
    started = clock.now()
    load_unet_part(pipe, "a", hotswap=False)
    emit(event="compile", case="hotswap: first load a (not compiled yet)", seconds=round(clock.now() - started, 3))
    pipe.unet.compile_repeated_blocks(fullgraph=False, dynamic=False)
    run("hotswap: first run, a", pipe, embeds, mode="hotswap")
    for name in ("b", "d", "a"):
        started = clock.now()
        load_unet_part(pipe, name, hotswap=True)
        swap_s = clock.now() - started
        run(f"hotswap: swap to {name}", pipe, embeds, mode="hotswap", swap_s=round(swap_s, 4))


def offload_check(args: argparse.Namespace, clock: Clock, device: str, dtype: torch.dtype) -> None:
    """With enable_model_cpu_offload (the engine's low-memory plan): loading keeps the hooks, results stay exact."""
    from worker.adapters.lora.layers import offload_mode as _offload_mode
    from worker.adapters.lora.manager import LoraManager
    from worker.adapters.lora.sources import LoraSettings

    pipe = build_pipeline(args.config, device, dtype)
    pipe.enable_model_cpu_offload()
    embeds = encode(pipe, device)
    size = args.compile_size
    fresh = denoise(pipe, embeds, 2, size)
    manager = LoraManager(pipe, settings=LoraSettings(roots=(args.lora_dir,), cache_size=8, cache_mb=1e6))
    started = clock.now()
    manager.activate(request(("a", 1.0)))
    load_s = clock.now() - started
    hooks_after_load = _offload_mode(pipe)
    with_lora = denoise(pipe, embeds, 2, size)
    manager.activate(request())
    after = denoise(pipe, embeds, 2, size)
    emit(
        event="offload",
        load_s=round(load_s, 3),
        hooks_after_load=hooks_after_load,
        lora_changes_output=not bit_equal(with_lora, fresh),
        no_lora_after_equals_fresh=bit_equal(after, fresh),
        lora_device=str(_lora_parameter_device(pipe.unet)),
    )
    del manager, pipe
    _free(device)


def _lora_parameter_device(model: torch.nn.Module) -> torch.device | None:
    return next((p.device for name, p in model.named_parameters() if "lora_A" in name), None)


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# -- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="SDXL base architecture, rank-32 realistic LoRAs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (32 full-size, 4 dev)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (20 full-size, 3 dev)")
    parser.add_argument("--size", type=int, default=None, help="image side (1024 full-size, 256 dev)")
    parser.add_argument("--repeats", type=int, default=None, help="timed denoising runs per case (median)")
    parser.add_argument("--switches", type=int, default=10, help="cached switches timed")
    parser.add_argument("--no-denoise", action="store_true", help="only load and switch timings")
    parser.add_argument("--dtype", choices=("auto", "fp16", "fp32"), default="auto", help="auto: fp16 on cuda")
    parser.add_argument(
        "--compile", action="store_true", help="count recompilations when switching under torch.compile"
    )
    parser.add_argument("--compile-size", type=int, default=None, help="image side for the compile/offload checks")
    parser.add_argument("--diagnose-idle", action="store_true", help="where the no-LoRA time goes after LoRA jobs")
    parser.add_argument("--offload", action="store_true", help="check loading under enable_model_cpu_offload (cuda)")
    parser.add_argument("--lora-dir", type=Path, default=None, help="where the random LoRAs are written")
    args = parser.parse_args(argv)
    full = args.full_size
    args.config = "sdxl_base" if full else "dev_tiny"
    args.rank = args.rank or (32 if full else 4)
    args.steps = args.steps or (20 if full else 3)
    args.size = args.size or (1024 if full else 128)
    args.repeats = args.repeats or 2
    args.compile_size = args.compile_size or (512 if full else 64)
    args.lora_dir = args.lora_dir or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    return args


def main(argv: list[str] | None = None) -> None:
    import diffusers
    import peft
    import transformers

    from worker.adapters.lora.manager import LoraManager
    from worker.adapters.lora.sources import LoraSettings

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    args = parse_args(argv)
    device = args.device
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    clock = Clock(device)
    emit(
        event="config",
        architecture=args.config,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        dtype=str(dtype),
        rank=args.rank,
        steps=args.steps,
        size=args.size,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        peft=peft.__version__,
        transformers=transformers.__version__,
    )

    started = clock.now()
    pipe = build_pipeline(args.config, device, dtype)
    emit(event="pipeline", build_s=round(clock.now() - started, 2))

    started = clock.now()
    loras = make_loras(pipe, args.lora_dir, args.rank, realistic=args.full_size, device=device)
    emit(
        event="loras",
        seconds=round(clock.now() - started, 2),
        **{k: {**v, "path": str(v["path"])} for k, v in loras.items()},
    )

    denoise_enabled = not args.no_denoise
    embeds = encode(pipe, device) if denoise_enabled else {}
    timings: dict[str, float] = {}
    if denoise_enabled:
        denoise(pipe, embeds, 1, args.size)  # warm-up (cuDNN/cuBLAS choices, allocator)
        timings["fresh"], fresh_latents = timed_denoise(clock, pipe, embeds, args.steps, args.size, args.repeats)

    settings = LoraSettings(roots=(args.lora_dir,), cache_size=8, cache_mb=1e6)
    manager = LoraManager(pipe, settings=settings)

    # First loads: each file read, hashed, converted, checked, injected.
    for name in ("a", "b", "c", "d"):
        started = clock.now()
        report = manager.activate(request((name, 1.0)))[0]
        seconds = clock.now() - started
        adapter = adapter_of(manager, name)
        emit(
            event="first_load",
            lora=name,
            format=report["format"],
            seconds=round(seconds, 3),
            **{key: round(value, 3) for key, value in adapter.phases.items()},
            adapter_mb=round(adapter.param_bytes / 2**20, 1),
        )

    # Cached switches between LoRA sets (no disk read, only activation), and the denoising cost of active LoRAs:
    # merged into the UNet's weights (LORA_FUSE=1, the default) and as peft layers (LORA_FUSE=0).
    sets = [
        request(("a", 1.0)),
        request(("b", 0.8)),
        request(("a", 0.7), ("b", 0.5), ("c", 1.0)),
        request(),
        request(("d", 1.0)),
    ]
    for mode, fuse in (("merged", True), ("peft_layers", False)):
        manager.settings = replace(settings, fuse_unet=fuse)
        manager.activate(request())
        switch_times = []
        for index in range(args.switches):
            lora_request = sets[index % len(sets)]
            started = clock.now()
            report = manager.activate(lora_request)
            switch_times.append(clock.now() - started)
            assert all(entry.get("cache_hit") for entry in report), report
        emit(
            event="cached_switch",
            mode=mode,
            count=len(switch_times),
            median_s=round(statistics.median(switch_times), 4),
            max_s=round(max(switch_times), 4),
            target_s=0.2,
            adapters_loaded=len(manager.loaded()),
        )
        if not denoise_enabled:
            continue
        cases = {
            "0 active (4 loaded)": request(),
            "1 active": request(("a", 1.0)),
            "3 active": request(("a", 0.7), ("b", 0.5), ("c", 1.0)),
        }
        for label, lora_request in cases.items():
            manager.activate(lora_request)
            timings[f"{label}, {mode}"], latents = timed_denoise(
                clock, pipe, embeds, args.steps, args.size, args.repeats
            )
            if label.startswith("0 active"):
                emit(
                    event="bit_identity",
                    mode=mode,
                    no_lora_after_lora_jobs_equals_fresh=bit_equal(latents, fresh_latents),
                )
        manager.activate(request())
        _, after = timed_denoise(clock, pipe, embeds, args.steps, args.size, 1)
        emit(event="bit_identity", mode=f"{mode}, after its LoRA jobs", equals_fresh=bit_equal(after, fresh_latents))

    if denoise_enabled and args.diagnose_idle:
        # Where does the "0 active" time go? Count peft wrappers still reachable, time again.
        from peft.tuners.tuners_utils import BaseTunerLayer

        manager.activate(request())
        reachable = sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
        again, _ = timed_denoise(clock, pipe, embeds, args.steps, args.size, 3)
        fresh_order, _ = timed_denoise(clock, pipe, embeds, args.steps, args.size, 3)
        emit(
            event="idle_diagnosis",
            wrappers_reachable_in_unet=reachable,
            zero_active_again_s=round(again, 3),
            zero_active_third_s=round(fresh_order, 3),
            hooks=sorted({type(m._forward_hooks).__name__ for m in pipe.unet.modules() if m._forward_hooks}),
            forward_pre_hooks=sum(len(m._forward_pre_hooks) for m in pipe.unet.modules()),
            forward_hooks=sum(len(m._forward_hooks) for m in pipe.unet.modules()),
        )
    manager.settings = settings
    if denoise_enabled:
        base = timings["fresh"]
        emit(
            event="denoise",
            steps=args.steps,
            size=args.size,
            repeats=args.repeats,
            seconds={label: round(value, 3) for label, value in timings.items()},
            overhead_vs_fresh={label: f"{(value / base - 1) * 100:+.1f}%" for label, value in timings.items()},
        )

    if args.compile:
        compile_check(args, clock, pipe, manager, loras, device)
    del manager, pipe
    _free(device)
    if args.offload:
        offload_check(args, clock, device, dtype)
    emit(event="done")


if __name__ == "__main__":
    main()
