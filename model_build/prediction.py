"""What a checkpoint's UNet predicts (epsilon or v) and on which noise schedule, and how the scheduler config says it.

Nothing in an SDXL checkpoint's weights tells an epsilon model from a v-prediction one. Trainers mark
v-prediction files (NoobAI-XL v-pred and others) with two empty top-level tensors that loaders look for by
name: ``v_pred`` (v-prediction) and ``ztsnr`` (trained on a zero-terminal-SNR schedule). ComfyUI's
``supported_models.SDXL.model_type`` reads both (``ztsnr`` only beside ``v_pred``) and writes them when it
saves such a model (``torch.tensor([])``); A1111's ``sd_models_config`` reads ``v_pred`` (``sd_xl_v.yaml``).
Their values are never read, only their presence, as those loaders do.

A converted folder carries the answer in its scheduler config, the one place diffusers reads it:
``prediction_type: v_prediction``, and for zero terminal SNR ``rescale_betas_zero_snr: true`` with
``timestep_spacing: trailing`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed": rescaled betas, and the last step sampled from pure noise). A file without markers is epsilon unless
``--prediction-type`` / ``--zero-terminal-snr`` say otherwise (an option wins over a marker: a merge can carry
a stale one). The manifest records what decided.

EDM-parameterised SDXL files (``edm_mean``/``edm_std`` as Playground v2.5, ``edm_vpred.sigma_max`` as CosXL)
are another sampling model altogether and are refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from model_build.errors import CheckpointError, ConversionError
from model_build.manifest import Prediction

log = logging.getLogger("model_build")

V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
MARKER_KEYS = (V_PRED_MARKER, ZTSNR_MARKER)
PREDICTION_TYPES = ("epsilon", "v_prediction")
EDM_KEYS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


def markers_in(keys: Iterable[str]) -> tuple[str, ...]:
    keys = set(keys)
    return tuple(marker for marker in MARKER_KEYS if marker in keys)


def refuse_edm(path: Path, keys: Iterable[str]) -> None:
    found = sorted(set(keys) & set(EDM_KEYS))
    if found:
        raise CheckpointError(
            f"{path.name} carries {', '.join(found)}: an EDM-parameterised SDXL model (as Playground v2.5 or "
            "CosXL), sampled on continuous EDM sigmas rather than SDXL's discrete schedule. This converter "
            "handles epsilon and v-prediction SDXL checkpoints only."
        )


def decide_prediction(
    markers: Iterable[str], prediction_type: str | None = None, zero_terminal_snr: bool | None = None
) -> Prediction:
    """The prediction of a checkpoint with these ``markers``; the options, when given, win over the markers."""
    markers = tuple(markers)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConversionError(f"--prediction-type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    chosen = prediction_type or ("v_prediction" if V_PRED_MARKER in markers else "epsilon")
    marked_ztsnr = ZTSNR_MARKER in markers and chosen == "v_prediction"  # ztsnr counts only beside v-prediction
    ztsnr = marked_ztsnr if zero_terminal_snr is None else zero_terminal_snr
    if ztsnr and chosen != "v_prediction":
        why = "--prediction-type epsilon" if prediction_type else "the checkpoint carries no v_pred marker"
        raise ConversionError(
            f"--zero-terminal-snr needs a v-prediction model ({why}): at zero terminal SNR an epsilon model has "
            "nothing to predict from. Add --prediction-type v_prediction if the model is v-prediction."
        )
    if ZTSNR_MARKER in markers and V_PRED_MARKER not in markers and zero_terminal_snr is None:
        log.warning("the checkpoint carries a ztsnr marker without v_pred; ignored, as ComfyUI ignores it")
    options = prediction_type is not None or zero_terminal_snr is not None
    return Prediction(
        prediction_type=chosen,
        zero_terminal_snr=ztsnr,
        decided_by="option" if options else ("markers" if markers else "default"),
        markers=markers,
    )


def scheduler_overrides(prediction: Prediction) -> dict[str, Any]:
    """What the converted folder's scheduler config says about ``prediction`` (the rest is the family's config)."""
    overrides: dict[str, Any] = {"prediction_type": prediction.prediction_type}
    if prediction.zero_terminal_snr:
        overrides |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return overrides


def matches(recorded: Prediction, prediction_type: str | None, zero_terminal_snr: bool | None) -> bool:
    """Whether a folder whose manifest recorded ``recorded`` already holds what these options ask for.

    No option asks for nothing: the folder's recorded decision stands (the source is the same file). Given
    options are decided against the recorded markers and compared by outcome, not by who decided.
    """
    if prediction_type is None and zero_terminal_snr is None:
        return True
    wanted = decide_prediction(recorded.markers, prediction_type, zero_terminal_snr)
    return (wanted.prediction_type, wanted.zero_terminal_snr) == (
        recorded.prediction_type,
        recorded.zero_terminal_snr,
    )


def describe(prediction: Prediction) -> str:
    """For messages: ``v_prediction, zero terminal SNR`` or ``epsilon``."""
    return prediction.prediction_type + (", zero terminal SNR" if prediction.zero_terminal_snr else "")
