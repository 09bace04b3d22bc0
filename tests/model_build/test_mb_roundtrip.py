"""Dev checkpoint -> convert -> from_pretrained holds exactly the checkpoint's tensors; manifest; no-op; --vae; CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_build.__main__ import main
from model_build.convert import CONVERTER_VERSION, ConversionError, convert
from model_build.layout import COMPONENT_PREFIXES, to_original_layout
from model_build.manifest import read_manifest, sha256_file, verify

COMPONENTS = tuple(COMPONENT_PREFIXES)


def load(folder: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)


def as_original(pipe, component: str) -> dict[str, torch.Tensor]:
    module = getattr(pipe, component)
    config = module.config if isinstance(module.config, dict) else module.config.to_dict()
    return to_original_layout(component, module.state_dict(), config)


def assert_holds_checkpoint(pipe, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for component in COMPONENTS:
        prefix = COMPONENT_PREFIXES[component]
        expected = {key: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
        actual = as_original(pipe, component)
        assert set(actual) == set(expected), component
        for key, tensor in expected.items():
            assert actual[key].dtype == dtype, key
            assert torch.equal(actual[key], tensor.to(dtype)), key


@pytest.fixture(scope="module")
def fp32_model(dev_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fp32") / "sdxl-dev-fp32"
    result = convert(dev_checkpoint, output, dtype="fp32")
    assert result.converted and output.is_dir()
    return output


def test_fp32_round_trip_is_exact(fp32_model: Path, dev_tensors: dict[str, torch.Tensor]) -> None:
    assert_holds_checkpoint(load(fp32_model, torch.float32), dev_tensors, torch.float32)


def test_fp32_round_trip_equals_diffusers_own_pipeline_loader(fp32_model: Path, dev_checkpoint: Path, tmp_path) -> None:
    """An independent path: diffusers' pipeline-level from_single_file (correct here: the encoders' widths differ)."""
    from diffusers import StableDiffusionXLPipeline

    from model_build.architectures import materialize

    reference = StableDiffusionXLPipeline.from_single_file(
        str(dev_checkpoint), config=str(materialize("dev_tiny", tmp_path / "config")), local_files_only=True
    )
    converted = load(fp32_model, torch.float32)
    for component in COMPONENTS:
        ours, theirs = getattr(converted, component).state_dict(), getattr(reference, component).state_dict()
        assert set(ours) == set(theirs), component
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), component


def test_fp16_default_and_bf16_are_the_checkpoint_cast(
    dev_model_dir: Path, dev_checkpoint: Path, dev_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    assert_holds_checkpoint(load(dev_model_dir, torch.float16), dev_tensors, torch.float16)
    assert convert(dev_checkpoint, tmp_path / "bf16", dtype="bf16").converted
    assert_holds_checkpoint(load(tmp_path / "bf16", torch.bfloat16), dev_tensors, torch.bfloat16)


def test_manifest_records_source_files_and_versions(fp32_model: Path, dev_checkpoint: Path) -> None:
    manifest = read_manifest(fp32_model)
    assert manifest.source.sha256 == sha256_file(dev_checkpoint)
    assert manifest.source.name == dev_checkpoint.name
    assert manifest.source.size == dev_checkpoint.stat().st_size
    assert manifest.dtype == "fp32" and manifest.config == "dev_tiny" and manifest.dev_model is True
    assert manifest.converter_version == CONVERTER_VERSION
    assert {"torch", "diffusers", "transformers", "safetensors"} <= set(manifest.versions)
    assert manifest.tensors == {"text_encoder": 52, "text_encoder_2": 41, "vae": 244, "unet": 620}
    files = manifest.files
    assert "unet/diffusion_pytorch_model.safetensors" in files and "model_index.json" in files
    for relative, entry in files.items():
        assert (fp32_model / relative).stat().st_size == entry.size
        assert sha256_file(fp32_model / relative) == entry.sha256
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in files)  # safetensors only
    verify(fp32_model, full=True)


def test_same_source_again_is_a_no_op_unless_forced(fp32_model: Path, dev_checkpoint: Path) -> None:
    before = (fp32_model / "manifest.json").stat().st_mtime_ns
    again = convert(dev_checkpoint, fp32_model, dtype="fp32")
    assert not again.converted and "up to date" in again.message and "--force" in again.message
    assert (fp32_model / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(ConversionError, match=r"holds fp32 weights, not fp16; pass --force"):
        convert(dev_checkpoint, fp32_model, dtype="fp16")


def test_force_replaces_and_leaves_no_temporary_folders(fp32_model: Path, dev_checkpoint: Path, tmp_path) -> None:
    output = tmp_path / "models" / "dev"
    shutil.copytree(fp32_model, output)
    forced = convert(dev_checkpoint, output, dtype="fp16", force=True)
    assert forced.converted and read_manifest(output).dtype == "fp16"
    verify(output, full=True)
    assert [p.name for p in output.parent.iterdir() if p.name != "dev.lock"] == ["dev"]


def test_a_folder_not_made_by_model_build_is_never_replaced(dev_checkpoint: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not made by model_build"):
        convert(dev_checkpoint, precious, force=True)
    assert (precious / "notes.txt").read_text() == "mine"


def test_vae_in_diffusers_layout_replaces_the_checkpoint_vae(
    fp32_model: Path, dev_checkpoint: Path, tmp_path: Path
) -> None:
    """E.g. the fp16-fix VAE, shipped as a Diffusers AutoencoderKL state dict; legacy attention names too."""
    from safetensors.torch import load_file

    vae_state = load_file(str(fp32_model / "vae" / "diffusion_pytorch_model.safetensors"))
    replacement = {key: tensor * 0.5 for key, tensor in vae_state.items()}  # recognisably different weights
    legacy = {key.replace(".to_q.", ".query."): tensor for key, tensor in replacement.items()}  # diffusers < 0.14
    vae_path = tmp_path / "fixed-vae.safetensors"
    save_file(legacy, str(vae_path))

    output = tmp_path / "with-vae"
    result = convert(dev_checkpoint, output, dtype="fp32", vae=vae_path)
    assert result.converted
    manifest = read_manifest(output)
    assert manifest.vae.sha256 == sha256_file(vae_path) and manifest.vae.layout == "diffusers"
    assert manifest.replaced_tensors.count == 244
    reloaded = load(output, torch.float32).vae.state_dict()
    assert all(torch.equal(reloaded[key], replacement[key]) for key in replacement)
    # Without --vae the same output is outdated: it was converted with another VAE.
    with pytest.raises(ConversionError, match=r"was converted with --vae fixed-vae\.safetensors"):
        convert(dev_checkpoint, output, dtype="fp32")


def test_vae_in_original_layout_with_or_without_prefix_is_read(dev_tensors, tmp_path: Path) -> None:
    from model_build.vae_file import load_vae_file

    prefix = COMPONENT_PREFIXES["vae"]
    vae = {key: tensor for key, tensor in dev_tensors.items() if key.startswith(prefix)}
    with_prefix, bare = tmp_path / "with.safetensors", tmp_path / "bare.safetensors"
    save_file(vae, str(with_prefix))
    save_file({key.removeprefix(prefix): tensor for key, tensor in vae.items()}, str(bare))
    for path, layout in ((with_prefix, "original (first_stage_model.…)"), (bare, "original (no prefix)")):
        loaded = load_vae_file(path, "dev_tiny")
        assert loaded.layout == layout
        assert set(loaded.tensors) == set(vae) and all(torch.equal(loaded.tensors[k], vae[k]) for k in vae)


def test_vae_of_another_model_is_refused(dev_tensors, dev_checkpoint: Path, tmp_path: Path) -> None:
    prefix = COMPONENT_PREFIXES["vae"]
    vae = {key: tensor for key, tensor in dev_tensors.items() if key.startswith(prefix)}
    vae[prefix + "encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(vae, str(tmp_path / "other.safetensors"))
    expected = r"not a VAE for this checkpoint.*encoder\.conv_in\.weight is \[8, 3, 3, 3\]"
    with pytest.raises(ConversionError, match=expected):
        convert(dev_checkpoint, tmp_path / "out", vae=tmp_path / "other.safetensors")


def test_cli_convert_verify_inspect(dev_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "models" / "cli"
    pin = sha256_file(dev_checkpoint)
    assert main(["-q", "convert", str(dev_checkpoint), "--output", str(output), "--sha256", pin]) == 0
    assert "converted sdxl-dev.safetensors" in capsys.readouterr().out
    assert main(["-q", "convert", str(dev_checkpoint), "--output", str(output)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["verify", str(output), "--full"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["inspect", str(dev_checkpoint)]) == 0
    assert "config dev_tiny" in capsys.readouterr().out
    assert main(["-q", "convert", str(tmp_path / "missing.safetensors"), "--output", str(output)]) == 1
    assert "error: " in capsys.readouterr().err
    assert json.loads((output / "manifest.json").read_text())["dtype"] == "fp16"


def test_conversion_runs_with_the_hub_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, is_offline_mode

    from model_build.single_file import offline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as in a process that imported the hub online
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with offline():
        assert is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ


def test_ensure_converted_keeps_a_current_folder_and_repairs_a_damaged_one(
    dev_model_dir: Path, dev_checkpoint: Path, tmp_path: Path
) -> None:
    from model_build.convert import ensure_converted

    output = Path(shutil.copytree(dev_model_dir, tmp_path / "volume" / "sdxl"))
    kept = ensure_converted(dev_checkpoint, output)
    assert not kept.converted and kept.lock_wait_seconds == 0.0
    (output / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # e.g. a half-deleted volume
    repaired = ensure_converted(dev_checkpoint, output)
    assert repaired.converted
    verify(output, full=True)
