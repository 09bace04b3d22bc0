"""v-prediction and zero terminal SNR: the markers, the options, the scheduler config, the manifest.

The dev v-pred checkpoint is the dev base's weights plus the two empty marker tensors (``v_pred``, ``ztsnr``),
converted once per session (``dev_vpred_model_dir``). One more conversion here: the unmarked dev base with
``--prediction-type v_prediction --zero-terminal-snr`` through the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_build.__main__ import main
from model_build.architectures import config_dir
from model_build.checkpoint import inspect_checkpoint
from model_build.convert import convert
from model_build.errors import CheckpointError, ConversionError
from model_build.manifest import Prediction, read_manifest
from model_build.prediction import decide_prediction, matches, scheduler_overrides

ZTSNR_SCHEDULER = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def scheduler_config(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


# --- deciding: markers, options, and which wins ---


@pytest.mark.parametrize(
    ("markers", "options", "expected"),
    [
        ((), {}, ("epsilon", False, "default")),
        (("v_pred",), {}, ("v_prediction", False, "markers")),
        (("v_pred", "ztsnr"), {}, ("v_prediction", True, "markers")),
        (("ztsnr",), {}, ("epsilon", False, "markers")),  # ztsnr counts only beside v_pred, as in ComfyUI
        ((), {"prediction_type": "v_prediction"}, ("v_prediction", False, "option")),
        ((), {"prediction_type": "v_prediction", "zero_terminal_snr": True}, ("v_prediction", True, "option")),
        (("v_pred", "ztsnr"), {"prediction_type": "epsilon"}, ("epsilon", False, "option")),  # an option wins
        (("v_pred", "ztsnr"), {"zero_terminal_snr": False}, ("v_prediction", False, "option")),
        (("v_pred",), {"zero_terminal_snr": True}, ("v_prediction", True, "option")),
    ],
)
def test_markers_decide_unless_an_option_says_otherwise(markers, options, expected) -> None:
    prediction = decide_prediction(markers, **options)
    assert (prediction.prediction_type, prediction.zero_terminal_snr, prediction.decided_by) == expected
    assert prediction.markers == markers


@pytest.mark.parametrize(
    ("markers", "options"),
    [((), {"zero_terminal_snr": True}), (("v_pred",), {"prediction_type": "epsilon", "zero_terminal_snr": True})],
)
def test_zero_terminal_snr_without_v_prediction_is_refused(markers, options) -> None:
    with pytest.raises(ConversionError, match=r"--zero-terminal-snr needs a v-prediction model"):
        decide_prediction(markers, **options)


def test_the_scheduler_config_says_what_was_decided() -> None:
    assert scheduler_overrides(decide_prediction(())) == {"prediction_type": "epsilon"}
    assert scheduler_overrides(decide_prediction(("v_pred",))) == {"prediction_type": "v_prediction"}
    assert scheduler_overrides(decide_prediction(("v_pred", "ztsnr"))) == ZTSNR_SCHEDULER


def test_an_output_is_outdated_only_when_given_options_change_the_outcome() -> None:
    marked = decide_prediction(("v_pred", "ztsnr"))
    assert matches(marked, None, None)
    assert matches(marked, "v_prediction", None)  # the same outcome, by an option: nothing to redo
    assert not matches(marked, "epsilon", None)
    assert not matches(marked, None, False)
    overridden = Prediction(prediction_type="v_prediction", decided_by="option")
    assert matches(overridden, None, None)  # no option: the recorded decision stands


# --- the dev v-pred checkpoint and its conversion ---


def test_dev_vpred_checkpoint_is_the_dev_base_with_two_empty_markers(dev_vpred_checkpoint, dev_tensors) -> None:
    tensors = load_file(str(dev_vpred_checkpoint))
    assert tensors.keys() - dev_tensors.keys() == {"v_pred", "ztsnr"}
    assert tensors["v_pred"].numel() == tensors["ztsnr"].numel() == 0
    assert all(torch.equal(tensors[key], dev_tensors[key]) for key in dev_tensors)


def test_inspect_says_what_the_markers_say(dev_vpred_checkpoint, capsys) -> None:
    assert main(["inspect", str(dev_vpred_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "959 tensors (unet 620, vae 244, text_encoder 52, text_encoder_2 41; 0 ignored), dtypes F32" in out
    assert "predicts v_prediction, zero terminal SNR (markers: v_pred, ztsnr)" in out


def test_vpred_converts_with_the_ztsnr_scheduler_config(dev_vpred_model_dir: Path, dev_model_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    config = scheduler_config(dev_vpred_model_dir)
    assert {key: config[key] for key in ZTSNR_SCHEDULER} == ZTSNR_SCHEDULER
    manifest = read_manifest(dev_vpred_model_dir)
    assert manifest.prediction == Prediction(
        prediction_type="v_prediction", zero_terminal_snr=True, decided_by="markers", markers=("v_pred", "ztsnr")
    )
    assert manifest.tensors == {"text_encoder": 52, "text_encoder_2": 41, "vae": 244, "unet": 620}  # markers: not
    base = read_manifest(dev_model_dir)
    assert base.prediction == Prediction(decided_by="default")  # an epsilon conversion records it too
    assert {name for name in base.files if base.files[name] != manifest.files[name]} == {
        "scheduler/scheduler_config.json"
    }
    pipe = StableDiffusionXLPipeline.from_pretrained(dev_vpred_model_dir, local_files_only=True)
    assert {key: pipe.scheduler.config[key] for key in ZTSNR_SCHEDULER} == ZTSNR_SCHEDULER
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # trailing: the first step is pure noise


def test_the_epsilon_scheduler_config_is_unchanged(dev_model_dir: Path) -> None:
    """What an epsilon conversion writes: the family's config as shipped (the converter adds nothing to it)."""
    from diffusers import EulerDiscreteScheduler

    shipped = EulerDiscreteScheduler.from_pretrained(config_dir("dev_tiny"), subfolder="scheduler")
    assert scheduler_config(dev_model_dir) == json.loads(shipped.to_json_string())


def test_prediction_type_option_converts_an_unmarked_file(dev_checkpoint: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "forced-vpred"
    argv = ["convert", str(dev_checkpoint), "--output", str(output)]
    assert main(["-q", *argv, "--prediction-type", "v_prediction", "--zero-terminal-snr"]) == 0
    config = scheduler_config(output)
    assert {key: config[key] for key in ZTSNR_SCHEDULER} == ZTSNR_SCHEDULER
    assert read_manifest(output).prediction == Prediction(
        prediction_type="v_prediction", zero_terminal_snr=True, decided_by="option"
    )
    capsys.readouterr()
    # Without options the recorded decision stands: a no-op.
    assert main([*argv]) == 0 and "is up to date" in capsys.readouterr().out
    # An option that changes the outcome makes the folder outdated: refused without --force, naming it.
    assert main(["-q", *argv, "--prediction-type", "epsilon"]) == 1
    assert "was converted as v_prediction, zero terminal SNR; pass --force" in capsys.readouterr().err


def test_zero_terminal_snr_option_on_an_unmarked_file_is_refused(dev_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"needs a v-prediction model \(the checkpoint carries no v_pred"):
        convert(dev_checkpoint, tmp_path / "out", zero_terminal_snr=True)
    assert not (tmp_path / "out").exists()


def test_markers_of_any_shape_count_and_are_never_converted(dev_tensors, write_checkpoint) -> None:
    """Kohya's scripts write torch.zeros(1), ComfyUI torch.tensor([]): loaders look at the names only."""
    info = inspect_checkpoint(write_checkpoint({**dev_tensors, "v_pred": torch.zeros(1)}))
    assert info.markers == ("v_pred",) and not info.ignored
    assert all("v_pred" not in keys for keys in info.component_keys.values())


@pytest.mark.parametrize("key", ["edm_vpred.sigma_max", "edm_mean"])
def test_edm_parameterised_files_are_refused_by_name(dev_tensors, write_checkpoint, tmp_path, key) -> None:
    with pytest.raises(CheckpointError, match=rf"carries {key}.*: an EDM-parameterised SDXL model"):
        convert(write_checkpoint({**dev_tensors, key: torch.tensor(80.0)}), tmp_path / "out")
