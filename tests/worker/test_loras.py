"""LoRAs on the dev model, end to end: effects, formats, scales, combination, cache, isolation, refusals.

Every LoRA here is made in the test (random peft weights for the tiny UNet and text encoders), saved
as diffusers' training scripts and as Kohya's sd-scripts save them. Equalities are exact (pixel
bytes, torch.equal): "no LoRA after LoRA jobs" must be the fresh worker's image bit for bit.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.errors import LoraFailed
from core.settings import load_settings
from model_build.dev_lora import (
    TEXT_ENCODERS,
    TEXT_KOHYA_TARGETS,
    UNET_KOHYA_TARGETS,
    random_lora,
    save_diffusers_lora,
    save_kohya_lora,
)
from worker.adapters.lora import cache as lora_cache
from worker.adapters.lora.manager import LoraManager
from worker.adapters.lora.sources import LoraSettings
from worker.generation.engine import Engine
from worker.handler import Worker
from worker.output.images import read_parameters
from worker.request.schema import GenerationRequest

JOB = {"prompt": "a lighthouse at dawn", "height": 256, "width": 256, "num_inference_steps": 2, "seed": 7}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """The dev model's ops are tiny: one thread is as fast, and it stays fast on a busy machine, where two OpenMP
    threads spin-wait for each other (measured here: 0.1 s vs 0.3-27 s per 64x64 run under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_pipeline(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kohya_pair(name: str, fan_in: int, fan_out: int, rank: int = 4, conv: bool = False) -> dict[str, torch.Tensor]:
    shape = (rank, fan_in, 1, 1) if conv else (rank, fan_in)
    up = (fan_out, rank, 1, 1) if conv else (fan_out, rank)
    return {
        f"{name}.lora_down.weight": torch.randn(shape),
        f"{name}.lora_up.weight": torch.randn(up),
        f"{name}.alpha": torch.tensor(float(rank)),
    }


def sd15_kohya_lora() -> dict[str, torch.Tensor]:
    """What Kohya writes for an SD 1.5 UNet: diffusers-style block names and 768-wide cross-attention."""
    block = "lora_unet_down_blocks_0_attentions_0"
    return {
        **kohya_pair(f"{block}_proj_in", 320, 320, conv=True),
        **kohya_pair(f"{block}_transformer_blocks_0_attn1_to_q", 320, 320),
        **kohya_pair(f"{block}_transformer_blocks_0_attn2_to_k", 768, 320),
        **kohya_pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", 768, 1280),
    }


def save_with_first_byte_0x80(source: Path, target: Path) -> None:
    """``source`` saved again with metadata padded until the header length's low byte, the file's first, is 0x80."""
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {}
    for pad in range(300):
        save_file(tensors, str(target), metadata={**metadata, "padding": "x" * pad})
        if target.read_bytes()[:1] == b"\x80":
            return
    raise AssertionError("no padding gives a header length whose low byte is 0x80")


@pytest.fixture(scope="module")
def lora_dir(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline(dev_model_dir)
    # alpha != rank: the diffusers file carries it as LoraConfig metadata, the Kohya file as per-layer alphas.
    style = random_lora(pipe, rank=4, alpha=2, seed=1, unet_targets=UNET_KOHYA_TARGETS, text_targets=TEXT_KOHYA_TARGETS)
    save_diffusers_lora(style, root / "style.safetensors")
    save_kohya_lora(style, pipe, root / "kohya" / "style.safetensors")  # the same weights, Kohya's names
    save_diffusers_lora(random_lora(pipe, rank=8, seed=2, components=("unet",)), root / "detail.safetensors")
    save_diffusers_lora(random_lora(pipe, rank=4, seed=3, components=TEXT_ENCODERS), root / "words.safetensors")

    torch.manual_seed(0)
    save_file(sd15_kohya_lora(), root / "sd15.safetensors")
    # SD 1.x names its one text encoder lora_te_; the shapes fit the dev model's first text encoder, so only the
    # prefix tells that it was made for another model (diffusers would apply it to SDXL's CLIP-L).
    width = pipe.text_encoder.config.hidden_size
    sd15_text = kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", width, width)
    save_file(sd15_text, root / "sd15-te.safetensors")
    save_with_first_byte_0x80(root / "style.safetensors", root / "style-0x80.safetensors")
    flux_key = "transformer.single_transformer_blocks.0.attn.to_q"
    save_file(
        {f"{flux_key}.lora_A.weight": torch.randn(4, 64), f"{flux_key}.lora_B.weight": torch.randn(64, 4)},
        root / "flux.safetensors",
    )
    dora = random_lora(pipe, rank=4, seed=4, components=("unet",))
    save_kohya_lora(
        dora,
        pipe,
        root / "dora.safetensors",
        # LyCORIS' wd_on_out DoRA (magnitudes per output channel): no reference applies it (see test_lycoris.py).
        extra={"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale": torch.ones(64, 1)},
    )
    torch.save({"weight": torch.ones(2)}, root / "disguised.safetensors")  # a pickle with a safetensors name
    data = (root / "style.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"weight": torch.ones(2)}, root / "legacy.ckpt")
    outside = tmp_path_factory.mktemp("outside") / "stolen.safetensors"
    outside.write_bytes(data)
    (root / "escape.safetensors").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path, lora_dir: Path) -> SimpleNamespace:
    """An engine whose LoRA folder is ``lora_dir``, and its images from before any LoRA job (a fresh worker)."""
    engine = Engine(dev_model_dir, settings=load_settings({"LORA_DIR": str(lora_dir)}))
    state = SimpleNamespace(engine=engine, references={})
    state.fresh = pixels(state)
    return state


def generate(worker: SimpleNamespace, *loras: tuple[str, float]):
    request = GenerationRequest(**JOB, loras=[{"name": name, "scale": scale} for name, scale in loras])
    return worker.engine.generate(request)


def pixels(worker: SimpleNamespace, *loras: tuple[str, float]) -> bytes:
    return generate(worker, *loras).images[0].tobytes()


def reference(worker: SimpleNamespace, *loras: tuple[str, float]) -> bytes:
    """The image for ``loras``, made once per module (for comparisons, not for checking determinism)."""
    if loras not in worker.references:
        worker.references[loras] = pixels(worker, *loras)
    return worker.references[loras]


# -- through the engine -----------------------------------------------------------------------------------------------


def test_a_lora_changes_the_image_and_says_what_was_applied(worker, lora_dir: Path, monkeypatch) -> None:
    result = generate(worker, ("style", 0.8))
    assert result.images[0].tobytes() != worker.fresh
    (entry,) = result.metadata.stable["loras"]
    assert entry["name"] == "style" and entry["scale"] == 0.8 and entry["active"] is True
    assert entry["format"] == "diffusers" and entry["components"] == ["unet", *TEXT_ENCODERS]
    assert entry["path"] == str((lora_dir / "style.safetensors").resolve())
    assert entry["sha256"] == hashlib.sha256((lora_dir / "style.safetensors").read_bytes()).hexdigest()[:12]
    (cache,) = result.metadata.volatile["cache"]["loras"]
    assert cache == {"name": "style", "cache_hit": False, "load_s": cache["load_s"]} and cache["load_s"] > 0
    json.dumps(result.metadata.stable["loras"])  # goes into the job's JSON output as is
    worker.references[(("style", 0.8),)] = result.images[0].tobytes()

    reads = []
    real_read = lora_cache.read_lora_file
    monkeypatch.setattr(lora_cache, "read_lora_file", lambda *args: reads.append(args) or real_read(*args))
    (again,) = worker.engine.loras.activate(GenerationRequest(**JOB, loras=[{"name": "style", "scale": 0.8}]).loras)
    assert again.cache_hit is True and again.volatile()["load_s"] == 0.0
    assert reads == []  # a cached LoRA costs no disk read


def test_kohya_file_gives_the_same_image_as_the_diffusers_file(worker) -> None:
    result = generate(worker, ("kohya/style", 0.8))
    assert result.metadata.stable["loras"][0]["format"] == "kohya"
    assert result.metadata.stable["loras"][0]["components"] == ["unet", *TEXT_ENCODERS]
    assert result.images[0].tobytes() == reference(worker, ("style", 0.8))


def test_a_safetensors_file_whose_first_byte_is_0x80_is_a_lora_not_a_pickle(worker, lora_dir: Path) -> None:
    # The first byte is the low byte of the header length: 0x80 in about one safetensors file in 32.
    assert (lora_dir / "style-0x80.safetensors").read_bytes()[:1] == b"\x80"
    result = generate(worker, ("style-0x80", 0.8))
    assert result.images[0].tobytes() == reference(worker, ("style", 0.8))


def test_text_encoder_lora_acts_through_the_prompt(worker) -> None:
    result = generate(worker, ("words", 1.0))
    assert result.metadata.stable["loras"][0]["components"] == list(TEXT_ENCODERS)
    assert result.images[0].tobytes() not in (worker.fresh, reference(worker, ("style", 0.8)))


def test_no_lora_after_lora_jobs_is_byte_identical_to_a_fresh_worker(worker) -> None:
    combined = generate(worker, ("style", 0.8), ("detail", -1.5), ("words", 0.5))
    assert [entry["name"] for entry in combined.metadata.stable["loras"]] == ["style", "detail", "words"]
    assert combined.images[0].tobytes() not in (worker.fresh, reference(worker, ("style", 0.8)))
    # The same prompt as the text-encoder LoRA jobs: the prompt cache must not hand back their embeddings.
    after = generate(worker)
    assert after.images[0].tobytes() == worker.fresh and after.metadata.stable["loras"] == []


REFUSALS = [
    ("sd15", r"LoRA 'sd15' does not fit this model: .*do not exist.*wrong shape.*made for SD 1\.x"),
    ("flux", r"LoRA 'flux' is not an SDXL LoRA .*transformer model"),
    ("dora", r"LoRA 'dora' cannot be merged: \S+attn1_to_q has DoRA magnitudes per output channel"),
    ("sd15-te", r"LoRA 'sd15-te' was made for another model: 3 of its keys use the text-encoder prefix lora_te_"),
    ("disguised", r"LoRA 'disguised' is a PyTorch zip archive of pickles with a \.safetensors name"),
    ("truncated", r"LoRA 'truncated' is not a valid \.safetensors file"),
    ("legacy.ckpt", r"loras\[1\]\.name: 'legacy\.ckpt' is a pickle file"),
    ("legacy", r"loras\[1\]\.name: 'legacy': only .*legacy\.ckpt exists, a pickle file"),
    ("../style", r"loras\[1\]\.name: '\.\./style' contains '\.\.'"),
    ("/etc/hostname", r"loras\[1\]\.name: '/etc/hostname' is an absolute path"),
    ("escape", r"loras\[1\]\.name: 'escape' is a link that points outside"),
    ("x" * 300, r"loras\[1\]\.name: 'x{40}…' is too long: one part of its file name is 312 bytes"),
    ("nope", r"loras\[1\]\.name: no LoRA named 'nope' in .*; available: .*detail, .*kohya/style, .*style, .*words"),
    (f"hf://someone/repo/x.safetensors@{COMMIT}", r"downloading LoRAs is off on this worker"),
]


@pytest.mark.parametrize(("name", "message"), REFUSALS, ids=[name[:20] for name, _ in REFUSALS])
def test_refusals_are_clear_errors_and_change_nothing(worker, name: str, message: str) -> None:
    loaded_before = worker.engine.loras.loaded()
    with pytest.raises(LoraFailed, match=message):
        generate(worker, ("style", 0.8), (name, 1.0))
    assert sorted(entry["name"] for entry in worker.engine.loras.loaded()) == sorted(e["name"] for e in loaded_before)
    for component in ("unet", *TEXT_ENCODERS):  # nothing half-loaded: no adapter beyond the cached ones
        adapters = set(getattr(getattr(worker.engine.pipe, component), "peft_config", {}) or {})
        assert adapters <= {entry["adapter"] for entry in loaded_before}


def test_after_a_refusal_the_next_jobs_are_unaffected_and_scale_zero_is_no_lora(worker) -> None:
    with pytest.raises(LoraFailed, match="does not fit"):
        generate(worker, ("style", 0.8), ("sd15", 1.0))
    zero = generate(worker, ("style", 0.0))
    assert zero.images[0].tobytes() == worker.fresh
    assert zero.metadata.stable["loras"][0]["active"] is False
    assert "cache_hit" not in zero.metadata.volatile["cache"]["loras"][0]
    # The handler test below runs style@0.8 next and compares it with the image made before any refusal.


def test_handler_returns_lora_errors_and_a1111_parameters(worker) -> None:
    handler_worker = Worker(load_settings({}))
    handler_worker.engine, handler_worker.startup_error = worker.engine, None
    handler = handler_worker.handle
    out = handler({"id": "lora-job", "input": {**JOB, "loras": [{"name": "nope"}]}})
    assert set(out) == {"error"} and out["error"].startswith("lora: loras[0].name: no LoRA named 'nope'")
    assert "available: " in out["error"]

    out = handler({"id": "lora-job", "input": {**JOB, "loras": [{"name": "style", "scale": 0.8}]}})
    assert "error" not in out, out
    png = base64.b64decode(out["images"][0].split(",", 1)[1])
    assert "Lora weights: style: 0.8" in read_parameters(png)
    assert Image.open(io.BytesIO(png)).convert("RGB").tobytes() == reference(worker, ("style", 0.8))
    assert out["metadata"]["loras"][0]["name"] == "style" and out["metadata"]["cache"]["loras"][0]["cache_hit"] is True


# -- the manager on a bare pipeline: combination arithmetic, isolation, the LRU -------------------------------------


@pytest.fixture(scope="module")
def bare(dev_model_dir: Path) -> SimpleNamespace:
    pipe = load_pipeline(dev_model_dir)
    return SimpleNamespace(pipe=pipe, fresh=latents(pipe))


@pytest.fixture
def managers(bare: SimpleNamespace):
    """Makes LoraManagers on the shared bare pipeline; each test leaves the pipeline without adapters."""
    made: list[LoraManager] = []

    def make(root: Path, **settings) -> LoraManager:
        made.append(LoraManager(bare.pipe, settings=LoraSettings(roots=(root,), **settings)))
        return made[-1]

    yield make
    for manager in made:
        manager.clear()
    assert not getattr(bare.pipe.unet, "peft_config", None)


def request(*pairs: tuple[str, float]) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=name, scale=scale) for name, scale in pairs]


def latents(pipe) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(3)
    return pipe("a cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent").images


def test_scales_and_combinations_add_up_in_each_layer(bare, managers, lora_dir: Path) -> None:
    manager = managers(lora_dir)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    x = torch.randn(2, 5, bare.pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = bare.pipe.unet.get_submodule(path)(x)

    def output(*pairs):
        manager.activate(request(*pairs))
        with torch.no_grad():
            return bare.pipe.unet.get_submodule(path)(x)

    style, detail = output(("style", 1.0)) - base, output(("detail", 1.0)) - base
    assert style.abs().mean() > 1e-3 and detail.abs().mean() > 1e-3
    torch.testing.assert_close(output(("style", 0.5)) - base, 0.5 * style)
    torch.testing.assert_close(output(("style", -2.0)) - base, -2.0 * style)
    torch.testing.assert_close(output(("style", 1.0), ("detail", 0.25)) - base, style + 0.25 * detail)
    assert torch.equal(output(), base)  # loaded but not asked for: the base layer alone, exactly


def test_unrequested_adapters_contribute_nothing(bare, managers, lora_dir: Path) -> None:
    manager = managers(lora_dir)
    manager.activate(request(("style", 1.0)))
    style_alone = latents(bare.pipe)
    manager.activate(request(("detail", 1.0), ("words", 1.0)))
    manager.activate(request(("style", 1.0)))
    assert torch.equal(latents(bare.pipe), style_alone) and not torch.equal(style_alone, bare.fresh)
    manager.activate(request(("words", 1.0)))  # text encoders only: the UNet runs its original modules
    assert peft_layers(bare.pipe.unet) == 0 and peft_layers(bare.pipe.text_encoder) > 0
    manager.activate([])
    assert torch.equal(latents(bare.pipe), bare.fresh)
    # Not just equal numbers: the very modules of a fresh pipeline (no peft wrapper left to cost time).
    assert all(peft_layers(getattr(bare.pipe, name)) == 0 for name in ("unet", *TEXT_ENCODERS))


def peft_layers(model: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def test_cache_is_bounded_by_count_and_memory_and_evicts_least_recently_used(bare, managers, lora_dir: Path) -> None:
    manager = managers(lora_dir, cache_size=2)
    for name in ("style", "detail", "words"):
        manager.activate(request((name, 1.0)))
    assert [entry["name"] for entry in manager.loaded()] == ["detail", "words"]
    assert len(bare.pipe.unet.peft_config) == 1  # style's UNet adapter was deleted, detail's remains (words: none)
    assert manager.activate(request(("detail", 1.0)))[0].cache_hit is True
    assert manager.activate(request(("style", 1.0)))[0].cache_hit is False  # reloaded
    assert [entry["name"] for entry in manager.loaded()] == ["detail", "style"]
    sizes = {entry["name"]: entry["mb"] for entry in manager.loaded()}

    # A job may need more adapters than the cache holds; the surplus goes after the job.
    manager.activate(request(("style", 1.0), ("detail", 1.0), ("words", 1.0)))
    assert len(manager.loaded()) == 3
    manager.activate(request(("words", 1.0)))
    assert [entry["name"] for entry in manager.loaded()] == ["detail", "words"]
    manager.clear()
    assert manager.loaded() == [] and not getattr(bare.pipe.unet, "peft_config", None)
    assert peft_layers(bare.pipe.unet) == 0
    assert torch.equal(latents(bare.pipe), bare.fresh)  # after loads and evictions, exactly the fresh model

    small = managers(lora_dir, cache_mb=max(sizes.values()) * 1.2)  # room for style or detail, not both
    small.activate(request(("style", 1.0)))
    small.activate(request(("detail", 1.0)))
    assert [entry["name"] for entry in small.loaded()] == ["detail"] and small.evictions == 1


def test_a_changed_file_is_loaded_again(bare, managers, tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    save_diffusers_lora(random_lora(bare.pipe, seed=10, components=("unet",)), folder / "evolving.safetensors")
    manager = managers(folder)
    manager.activate(request(("evolving", 1.0)))
    first = latents(bare.pipe)
    save_diffusers_lora(random_lora(bare.pipe, seed=11, components=("unet",)), folder / "evolving.safetensors")
    assert manager.activate(request(("evolving", 1.0)))[0].cache_hit is False
    assert not torch.equal(latents(bare.pipe), first)


def test_the_same_file_under_two_names_is_refused(managers, lora_dir: Path) -> None:
    with pytest.raises(LoraFailed, match=r"loras\[1\]\.name: 'style\.safetensors' is the same file as loras\[0\]"):
        managers(lora_dir).activate(request(("style", 1.0), ("style.safetensors", 0.5)))


def test_mlp_only_text_encoder_loras_load_in_both_formats(bare, managers, tmp_path: Path) -> None:
    # diffusers' own text-encoder loader cannot tell the format of a LoRA without q/k/v/out_proj layers.
    mlp = random_lora(bare.pipe, seed=12, components=TEXT_ENCODERS, text_targets=("fc1", "fc2"))
    save_diffusers_lora(mlp, tmp_path / "mlp.safetensors")
    save_kohya_lora(mlp, bare.pipe, tmp_path / "mlp-kohya.safetensors")
    manager = managers(tmp_path)

    def prompt_embeds(*pairs):
        manager.activate(request(*pairs))
        with torch.no_grad():
            return bare.pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)[0]

    plain = prompt_embeds()
    diffusers_file, kohya_file = prompt_embeds(("mlp", 1.0)), prompt_embeds(("mlp-kohya", 1.0))
    assert not torch.equal(diffusers_file, plain) and torch.equal(diffusers_file, kohya_file)
    assert torch.equal(prompt_embeds(), plain)


def test_a_loader_failure_midway_leaves_no_half_loaded_adapter(bare, managers, lora_dir: Path, monkeypatch) -> None:
    # Fault injection: nothing this module lets through makes the text-encoder loader fail, but if it did after the
    # UNet part went in, the UNet part must go too and the model must stay exactly as it was.
    def fail(*args, **kwargs):
        raise RuntimeError("simulated loader failure")

    manager = managers(lora_dir)
    manager.activate(request(("detail", 1.0)))
    monkeypatch.setattr(bare.pipe, "load_lora_into_text_encoder", fail)
    with pytest.raises(LoraFailed, match="LoRA 'style' could not be loaded: RuntimeError: simulated loader failure"):
        manager.activate(request(("style", 1.0)))
    assert [entry["name"] for entry in manager.loaded()] == ["detail"]
    assert list(bare.pipe.unet.peft_config) == [manager.loaded()[0]["adapter"]]
    assert torch.equal(latents(bare.pipe), bare.fresh)  # the failed job left no LoRA active


def test_fast_activation_equals_peft_public_api(bare, managers, lora_dir: Path) -> None:
    # The manager sets peft's layer state directly (~50x faster on a full SDXL); peft's own set_adapters /
    # enable / disable path (the fallback) must give the very same numbers.
    fast = managers(lora_dir)
    jobs = [request(("style", 0.7), ("detail", -1.0)), request(("words", 1.0)), request()]
    expected = []
    for job in jobs:
        fast.activate(job)
        expected.append(latents(bare.pipe))
    fast.activation.fast = False
    for job, result in zip(jobs, expected, strict=True):
        fast.activate(job)
        assert torch.equal(latents(bare.pipe), result)


# -- fused UNet LoRAs (LORA_FUSE=1, the default) ----------------------------------------------------------------------


def unet_inputs(unet: torch.nn.Module) -> dict:
    generator = torch.Generator().manual_seed(5)
    config = unet.config
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(2, config.in_channels, 8, 8, generator=generator),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text_embeds, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        },
        "return_dict": False,
    }


def test_fused_unet_loras_equal_peft_layers_and_restore_bit_for_bit(bare, managers, lora_dir: Path) -> None:
    from dataclasses import replace

    manager = managers(lora_dir)
    weights_before = {name: p.clone() for name, p in bare.pipe.unet.named_parameters()}
    jobs = [
        request(("style", 0.7), ("detail", -1.0)),
        request(("detail", 1.5)),
        request(("words", 1.0), ("style", 0.3)),
    ]
    fused = []
    for job in jobs:
        manager.activate(job)
        assert peft_layers(bare.pipe.unet) == 0  # merged: the UNet runs its own modules, no wrapper per call
        fused.append(latents(bare.pipe))
        assert not torch.equal(fused[-1], bare.fresh)
    manager.activate([])
    assert torch.equal(latents(bare.pipe), bare.fresh)
    for name, parameter in bare.pipe.unet.named_parameters():  # copied back, not subtracted: exact
        assert torch.equal(parameter, weights_before[name]), name

    manager.settings = replace(manager.settings, fuse_unet=False)  # LORA_FUSE=0: peft's layers compute the same
    for job, merged in zip(jobs, fused, strict=True):
        manager.activate(job)
        assert peft_layers(bare.pipe.unet) > 0
        unmerged = latents(bare.pipe)  # the same function up to float32 rounding in another order
        assert float((unmerged - merged).norm() / merged.norm()) < 1e-4
    manager.activate([])
    assert torch.equal(latents(bare.pipe), bare.fresh)


def test_a_repeated_lora_set_is_not_merged_again(bare, managers, lora_dir: Path) -> None:
    manager = managers(lora_dir)
    job = request(("style", 0.7), ("detail", -1.0))
    manager.activate(job)
    first = latents(bare.pipe)
    copies = [original for _, original in manager.fusion.saved["unet"]]  # held: no id is reused while we compare
    manager.activate(job)  # the next job with the same LoRAs and scales: the weights already hold them
    assert all(a is b for (_, a), b in zip(manager.fusion.saved["unet"], copies, strict=True))
    assert torch.equal(latents(bare.pipe), first)
    manager.activate(request(("style", 0.7), ("detail", -0.5)))  # a scale changed: merged afresh
    assert not any(a is b for (_, a), b in zip(manager.fusion.saved["unet"], copies, strict=True))
    manager.activate(job)
    assert torch.equal(latents(bare.pipe), first)
    manager.activate([])
    assert torch.equal(latents(bare.pipe), bare.fresh)


def test_switching_fused_loras_keeps_the_compiled_unet(bare, managers, lora_dir: Path) -> None:
    # The compiled code must read the merged weights at run time (a switch changes the output) and its guards
    # must hold (a switch compiles nothing). A counting backend traces as Inductor would, without code generation.
    from torch._dynamo.testing import CompileCounter

    manager = managers(lora_dir)
    unet = bare.pipe.unet
    inputs = unet_inputs(unet)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(unet.forward, backend=counter, fullgraph=True, dynamic=False)
    outputs = {}
    with torch.no_grad():
        for key, job in (
            ("none", []),
            ("style", request(("style", 1.0))),
            ("both", request(("style", 1.0), ("detail", 0.5))),
            ("again", []),
        ):
            manager.activate(job)
            outputs[key] = compiled(**inputs)[0]
            if key == "both":
                eager_both = unet(**inputs)[0]
    torch._dynamo.reset()
    assert counter.frame_count == 1  # one compilation for every LoRA combination
    assert not torch.equal(outputs["style"], outputs["none"]) and not torch.equal(outputs["both"], outputs["style"])
    torch.testing.assert_close(outputs["both"], eager_both)
    assert torch.equal(outputs["again"], outputs["none"])


def test_conv_loras_merge_as_peft_runs_them_and_every_weight_comes_back(bare, managers, tmp_path: Path) -> None:
    # LoCon-style LoRAs adapt the resnets' convolutions: a k x k conv down and a 1 x 1 conv up, merged into 4-D
    # weights. Last in this module: on the CPU, oneDNN may pick another summation order for some later calls
    # once convolutions of new shapes have run (same inputs and weights, other last bits), so this test compares
    # weights exactly and outputs to a tolerance.
    from dataclasses import replace

    locon = random_lora(bare.pipe, rank=4, seed=9, unet_targets=("conv1", "conv2"), components=("unet",))
    assert any(tensor.ndim == 4 for tensor in locon.layers["unet"].values())
    save_diffusers_lora(locon, tmp_path / "locon.safetensors")
    manager = managers(tmp_path)
    weights_before = {name: p.clone() for name, p in bare.pipe.unet.named_parameters()}
    manager.activate(request(("locon", 0.8)))
    assert peft_layers(bare.pipe.unet) == 0
    merged = latents(bare.pipe)
    assert float((merged - bare.fresh).norm() / bare.fresh.norm()) > 1e-3  # it did something
    manager.activate([])
    for name, parameter in bare.pipe.unet.named_parameters():
        assert torch.equal(parameter, weights_before[name]), name
    manager.settings = replace(manager.settings, fuse_unet=False)
    manager.activate(request(("locon", 0.8)))
    assert peft_layers(bare.pipe.unet) > 0
    unmerged = latents(bare.pipe)
    assert float((unmerged - merged).norm() / merged.norm()) < 1e-4


def test_the_documented_dev_lora_command_makes_a_lora_the_worker_applies(dev_model_dir: Path, tmp_path: Path) -> None:
    """README: `python -m model_build dev-lora loras/dev-style.safetensors --model models/sdxl-dev`, then a job."""
    from model_build.__main__ import main

    assert main(["dev-lora", str(tmp_path / "loras" / "dev-style.safetensors"), "--model", str(dev_model_dir)]) == 0
    assert (
        main(["dev-lora", str(tmp_path / "loras" / "dev-kohya.safetensors"), "--model", str(dev_model_dir), "--kohya"])
        == 0
    )
    worker = Worker(load_settings({"LORA_DIR": str(tmp_path / "loras")}))
    worker.start(dev_model_dir)
    job = {**JOB, "width": 64, "height": 64}
    plain = worker.handle({"id": "plain", "input": job})
    styled = worker.handle({"id": "lora", "input": {**job, "loras": [{"name": "dev-style", "scale": 1.0}]}})
    kohya = worker.handle({"id": "kohya", "input": {**job, "loras": [{"name": "dev-kohya", "scale": 1.0}]}})
    assert "error" not in styled and "error" not in kohya, (styled, kohya)
    assert styled["images"] != plain["images"] and styled["metadata"]["loras"][0]["name"] == "dev-style"

    def decoded(out: dict) -> bytes:
        return Image.open(io.BytesIO(base64.b64decode(out["images"][0].split(",", 1)[1]))).tobytes()

    assert decoded(kohya) == decoded(styled)  # the same random weights under Kohya's names (parameters differ)
