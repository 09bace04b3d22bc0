"""worker.generation.acceleration on the CPU: option checks, settings mapping, exact timestep handling, the cache
file's edges.

Compilation itself is measured on the GPU (bench/engine_speed.py); here only what must hold without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.fullsize import build_random_pipeline
from core.settings import load_settings
from worker.generation.acceleration import (
    SpeedupOptions,
    _FloatTimestepUNet,
    apply_speedups,
    options_from_settings,
)
from worker.generation.compile_cache import compile_cache_file, compile_cache_key, load_compile_cache


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("dev_tiny", "cpu", torch.float32)


def test_bad_options_name_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"compile='yes'.*off, unet, regional"):
        SpeedupOptions(compile="yes")
    with pytest.raises(ValueError, match=r"vae_dtype='int8'"):
        SpeedupOptions(vae_dtype="int8")
    with pytest.raises(ValueError, match=r"compile_mode='fast'"):
        SpeedupOptions(compile_mode="fast")


def test_settings_map_to_options(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "COMPILE": "regional",
            "COMPILE_MODE": "max-autotune-no-cudagraphs",
            "COMPILE_CACHE_DIR": str(tmp_path),
            "WARMUP_SIZES": "1024x1024,832x1216",
            "WARMUP_BATCH_SIZES": "1,4",
            "VAE_DTYPE": "bf16",
            "CHANNELS_LAST": "0",
        }
    )
    options = options_from_settings(settings)
    assert options.compile == "regional" and options.compile_mode == "max-autotune-no-cudagraphs"
    assert options.cache_dir == tmp_path and options.vae_dtype == "bf16" and not options.channels_last
    assert options.warmup_sizes == ((1024, 1024), (832, 1216)) and options.warmup_batch_sizes == (1, 4)
    defaults = options_from_settings(load_settings({}))
    assert defaults.compile == "off" and defaults.vae_dtype is None and not defaults.compiles


def test_defaults_on_the_cpu_change_nothing(pipe) -> None:
    before = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    accelerator = apply_speedups(pipe, SpeedupOptions())
    report = accelerator.warm_up()
    assert accelerator.applied == [] and accelerator.frozen
    assert report.shapes == [] and report.cache_file is None
    assert pipe.unet.conv_in.weight.is_contiguous()  # channels_last is for CUDA only
    assert all(torch.equal(before[name], tensor) for name, tensor in pipe.unet.state_dict().items())


def test_float32_timesteps_are_exact_for_integer_schedules(pipe) -> None:
    """DDIM/DPM++ pass int64 timesteps, Euler float32: the compiled UNet sees float32, with the same result."""
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    sample = torch.randn(2, config.in_channels, 32, 32, generator=generator)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text_embeds, generator=generator),
            "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2),
        },
        "return_dict": False,
    }
    wrapped = _FloatTimestepUNet(unet.forward)  # the eager forward in place of the compiled one
    with torch.no_grad():
        for timestep in (999, 501, 1):
            reference = unet(sample, torch.tensor(timestep, dtype=torch.int64), **kwargs)[0]
            assert torch.equal(wrapped(sample, torch.tensor(timestep, dtype=torch.int64), **kwargs)[0], reference)
            assert torch.equal(wrapped(sample, timestep, **kwargs)[0], reference)


def test_cache_key_follows_options_and_dtype(pipe, tmp_path: Path) -> None:
    unet_compile = SpeedupOptions(compile="unet", cache_dir=tmp_path)
    regional = SpeedupOptions(compile="regional", cache_dir=tmp_path)
    assert compile_cache_key(pipe, unet_compile) != compile_cache_key(pipe, regional)
    # where the cache lives is not part of what the compiled code depends on
    assert compile_cache_key(pipe, unet_compile) == compile_cache_key(pipe, SpeedupOptions(compile="unet"))
    assert compile_cache_file(pipe, SpeedupOptions(compile="unet")) is None
    assert compile_cache_file(pipe, unet_compile).parent == tmp_path


def test_missing_or_foreign_cache_files_are_a_miss_not_an_error(tmp_path: Path) -> None:
    assert load_compile_cache(tmp_path / "absent.bin") == (False, 0.0, 0)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"not torch cache artifacts")
    hit, _, size = load_compile_cache(foreign)
    assert not hit and size == len(b"not torch cache artifacts")


def test_a_failed_warm_up_leaves_an_eager_worker_not_a_dead_one(tmp_path: Path) -> None:
    """Compilation that fails at start-up (here: a warm-up shape the pipeline refuses) is reported, then ignored."""
    pipe = build_random_pipeline("dev_tiny", "cpu", torch.float32)
    accelerator = apply_speedups(pipe, SpeedupOptions(compile="unet", warmup_sizes=((100, 100),), cache_dir=tmp_path))
    try:
        report = accelerator.warm_up(steps=1)
        assert report.error is not None and "100" in report.error
        assert accelerator.describe()["compile_error"] == report.error
        assert list(tmp_path.iterdir()) == []  # nothing half-compiled is saved for the next start
        with torch.no_grad():
            latents = pipe(
                prompt="a cat",
                width=256,
                height=256,
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images
        assert torch.isfinite(latents).all()
    finally:
        torch.compiler.set_stance("default")  # the stance is process-wide; later tests expect the default


def test_warmup_guidance_chooses_the_unet_batches_compiled(pipe) -> None:
    """WARMUP_GUIDANCE=both warms the CFG batch (2 per image) and the guidance-0 batch (1 per image): the real
    dummy generation is run here eagerly and the UNet's batch recorded on each call."""
    settings = load_settings({"WARMUP_GUIDANCE": "both", "WARMUP_SIZES": "64x64", "WARMUP_BATCH_SIZES": "1,2"})
    options = options_from_settings(settings)
    assert options.warmup_calls() == [
        {"width": 64, "height": 64, "batch": batch, "cfg": cfg} for batch in (1, 2) for cfg in (True, False)
    ]
    assert [call["cfg"] for call in SpeedupOptions().warmup_calls()] == [True]
    assert [call["cfg"] for call in SpeedupOptions(warmup_guidance="none").warmup_calls()] == [False]
    with pytest.raises(ValueError, match=r"warmup_guidance='off'.*cfg, none, both"):
        SpeedupOptions(warmup_guidance="off")

    from worker.generation.acceleration import _run_dummy_generation

    unet_batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _module, args: unet_batches.append(args[0].shape[0]))
    try:
        for call in options.warmup_calls():
            _run_dummy_generation(pipe, steps=1, device=torch.device("cpu"), **call)
    finally:
        hook.remove()
    assert unet_batches == [2, 1, 4, 2]


def test_regional_compile_reaches_the_refiner_and_its_job_needs_no_new_graph(
    dev_model_dir: Path, dev_refiner_dir: Path, tmp_path: Path
) -> None:
    """COMPILE=regional (seconds on the CPU) on a worker with a refiner: the refiner's transformer blocks are compiled
    at the warm-up shape, and a refiner job there runs them under ``fail_on_recompile``, which raises if any call
    would need code that was not compiled at start-up. COMPILE=aot's refiner package: tests/worker/test_aot_unet.py."""
    from worker.generation.engine import Engine
    from worker.request.schema import GenerationRequest

    settings = load_settings({"COMPILE": "regional", "WARMUP_SIZES": "64x64", "COMPILE_CACHE_DIR": str(tmp_path)})
    engine = Engine(dev_model_dir, refiner_dir=dev_refiner_dir, settings=settings)
    refiner = engine.refiner_accelerator
    assert refiner.applied == ["compile_regional:default"] and refiner.frozen
    assert refiner.report.error is None and refiner.report.graphs_compiled > 0
    job = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=3, seed=7, strength=0.5)
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            result = engine.generate(job.model_copy(update={"refiner_inference_steps": 4}))
    finally:
        engine.accelerator.freeze()  # the process-wide stance the worker serves with
    assert result.images and engine.uses_refiner(job)
