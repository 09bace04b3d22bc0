"""diffusers' silent-initialisation traps: each one is an error that names the component and the first keys.

The checks come in two layers: the pre-flight check refuses a checkpoint whose tensor names or shapes
do not match the config before diffusers sees it, and the completeness proof (after the folder is
reloaded) catches whatever diffusers would still get wrong. Both are tested here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_build.architectures import empty_component, materialize
from model_build.completeness import assert_materialized, prove_component
from model_build.convert import convert
from model_build.errors import CheckpointError, CompletenessError
from model_build.layout import COMPONENT_PREFIXES, to_original_layout
from model_build.single_file import load_component

CLIP_L = COMPONENT_PREFIXES["text_encoder"]


def test_clip_l_keys_without_text_model_level_are_refused(dev_tensors, write_checkpoint, tmp_path) -> None:
    """Transformers 5 names CLIP-L tensors without `text_model.`; diffusers would leave them at random init."""
    renamed = {key.replace(CLIP_L + "text_model.", CLIP_L): tensor for key, tensor in dev_tensors.items()}
    with pytest.raises(CheckpointError) as error:
        convert(write_checkpoint(renamed), tmp_path / "out")
    message = str(error.value)
    assert "text_encoder: 52 of 52 expected tensors missing" in message
    assert f"52 unknown tensors ({CLIP_L}embeddings.position_embedding.weight" in message
    assert "lack the `text_model.` level" in message
    assert "unet" not in message.split("text_encoder:")[1]  # only the broken component is named


def test_one_missing_unet_tensor_is_named(dev_tensors, write_checkpoint, tmp_path) -> None:
    """diffusers would fail with 'Cannot copy out of meta tensor; no data!'."""
    missing = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    tensors = {key: tensor for key, tensor in dev_tensors.items() if key != missing}
    with pytest.raises(CheckpointError, match=rf"unet: 1 of 620 expected tensors missing \({missing}\)"):
        convert(write_checkpoint(tensors), tmp_path / "out")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("model.diffusion_model.input_blocks.1.0.extra_scale", r"unet: 1 unknown tensors \({key}\)"),
        ("first_stage_model.decoder.mid.attn_2.q.weight", r"vae: 1 unknown tensors \({key}\)"),
        ("conditioner.embedders.2.model.weight", r"1 unknown tensors outside the four SDXL components \({key}\)"),
    ],
)
def test_an_unknown_extra_tensor_is_named(dev_tensors, write_checkpoint, tmp_path, extra, message) -> None:
    tensors = {**dev_tensors, extra: torch.ones(4)}
    with pytest.raises(CheckpointError, match=message.format(key=extra.replace(".", r"\."))):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_a_tensor_of_the_wrong_shape_is_named(dev_tensors, write_checkpoint, tmp_path) -> None:
    key = "conditioner.embedders.1.model.text_projection"
    tensors = {**dev_tensors, key: dev_tensors[key][:, :32].contiguous()}
    with pytest.raises(CheckpointError, match=rf"1 tensors differ: {key} is \[64, 32\], expected \[64, 64\]"):
        convert(write_checkpoint(tensors), tmp_path / "out")


# --- the proof itself, on modules diffusers got wrong ---


def test_meta_tensors_are_named() -> None:
    unet = empty_component("dev_tiny", "unet")  # everything on the meta device, as after a failed load
    with pytest.raises(CompletenessError, match=r"unet: \d+ tensors were never loaded .*\(conv_in\.weight"):
        assert_materialized("unet", unet)


@pytest.fixture(scope="module")
def dev_pipeline(dev_model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(dev_model_dir, dtype=torch.float16, local_files_only=True)


def _source(tensors: dict[str, torch.Tensor], component: str) -> list[str]:
    return sorted(key for key in tensors if key.startswith(COMPONENT_PREFIXES[component]))


def test_proof_passes_on_a_correct_conversion(dev_pipeline, dev_tensors) -> None:
    for component in COMPONENT_PREFIXES:
        keys = _source(dev_tensors, component)
        proof = prove_component(
            component, getattr(dev_pipeline, component), keys, lambda k: dev_tensors[k].half(), torch.float16
        )
        assert proof.tensors == len(keys)


def test_proof_catches_a_tensor_left_at_random_initialisation(dev_model_dir: Path, dev_tensors) -> None:
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(dev_model_dir / "text_encoder", dtype=torch.float16)
    with torch.no_grad():
        encoder.encoder.layers[1].mlp.fc2.weight.normal_()  # what an unmatched key gets from diffusers
    keys = _source(dev_tensors, "text_encoder")
    with pytest.raises(CompletenessError) as error:
        prove_component("text_encoder", encoder, keys, lambda k: dev_tensors[k].half(), torch.float16)
    assert error.value.message.startswith("text_encoder: 1 of 52 tensors differ from the checkpoint after conversion")
    assert f"{CLIP_L}text_model.encoder.layers.1.mlp.fc2.weight" in str(error.value)


def test_proof_catches_checkpoint_tensors_that_did_not_land(dev_pipeline, dev_tensors) -> None:
    keys = [*_source(dev_tensors, "vae"), "first_stage_model.decoder.mid.attn_1.extra.weight"]
    with pytest.raises(CompletenessError, match=r"vae: 1 checkpoint tensors did not land in the pipeline"):
        prove_component("vae", dev_pipeline.vae, keys, lambda k: dev_tensors[k].half(), torch.float16)
    fewer = [key for key in _source(dev_tensors, "vae") if not key.endswith("quant_conv.bias")]
    with pytest.raises(CompletenessError, match=r"vae: 2 pipeline tensors did not come from the checkpoint"):
        prove_component("vae", dev_pipeline.vae, fewer, lambda k: dev_tensors[k].half(), torch.float16)


# --- two text encoders of equal width: diffusers' pipeline loader swaps them silently ---


def _equal_width_model(folder: Path) -> dict[str, torch.Tensor]:
    """A dev-like SDXL whose two text encoders are both 32 wide; returns its checkpoint tensors."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    materialize("dev_tiny", folder)
    edit = {
        "text_encoder_2": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32},
        "unet": {"cross_attention_dim": 64, "projection_class_embeddings_input_dim": 32 + 6 * 8},
    }
    for component, changes in edit.items():
        path = folder / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with init_empty_weights():
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        }
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for component, module in modules.items():
        weights = {key: 0.02 * torch.randn(t.shape, generator=generator) for key, t in module.state_dict().items()}
        config = module.config if isinstance(module.config, dict) else module.config.to_dict()
        tensors.update(to_original_layout(component, weights, config))
    return tensors


def test_equal_width_text_encoders_swap_is_caught_and_avoided(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "equal-config"
    tensors = _equal_width_model(folder)
    checkpoint = tmp_path / "equal.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(checkpoint))
    keys = _source(tensors, "text_encoder_2")

    def read(key: str) -> torch.Tensor:
        return tensors[key]

    # diffusers' pipeline loader: text_encoder_2 gets CLIP-L's weights, its projection stays on meta.
    pipe = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(folder), local_files_only=True)
    with pytest.raises(CompletenessError, match=r"text_encoder_2: 1 tensors were never loaded .*text_projection"):
        prove_component("text_encoder_2", pipe.text_encoder_2, keys, read, torch.float32)
    projection = tensors[COMPONENT_PREFIXES["text_encoder_2"] + "text_projection"].T.contiguous()
    pipe.text_encoder_2.text_projection.weight = torch.nn.Parameter(projection)  # now only the swap remains
    with pytest.raises(CompletenessError) as error:
        prove_component("text_encoder_2", pipe.text_encoder_2, keys, read, torch.float32)
    assert "text_encoder_2: 40 of 41 tensors differ from the checkpoint" in str(error.value)
    assert "another component's weights" in str(error.value)

    # The converter hands diffusers one encoder's tensors at a time: it cannot pick the wrong ones.
    isolated = load_component("text_encoder_2", {k: tensors[k] for k in keys}, folder, torch.float32)
    assert prove_component("text_encoder_2", isolated, keys, read, torch.float32).tensors == 41

    # And the converter itself refuses this checkpoint: its sizes match no shipped config.
    with pytest.raises(CheckpointError, match=r"sizes match no shipped config"):
        convert(checkpoint, tmp_path / "out")
