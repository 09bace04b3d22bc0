"""The SDXL refiner family: dev refiner, conversion with the completeness proof, loading, and its traps.

The refiner is converted from one module-scoped dev refiner checkpoint (about 10 s); every broken
checkpoint here is that file (or the dev base) edited as a dict of tensors and saved again.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_build.__main__ import main
from model_build.architectures import (
    FAMILIES,
    REFINER_COMPONENTS,
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
    BASE_FAMILY,
    COMPONENT_PREFIXES,
    REFINER_COMPONENT_PREFIXES,
    REFINER_FAMILY,
    to_original_layout,
)
from model_build.manifest import Manifest, read_manifest

REFINER_TEXT = REFINER_COMPONENT_PREFIXES["text_encoder_2"]  # conditioner.embedders.0.model.
BASE_TEXT_2 = COMPONENT_PREFIXES["text_encoder_2"]  # conditioner.embedders.1.model.
UNET = COMPONENT_PREFIXES["unet"]
VAE = COMPONENT_PREFIXES["vae"]


@pytest.fixture(scope="module")
def refiner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written through the command line, as a user would."""
    path = tmp_path_factory.mktemp("refiner") / "sdxl-dev-refiner.safetensors"
    assert main(["-q", "dev-checkpoint", str(path), "--refiner"]) == 0
    return path


@pytest.fixture(scope="module")
def refiner_tensors(refiner_checkpoint: Path) -> dict[str, torch.Tensor]:
    """Do not edit in place: copy the dict, replace entries."""
    return load_file(str(refiner_checkpoint))


@pytest.fixture(scope="module")
def refiner_dir(refiner_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("refiner-models") / "sdxl-dev-refiner"
    assert main(["-q", "convert", str(refiner_checkpoint), "--output", str(output)]) == 0
    return output


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the shipped configs ---


def test_public_refiner_config_is_stabilitys_refiner() -> None:
    """sd_xl_refiner.yaml: model_channels 384, channel_mult [1, 2, 4, 4], attention at 2x and 4x, depth 4,
    64-wide heads, context 1280, adm_in_channels 2560 (1280 pooled + 5 x 256 for sizes, crop, aesthetic score)."""
    unet = load_component_config("sdxl_refiner", "unet")
    assert unet["block_out_channels"] == [384, 768, 1536, 1536]
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["attention_head_dim"] == [6, 12, 24, 24]
    assert unet["transformer_layers_per_block"] == 4
    assert unet["cross_attention_dim"] == 1280
    assert unet["addition_time_embed_dim"] == 256
    assert unet["projection_class_embeddings_input_dim"] == 1280 + 5 * 256
    # The refiner's OpenCLIP-bigG and VAE are the base's.
    for component in ("vae", "text_encoder_2"):
        assert load_component_config("sdxl_refiner", component) == load_component_config("sdxl_base", component)
    index = json.loads((config_dir("sdxl_refiner") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == index["tokenizer"] == [None, None]


def test_dev_refiner_config_matches_the_dev_base_where_the_pair_shares() -> None:
    for component in ("vae", "text_encoder_2"):
        assert load_component_config("dev_refiner", component) == load_component_config("dev_tiny", component)
    unet = load_component_config("dev_refiner", "unet")
    width = load_component_config("dev_tiny", "text_encoder_2")["hidden_size"]
    assert unet["cross_attention_dim"] == width
    assert unet["projection_class_embeddings_input_dim"] == width + 5 * unet["addition_time_embed_dim"]
    public = load_component_config("sdxl_refiner", "unet")
    assert (unet["down_block_types"], unet["up_block_types"]) == (public["down_block_types"], public["up_block_types"])


def test_full_size_refiner_names_agree_with_diffusers_own_converter() -> None:
    """The layout's names for the real refiner are exactly what diffusers' single-file code reads (on meta)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    expected = expected_checkpoint("sdxl_refiner")
    meta = {key: torch.empty(tensor.shape, device="meta") for key, tensor in expected.items()}
    assert {tensor.component for tensor in expected.values()} == set(REFINER_COMPONENTS)
    assert all(key.startswith((UNET, VAE, REFINER_TEXT)) for key in expected)

    unet = empty_component("sdxl_refiner", "unet").state_dict()
    converted = convert_ldm_unet_checkpoint(meta, load_component_config("sdxl_refiner", "unet"))
    assert converted.keys() == unet.keys()
    assert all(converted[key].shape == unet[key].shape for key in unet)
    assert 2.2e9 < sum(tensor.numel() for tensor in unet.values()) < 2.3e9  # the refiner's 2.26 B parameters

    encoder = empty_component("sdxl_refiner", "text_encoder_2")
    converted = convert_open_clip_checkpoint(encoder, meta, prefix=REFINER_TEXT)
    assert converted.keys() == encoder.state_dict().keys()


# --- the dev refiner ---


def test_dev_refiner_bytes_are_deterministic(refiner_checkpoint, tmp_path) -> None:
    again = write_dev_checkpoint(tmp_path / "again.safetensors", refiner=True)
    assert _sha256(again) == _sha256(refiner_checkpoint)


def test_dev_refiner_has_a_real_refiners_key_structure(refiner_tensors) -> None:
    keys = set(refiner_tensors)
    assert all(key.startswith((UNET, VAE, REFINER_TEXT)) for key in keys)
    assert not any(key.startswith(("conditioner.embedders.1.", COMPONENT_PREFIXES["text_encoder"])) for key in keys)
    # The keys diffusers' own refiner detection looks for.
    assert {f"{REFINER_TEXT}text_projection", f"{REFINER_TEXT}transformer.resblocks.0.attn.in_proj_weight"} <= keys
    assert f"{UNET}label_emb.0.0.weight" in keys
    # Four UNet levels; the last one (input_blocks 10, 11) has no attention, the middle ones do.
    assert f"{UNET}input_blocks.11.0.in_layers.0.weight" in keys
    assert f"{UNET}input_blocks.4.1.proj_in.weight" in keys
    assert not any(key.startswith((f"{UNET}input_blocks.1.1.", f"{UNET}input_blocks.10.1.")) for key in keys)
    assert f"{UNET}output_blocks.2.1.conv.weight" in keys  # level 0 upsampler right after its resnet
    assert f"{UNET}output_blocks.5.2.conv.weight" in keys  # level 1 upsampler after the attention


def test_dev_refiner_shares_vae_and_text_encoder_with_the_dev_base(refiner_tensors, dev_tensors) -> None:
    """So the engine can run the refiner on the base's latents, with the base's VAE and OpenCLIP encoder."""
    for base_prefix, refiner_prefix in ((VAE, VAE), (BASE_TEXT_2, REFINER_TEXT)):
        base = {key.removeprefix(base_prefix): t for key, t in dev_tensors.items() if key.startswith(base_prefix)}
        refiner = {
            k.removeprefix(refiner_prefix): t for k, t in refiner_tensors.items() if k.startswith(refiner_prefix)
        }
        assert base.keys() == refiner.keys()
        assert all(torch.equal(base[key], refiner[key]) for key in base)


def test_inspect_says_refiner(refiner_checkpoint, capsys) -> None:
    assert main(["inspect", str(refiner_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert (
        "SDXL refiner checkpoint, config dev_refiner, 1065 tensors (unet 780, vae 244, text_encoder_2 41; 0 ignored)"
        in out
    )
    assert "[dev model: random weights]" in out


def test_real_refiner_extras_are_ignored_not_refused(refiner_tensors, write_checkpoint) -> None:
    """The released refiner file carries OpenCLIP's logit_scale and the sgm denoiser's sigmas beside the weights."""
    extras = {f"{REFINER_TEXT}logit_scale": torch.tensor(4.6), "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000)}
    info = inspect_checkpoint(write_checkpoint({**refiner_tensors, **extras}))
    assert (info.family, info.config_name) == (REFINER_FAMILY, "dev_refiner")
    assert set(info.ignored) == set(extras)


# --- conversion, proof, manifest ---


def test_refiner_round_trip_is_exact(refiner_dir, refiner_tensors) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    manifest = read_manifest(refiner_dir)
    assert manifest.family == REFINER_FAMILY and manifest.config == "dev_refiner"
    assert manifest.tensors == {"text_encoder_2": 41, "vae": 244, "unet": 780}
    assert not (refiner_dir / "text_encoder").exists() and not (refiner_dir / "tokenizer").exists()
    loaders = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    seen = set()
    for component, cls in loaders.items():
        (weights,) = (refiner_dir / component).glob("*.safetensors")
        assert {tensor.dtype for tensor in load_file(str(weights)).values()} == {torch.float16}
        module = cls.from_pretrained(refiner_dir / component, dtype=torch.float16, local_files_only=True)
        config = module.config if isinstance(module.config, dict) else module.config.to_dict()
        mapped = to_original_layout(component, module.state_dict(), config, REFINER_FAMILY)
        for key, tensor in mapped.items():
            assert torch.equal(tensor, refiner_tensors[key].to(torch.float16)), key
        seen |= mapped.keys()
    assert seen == set(refiner_tensors)  # every checkpoint tensor landed, every parameter came from one


def test_refiner_verifies_in_full(refiner_dir, capsys) -> None:
    assert main(["verify", "--full", str(refiner_dir)]) == 0
    assert "OK (sizes and sha256 of" in capsys.readouterr().out


def test_refiner_loads_as_img2img_pipeline_and_runs_two_steps(refiner_dir) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    family = family_of_manifest(read_manifest(refiner_dir))
    assert family.pipeline_class == "StableDiffusionXLImg2ImgPipeline"
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.requires_aesthetics_score is True
    assert pipe.text_encoder is None and pipe.tokenizer is None
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        result = pipe("a lighthouse", image=image, num_inference_steps=4, strength=0.5, generator=generator)
        return torch.from_numpy(pipe.image_processor.pil_to_numpy(result.images))

    first = run()
    assert first.shape == (1, 64, 64, 3) and torch.isfinite(first).all()
    assert torch.equal(first, run())


def test_converted_dev_pair_has_byte_identical_vae_and_text_encoder_files(refiner_dir, dev_model_dir) -> None:
    """The engine shares the base's VAE and text_encoder_2 with the refiner when the manifests' hashes agree."""
    base, refiner = read_manifest(dev_model_dir).files, read_manifest(refiner_dir).files
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors", "vae/config.json"):
        assert base[name].sha256 == refiner[name].sha256, name
    assert base["unet/diffusion_pytorch_model.safetensors"] != refiner["unet/diffusion_pytorch_model.safetensors"]


def test_base_manifest_records_its_family_and_old_ones_read_as_base(dev_model_dir) -> None:
    assert read_manifest(dev_model_dir).family == BASE_FAMILY
    assert family_of_manifest(Manifest(format=1, files={})) is FAMILIES[BASE_FAMILY]  # written before refiners
    refiner = Manifest(format=1, files={}, family="sdxl-refiner")
    assert family_of_manifest(refiner).pipeline_class == "StableDiffusionXLImg2ImgPipeline"
    with pytest.raises(ValueError, match=r"family 'sd3'.*convert the checkpoint again"):
        family_of_manifest(Manifest(format=1, files={}, family="sd3"))


# --- traps ---


def test_missing_refiner_tensor_is_named(refiner_tensors, write_checkpoint, tmp_path) -> None:
    missing = f"{UNET}output_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    tensors = {key: tensor for key, tensor in refiner_tensors.items() if key != missing}
    with pytest.raises(CheckpointError) as error:
        convert(write_checkpoint(tensors), tmp_path / "out")
    message = str(error.value)
    assert "does not hold exactly the tensors of an SDXL refiner checkpoint (dev_refiner)" in message
    assert f"unet: 1 of 780 expected tensors missing ({missing})" in message


def test_refiner_without_its_text_encoder_is_named(refiner_tensors, write_checkpoint, tmp_path) -> None:
    tensors = {key: tensor for key, tensor in refiner_tensors.items() if not key.startswith("conditioner.")}
    with pytest.raises(
        CheckpointError, match=r"has the UNet of an SDXL refiner checkpoint \(dev_refiner\) but no text"
    ):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_nan_in_refiner_is_named(refiner_tensors, write_checkpoint, tmp_path) -> None:
    key = f"{REFINER_TEXT}transformer.resblocks.1.mlp.c_fc.weight"
    broken = refiner_tensors[key].clone()
    broken[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(key)} \(text_encoder_2\) holds 1 NaN"):
        convert(write_checkpoint({**refiner_tensors, key: broken}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_shape_in_refiner_is_named(refiner_tensors, write_checkpoint, tmp_path) -> None:
    key = f"{UNET}input_blocks.7.1.proj_in.weight"
    tensors = {**refiner_tensors, key: torch.zeros(128, 64)}
    expected = rf"sizes match no shipped config \(closest: dev_refiner.*{re.escape(key)} is \[128, 64\]"
    with pytest.raises(CheckpointError, match=expected):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_unknown_extra_tensor_in_refiner_is_named(refiner_tensors, write_checkpoint, tmp_path) -> None:
    extra = "conditioner.embedders.3.model.weight"
    with pytest.raises(CheckpointError, match=r"1 unknown tensors outside the three SDXL refiner components"):
        convert(write_checkpoint({**refiner_tensors, extra: torch.ones(4)}), tmp_path / "out")


def test_base_encoders_beside_a_refiner_encoder_are_refused(
    refiner_tensors, dev_tensors, write_checkpoint, tmp_path
) -> None:
    """A base checkpoint with a refiner's text encoder added (or the other way round): a broken merge."""
    refiner_text = {key: t for key, t in refiner_tensors.items() if key.startswith(REFINER_TEXT)}
    with pytest.raises(CheckpointError, match="looks like a mix of an SDXL base and an SDXL refiner"):
        convert(write_checkpoint({**dev_tensors, **refiner_text}), tmp_path / "out")
    base_text = {key: t for key, t in dev_tensors.items() if key.startswith(BASE_TEXT_2)}
    with pytest.raises(CheckpointError, match="looks like a mix of an SDXL base and an SDXL refiner"):
        convert(write_checkpoint({**refiner_tensors, **base_text}), tmp_path / "out")


def test_refiner_encoder_with_a_base_unet_is_refused(refiner_tensors, dev_tensors, write_checkpoint, tmp_path) -> None:
    """Same names as a refiner, but the UNet is the base's: refused by shape, naming both families."""
    tensors = {key: t for key, t in refiner_tensors.items() if not key.startswith(UNET)}
    tensors.update({key: t for key, t in dev_tensors.items() if key.startswith(UNET)})
    with pytest.raises(CheckpointError, match=r"text encoders are those of an SDXL refiner.*like an SDXL base"):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_proof_catches_a_refiner_tensor_that_differs(refiner_dir, refiner_tensors) -> None:
    """The proof maps the refiner's encoder to embedder 0: a changed value or the base's names both fail."""
    from transformers import CLIPTextModelWithProjection

    module = CLIPTextModelWithProjection.from_pretrained(refiner_dir / "text_encoder_2", local_files_only=True)
    keys = sorted(key for key in refiner_tensors if key.startswith(REFINER_TEXT))

    def read(key: str) -> torch.Tensor:
        return refiner_tensors[key].to(torch.float16)

    assert prove_component("text_encoder_2", module, keys, read, torch.float16, REFINER_FAMILY).tensors == 41
    with pytest.raises(CompletenessError, match="41 pipeline tensors did not come from the checkpoint"):
        prove_component("text_encoder_2", module, keys, read, torch.float16, BASE_FAMILY)
    with torch.no_grad():
        module.text_model.final_layer_norm.weight[0] += 1
    with pytest.raises(CompletenessError, match=rf"1 of 41 tensors differ.*\({REFINER_TEXT}ln_final\.weight\)"):
        prove_component("text_encoder_2", module, keys, read, torch.float16, REFINER_FAMILY)
