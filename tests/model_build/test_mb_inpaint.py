"""The SDXL inpainting family: its configs, the dev inpainting model, conversion with the proof, loading, traps.

The inpainting model is converted once per session (``dev_inpaint_model_dir``); every broken checkpoint
here is the dev inpainting file edited as a dict of tensors and saved again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_build.__main__ import main
from model_build.architectures import (
    COMPONENTS,
    FAMILIES,
    config_dir,
    empty_component,
    expected_checkpoint,
    family_of_manifest,
    load_component_config,
)
from model_build.checkpoint import inspect_checkpoint
from model_build.completeness import prove_component
from model_build.convert import convert
from model_build.dev_model import write_dev_checkpoint
from model_build.errors import CheckpointError, CompletenessError
from model_build.layout import (
    COMPONENT_PREFIXES,
    INPAINT_FAMILY,
    REFINER_COMPONENT_PREFIXES,
    REFINER_FAMILY,
    to_original_layout,
)
from model_build.manifest import read_manifest

UNET = COMPONENT_PREFIXES["unet"]
CONV_IN = f"{UNET}input_blocks.0.0.weight"

# The UNet of A1111's configs/sd_xl_inpaint.yaml (network_config.params): sd_xl_base.yaml with in_channels 9.
SD_XL_INPAINT_YAML_UNET = {
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_checkpoint": False,
    "in_channels": 9,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": [1, 2, 10],
    "context_dim": 2048,
    "legacy": False,
}


@pytest.fixture(scope="module")
def inpaint_tensors(dev_inpaint_checkpoint: Path) -> dict[str, torch.Tensor]:
    """Do not edit in place: copy the dict, replace entries."""
    return load_file(str(dev_inpaint_checkpoint))


# --- the shipped configs ---


def test_public_inpaint_config_is_what_diffusers_derives_from_a1111s_yaml() -> None:
    """diffusers 0.42.1's create_unet_diffusers_config_from_ldm on sd_xl_inpaint.yaml gives the shipped UNet config;
    its single-file loader names such a checkpoint xl_inpaint. Everything else is the base's."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, infer_diffusers_model_type

    meta = {key: torch.empty(t.shape, device="meta") for key, t in expected_checkpoint("sdxl_inpaint").items()}
    assert infer_diffusers_model_type(meta) == "xl_inpaint"
    original = {
        "model": {
            "params": {
                "network_config": {"params": SD_XL_INPAINT_YAML_UNET},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    derived = create_unet_diffusers_config_from_ldm(original, meta)
    shipped = load_component_config("sdxl_inpaint", "unet")
    assert {key: shipped[key] for key in derived} == derived
    base = load_component_config("sdxl_base", "unet")
    assert {key for key in shipped if shipped[key] != base[key]} == {"in_channels"}
    for component in ("vae", "text_encoder", "text_encoder_2"):
        assert load_component_config("sdxl_inpaint", component) == load_component_config("sdxl_base", component)
    index = json.loads((config_dir("sdxl_inpaint") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert index["requires_aesthetics_score"] is False


def test_dev_inpaint_config_is_the_dev_base_with_nine_input_channels() -> None:
    for component in COMPONENTS:
        dev, base = load_component_config("dev_inpaint", component), load_component_config("dev_tiny", component)
        assert dev == (base | {"in_channels": 9} if component == "unet" else base), component
    assert FAMILIES[INPAINT_FAMILY].configs == ("sdxl_inpaint", "dev_inpaint")


def test_full_size_inpaint_names_agree_with_diffusers_own_converter() -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    expected = expected_checkpoint("sdxl_inpaint")
    assert expected[CONV_IN].shape == (320, 9, 3, 3)
    assert expected.keys() == expected_checkpoint("sdxl_base").keys()
    meta = {key: torch.empty(t.shape, device="meta") for key, t in expected.items()}
    unet = empty_component("sdxl_inpaint", "unet").state_dict()
    converted = convert_ldm_unet_checkpoint(meta, load_component_config("sdxl_inpaint", "unet"))
    assert converted.keys() == unet.keys()
    assert all(converted[key].shape == unet[key].shape for key in unet)


# --- the dev inpainting checkpoint ---


def test_dev_inpaint_checkpoint_is_the_dev_base_but_for_conv_in(inpaint_tensors, dev_tensors) -> None:
    assert inpaint_tensors.keys() == dev_tensors.keys()
    assert inpaint_tensors[CONV_IN].shape == (32, 9, 3, 3) and dev_tensors[CONV_IN].shape == (32, 4, 3, 3)
    differ = [key for key in dev_tensors if not torch.equal(inpaint_tensors[key], dev_tensors[key])]
    assert differ == [CONV_IN]


def test_inspect_says_inpainting(dev_inpaint_checkpoint: Path, capsys) -> None:
    assert main(["inspect", str(dev_inpaint_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "SDXL inpainting checkpoint, config dev_inpaint, 957 tensors (unet 620, vae 244, text_encoder 52" in out
    assert "[dev model: random weights]" in out


def test_dev_inpaint_checkpoint_from_the_command_line_is_the_same_file(dev_inpaint_checkpoint, tmp_path) -> None:
    path = tmp_path / "again.safetensors"
    assert main(["-q", "dev-checkpoint", str(path), "--inpainting"]) == 0
    assert path.read_bytes() == dev_inpaint_checkpoint.read_bytes()
    with pytest.raises(SystemExit):  # one kind at a time
        main(["dev-checkpoint", str(path), "--inpainting", "--refiner"])


# --- conversion, proof, manifest, loading ---


def test_inpaint_round_trip_is_exact_and_recorded(dev_inpaint_model_dir: Path, inpaint_tensors) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    manifest = read_manifest(dev_inpaint_model_dir)
    assert (manifest.family, manifest.config) == (INPAINT_FAMILY, "dev_inpaint")
    assert family_of_manifest(manifest).pipeline_class == "StableDiffusionXLInpaintPipeline"
    assert manifest.tensors == {"text_encoder": 52, "text_encoder_2": 41, "vae": 244, "unet": 620}
    loaders = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    seen = set()
    for component, cls in loaders.items():
        module = cls.from_pretrained(dev_inpaint_model_dir / component, dtype=torch.float16, local_files_only=True)
        config = module.config if isinstance(module.config, dict) else module.config.to_dict()
        mapped = to_original_layout(component, module.state_dict(), config, INPAINT_FAMILY)
        for key, tensor in mapped.items():
            assert torch.equal(tensor, inpaint_tensors[key].to(torch.float16)), key
        seen |= mapped.keys()
    assert seen == set(inpaint_tensors)


def test_inpaint_shares_vae_and_text_encoder_files_with_the_dev_base(dev_inpaint_model_dir, dev_model_dir) -> None:
    """Byte-identical files: a worker can hold the base and the inpainting model with one VAE and encoder pair."""
    base, inpaint = read_manifest(dev_model_dir).files, read_manifest(dev_inpaint_model_dir).files
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert base[name].sha256 == inpaint[name].sha256, name
    assert base["unet/diffusion_pytorch_model.safetensors"] != inpaint["unet/diffusion_pytorch_model.safetensors"]


def test_inpaint_folder_loads_as_the_inpaint_pipeline_and_inpaints(dev_inpaint_model_dir: Path) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
        dev_inpaint_model_dir, dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9 and pipe.config.requires_aesthetics_score is False
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1

    def run() -> torch.Tensor:
        seed = torch.Generator().manual_seed(0)
        result = pipe(
            "a lighthouse", image=image, mask_image=mask, height=64, width=64, num_inference_steps=2, generator=seed
        )
        return torch.from_numpy(pipe.image_processor.pil_to_numpy(result.images))

    first = run()
    assert first.shape == (1, 64, 64, 3) and torch.isfinite(first).all()
    assert torch.equal(first, run())


# --- traps: broken and partial inpainting files are refused, naming the tensor ---


def test_a_missing_inpaint_unet_tensor_is_named(inpaint_tensors, write_checkpoint, tmp_path) -> None:
    missing = f"{UNET}output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    tensors = {key: tensor for key, tensor in inpaint_tensors.items() if key != missing}
    with pytest.raises(CheckpointError) as error:
        convert(write_checkpoint(tensors), tmp_path / "out")
    message = str(error.value)
    assert "does not hold exactly the tensors of an SDXL inpainting checkpoint (dev_inpaint)" in message
    assert f"unet: 1 of 620 expected tensors missing ({missing})" in message


def test_an_inpaint_file_without_its_first_convolution_is_named(inpaint_tensors, write_checkpoint, tmp_path) -> None:
    tensors = {key: tensor for key, tensor in inpaint_tensors.items() if key != CONV_IN}
    with pytest.raises(CheckpointError, match=rf"unet: 1 of 620 expected tensors missing \({re.escape(CONV_IN)}\)"):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_a_truncated_inpaint_download_is_named(dev_inpaint_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    path.write_bytes(dev_inpaint_checkpoint.read_bytes()[: dev_inpaint_checkpoint.stat().st_size * 9 // 10])
    with pytest.raises(CheckpointError, match=r"partial\.safetensors is truncated: .* \(90%\)"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_inpaint_conv_in_of_the_wrong_width_is_named(inpaint_tensors, write_checkpoint, tmp_path) -> None:
    tensors = {**inpaint_tensors, CONV_IN: torch.zeros(48, 9, 3, 3)}
    expected = rf"closest: dev_inpaint.*{re.escape(CONV_IN)} is \[48, 9, 3, 3\], expected \[32, 9, 3, 3\]"
    with pytest.raises(CheckpointError, match=expected):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_nan_in_the_inpaint_conv_in_is_named(inpaint_tensors, write_checkpoint, tmp_path) -> None:
    broken = inpaint_tensors[CONV_IN].clone()
    broken[0, 8, 0, 0] = float("nan")  # a mask-image channel
    output = tmp_path / "models" / "out"
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(CONV_IN)} \(unet\) holds 1 NaN"):
        convert(write_checkpoint({**inpaint_tensors, CONV_IN: broken}), output)
    assert [path.name for path in output.parent.iterdir() if path.suffix != ".lock"] == []


def test_other_unet_input_widths_are_refused_by_name(inpaint_tensors, write_checkpoint, tmp_path) -> None:
    tensors = {**inpaint_tensors, CONV_IN: torch.zeros(32, 8, 3, 3)}  # an instruct-pix2pix style editing UNet
    with pytest.raises(CheckpointError, match=r"a UNet with 8 input channels \(an SDXL base has 4, an SDXL inpainting"):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_an_inpaint_unet_beside_a_refiners_encoder_is_refused(
    inpaint_tensors, dev_refiner_checkpoint_tensors, write_checkpoint, tmp_path
) -> None:
    tensors = {key: t for key, t in inpaint_tensors.items() if not key.startswith("conditioner.")}
    tensors.update(dev_refiner_checkpoint_tensors)
    with pytest.raises(CheckpointError, match=r"text encoders are those of an SDXL refiner.*an SDXL inpainting"):
        convert(write_checkpoint(tensors), tmp_path / "out")


@pytest.fixture(scope="module")
def dev_refiner_checkpoint_tensors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Only the dev refiner's text encoder tensors."""
    path = write_dev_checkpoint(tmp_path_factory.mktemp("refiner") / "refiner.safetensors", refiner=True)
    prefix = REFINER_COMPONENT_PREFIXES["text_encoder_2"]
    return {key: t for key, t in load_file(str(path)).items() if key.startswith(prefix)}


def test_known_extras_of_the_released_inpaint_file_are_ignored(inpaint_tensors, write_checkpoint) -> None:
    extras = {"alphas_cumprod": torch.linspace(1, 0, 1000), "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000)}
    info = inspect_checkpoint(write_checkpoint({**inpaint_tensors, **extras}))
    assert (info.family, info.config_name, set(info.ignored)) == (INPAINT_FAMILY, "dev_inpaint", set(extras))


def test_the_proof_catches_an_inpaint_conv_in_that_differs(dev_inpaint_model_dir: Path, inpaint_tensors) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        dev_inpaint_model_dir / "unet", dtype=torch.float16, local_files_only=True
    )
    keys = sorted(key for key in inpaint_tensors if key.startswith(UNET))

    def read(key: str) -> torch.Tensor:
        return inpaint_tensors[key].to(torch.float16)

    assert prove_component("unet", unet, keys, read, torch.float16, INPAINT_FAMILY).tensors == 620
    with torch.no_grad():
        unet.conv_in.weight[0, 8] += 1  # the masked image's last latent channel
    with pytest.raises(CompletenessError, match=rf"unet: 1 of 620 tensors differ.*\({re.escape(CONV_IN)}\)"):
        prove_component("unet", unet, keys, read, torch.float16, INPAINT_FAMILY)


def test_the_worker_takes_an_inpaint_folder_as_its_model_and_refuses_it_as_the_refiner(
    dev_inpaint_model_dir: Path,
) -> None:
    """MODEL_DIR may be a base or an inpainting model (tests/worker/test_inpainting_model.py serves one); anywhere
    else the family is refused by name at start-up, not met as a wrong pipeline."""
    from core.errors import ConfigurationError
    from model_build.layout import BASE_FAMILY
    from worker.model.loading import require_family

    manifest = read_manifest(dev_inpaint_model_dir)
    assert require_family(manifest, dev_inpaint_model_dir, (BASE_FAMILY, INPAINT_FAMILY), "MODEL_DIR") == INPAINT_FAMILY
    with pytest.raises(ConfigurationError, match=r"REFINER_DIR .* holds a converted sdxl-inpaint model, not sdxl-ref"):
        require_family(manifest, dev_inpaint_model_dir, REFINER_FAMILY, "REFINER_DIR")
