"""SDXL ControlNet files -> verified ControlNetModel folders: both layouts, the proof, the manifest, every refusal.

The files are the dev ControlNet (SDXL's ControlNet architecture scaled to the dev UNet, random weights), written in
the original ``control_model.*`` layout and in diffusers' layout, or edited copies of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_build.__main__ import EXIT_CONFIGURATION, EXIT_OK, EXIT_REFUSED, main
from model_build.controlnet import convert_controlnet, inspect_controlnet
from model_build.controlnet_layout import ORIGINAL_PREFIX, controlnet_config, original_key
from model_build.dev_controlnet import dev_controlnet_state_dict, write_dev_controlnet
from model_build.errors import CheckpointError, CompletenessError
from model_build.manifest import verify


@pytest.fixture(scope="module")
def original_tensors(dev_controlnet_file: Path) -> dict[str, torch.Tensor]:
    return load_file(str(dev_controlnet_file))


def load_folder(folder: Path):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(folder, dtype=torch.float32)


def test_both_layouts_convert_to_the_same_weights_with_a_manifest(dev_controlnet_root: Path, tmp_path: Path) -> None:
    diffusers_file = write_dev_controlnet(tmp_path / "dev-diffusers.safetensors", layout="diffusers")
    from_diffusers = convert_controlnet(diffusers_file, tmp_path / "from-diffusers", dtype="fp32")
    assert from_diffusers.converted
    from_original = dev_controlnet_root / "dev-controlnet"  # converted from the original layout, fp16
    manifest = verify(from_original, full=True)
    fields = manifest if isinstance(manifest, dict) else manifest.model_dump()
    assert fields["family"] == "sdxl-controlnet" and fields["config"] == "dev_controlnet" and fields["dev_model"]
    assert fields["layout"] == "original" and fields["tensors"] == {"controlnet": 324}
    # The weights, independently of the converter's own proof: the dev tensors under diffusers' names, as written.
    expected = dev_controlnet_state_dict(layout="diffusers")
    for folder, dtype in ((tmp_path / "from-diffusers", torch.float32), (from_original, torch.float16)):
        state = load_folder(folder).state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[key], expected[key].to(dtype).float()) for key in expected), folder


def test_converting_again_is_a_no_op(dev_controlnet_file: Path, dev_controlnet_root: Path) -> None:
    again = convert_controlnet(dev_controlnet_file, dev_controlnet_root / "dev-controlnet")
    assert not again.converted and "up to date" in again.message


def test_diffusers_alone_drops_the_sdxl_text_time_embedding_of_the_original_layout(
    original_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Why the converter fills a gap: diffusers 0.42.1's own map never renames label_emb to add_embedding."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(dict(original_tensors), controlnet_config("dev_controlnet"))
    assert "add_embedding.linear_1.weight" not in converted
    assert f"{ORIGINAL_PREFIX}label_emb.0.0.weight" in original_tensors


def test_original_names_follow_lllyasviels_layout() -> None:
    config = controlnet_config("dev_controlnet")
    assert original_key("controlnet_cond_embedding.conv_out.weight", config) == "input_hint_block.14.weight"
    assert original_key("controlnet_cond_embedding.blocks.5.bias", config) == "input_hint_block.12.bias"
    assert original_key("controlnet_down_blocks.8.weight", config) == "zero_convs.8.0.weight"
    assert original_key("controlnet_mid_block.bias", config) == "middle_block_out.0.bias"
    assert original_key("add_embedding.linear_2.weight", config) == "label_emb.0.2.weight"
    assert original_key("down_blocks.1.attentions.0.proj_in.weight", config) == "input_blocks.4.1.proj_in.weight"


def edited(tensors: dict[str, torch.Tensor], **changes) -> dict[str, torch.Tensor]:
    result = dict(tensors)
    for key, value in changes.items():
        if value is None:
            result.pop(key)
        else:
            result[key] = value
    return result


def refusal(write_checkpoint, tensors: dict[str, torch.Tensor]) -> str:
    with pytest.raises(CheckpointError) as error:
        inspect_controlnet(write_checkpoint(tensors))
    return str(error.value)


def test_foreign_controlnets_are_refused_by_name(write_checkpoint, original_tensors) -> None:
    union = {**original_tensors, "control_model.task_embedding": torch.zeros(6, 32)}
    assert "ControlNet-Union / ProMax" in refusal(write_checkpoint, union)
    lora = {**original_tensors, "lora_controlnet": torch.zeros(1)}
    assert "Control-LoRA" in refusal(write_checkpoint, lora)
    sd15 = {key: t for key, t in original_tensors.items() if ".label_emb." not in key}
    assert "no SDXL text-time embedding" in refusal(write_checkpoint, sd15)


def test_missing_or_reshaped_tensors_are_named(write_checkpoint, original_tensors) -> None:
    missing = edited(original_tensors, **{"control_model.zero_convs.3.0.weight": None})
    message = refusal(write_checkpoint, missing)
    assert "1 of 324 expected tensors missing (control_model.zero_convs.3.0.weight)" in message
    reshaped = edited(original_tensors, **{"control_model.middle_block_out.0.bias": torch.zeros(7)})
    assert "control_model.middle_block_out.0.bias is [7], expected [128]" in refusal(write_checkpoint, reshaped)


def test_nan_weights_stop_the_conversion_naming_the_tensor(write_checkpoint, original_tensors, tmp_path) -> None:
    bad = original_tensors["control_model.zero_convs.0.0.weight"].clone()
    bad.view(-1)[0] = float("nan")
    path = write_checkpoint(edited(original_tensors, **{"control_model.zero_convs.0.0.weight": bad}))
    with pytest.raises(CheckpointError, match=r"zero_convs\.0\.0\.weight .* 1 NaN"):
        convert_controlnet(path, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_a_folder_that_differs_from_the_file_fails_the_proof(dev_controlnet_file, tmp_path, monkeypatch) -> None:
    """If loading put anything else into the net (here: one tensor replaced after loading), the proof names it."""
    import model_build.controlnet as converter

    real_load = converter._load

    def tampered(*args, **kwargs):
        net = real_load(*args, **kwargs)
        with torch.no_grad():
            net.controlnet_mid_block.bias.add_(1.0)
        return net

    monkeypatch.setattr(converter, "_load", tampered)
    with pytest.raises(CompletenessError, match=r"middle_block_out\.0\.bias"):
        convert_controlnet(dev_controlnet_file, tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()


def test_the_command_line_converts_and_inspects_a_controlnet(dev_controlnet_file, tmp_path, capsys) -> None:
    assert main(["-q", "inspect", str(dev_controlnet_file)]) == EXIT_OK
    assert "SDXL ControlNet (original layout), config dev_controlnet, 324 tensors" in capsys.readouterr().out
    assert main(["-q", "convert", str(dev_controlnet_file), "--output", str(tmp_path / "net")]) == EXIT_OK
    assert json.loads((tmp_path / "net" / "manifest.json").read_text())["family"] == "sdxl-controlnet"
    with_vae = ["-q", "convert", str(dev_controlnet_file), "--output", str(tmp_path / "x"), "--vae", "v.safetensors"]
    assert main(with_vae) == EXIT_CONFIGURATION
    assert "a ControlNet has no VAE" in capsys.readouterr().err
    written = tmp_path / "dev-cli.safetensors"
    assert main(["-q", "dev-controlnet", str(written)]) == EXIT_OK
    assert written.read_bytes() == dev_controlnet_file.read_bytes()  # the same bytes every time


def test_a_pickle_is_refused_before_it_is_read(tmp_path: Path) -> None:
    pickle_file = tmp_path / "control_v11p.pth"
    pickle_file.write_bytes(b"\x80\x02}q\x00.")
    assert main(["-q", "convert", str(pickle_file), "--output", str(tmp_path / "out")]) == EXIT_REFUSED
