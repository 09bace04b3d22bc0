"""Look at a single-file checkpoint before converting it: refuse what must not be read, say what it is.

The order matters. The format is judged from the file name and its first bytes, so a pickle is
never handed to anything that could unpickle it. The safetensors header is then parsed by hand, so
a truncated download is named as such instead of "incomplete metadata". The tensor names say which
model family the file is (an SDXL base, an SDXL refiner, or something this converter refuses) and
the shapes say which shipped config of that family it matches. Last, every tensor of the family's
components (four in a base, three in a refiner) is accounted for by name and shape before diffusers
sees any of them:
diffusers would turn a missing tensor into "Cannot copy out of meta tensor" and an extra or
misnamed one into a silent random initialisation.

The steps live in their own modules: :mod:`.checkpoint_file` (format and header), :mod:`.identify` (family and
config), this module (every tensor accounted for), :mod:`.tensor_checks` (reading tensor data, refusing NaN and
Inf) and :mod:`.vae_file` (a separate VAE).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.safetensors_files import (
    TensorEntry,
)
from model_build.architectures import (
    CONFIG_FAMILY,
    FAMILIES,
    expected_checkpoint,
)
from model_build.checkpoint_file import check_file_format, read_header
from model_build.dev_model import DEV_METADATA_KEY
from model_build.errors import CheckpointError, shown_names
from model_build.identify import choose_config, identify_family, refuse_family
from model_build.layout import (
    BASE_FAMILY,
    COMPONENT_PREFIXES,
    REFINER_FAMILY,
    component_prefixes,
)
from model_build.prediction import MARKER_KEYS, markers_in, refuse_edm

# Tensors that real SDXL checkpoints carry besides the weights, known to be harmless to drop.
# They are listed in the manifest as ignored. Anything else unknown is an error.
IGNORED_KEYS = frozenset(
    {
        # CLIP-L's position index buffer; transformers rebuilds it (0..76) and no longer stores it.
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        # OpenCLIP's contrastive-loss temperature and causal mask: unused when encoding text
        # (embedder 1 in a base, embedder 0 in a refiner).
        "conditioner.embedders.1.model.logit_scale",
        "conditioner.embedders.1.model.attn_mask",
        "conditioner.embedders.0.model.logit_scale",
        "conditioner.embedders.0.model.attn_mask",
        # The training noise schedule of the LDM wrapper; the scheduler config defines it instead.
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
# EMA copies of the UNet (the non-EMA weights are converted) and the sgm denoiser's sigma table.
IGNORED_PREFIXES = ("model_ema.", "denoiser.")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config_name: str
    is_dev_model: bool
    num_tensors: int
    family: str = BASE_FAMILY  # sdxl-base or sdxl-refiner
    # The original-layout keys that will be converted, per component (sorted).
    component_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # known harmless non-weight tensors that are dropped
    replaced: tuple[str, ...] = ()  # checkpoint tensors of a component replaced by another file (--vae)
    dtypes: tuple[str, ...] = ()  # the checkpoint's tensor dtypes, e.g. ("F16",)
    markers: tuple[str, ...] = ()  # v_pred, ztsnr: what the UNet predicts (model_build.prediction)


# --- 4. every tensor accounted for, per component, before diffusers sees any of them ---


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _component_of(key: str, prefixes: Mapping[str, str]) -> str | None:
    for component, prefix in prefixes.items():
        if key.startswith(prefix):
            return component
    return None


def _hints(component: str, missing: set[str], unknown: set[str]) -> str:
    prefix = COMPONENT_PREFIXES.get(component, "")
    if component == "text_encoder" and unknown:
        with_level = {prefix + "text_model." + key.removeprefix(prefix) for key in unknown}
        if with_level & missing:
            return (
                f" The CLIP-L tensor names lack the `text_model.` level ({prefix}encoder.… instead of "
                f"{prefix}text_model.encoder.…), as transformers 5 writes them; diffusers would leave those tensors "
                "at random initialisation. Re-export the checkpoint with the original names."
            )
    return ""


def name_problems(missing: list[str], unknown: list[str], num_wanted: int) -> list[str]:
    """The missing and unknown tensor names of one component, as message parts."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {num_wanted} expected tensors missing ({shown_names(missing)})")
    if unknown:
        parts.append(f"{len(unknown)} unknown tensors ({shown_names(unknown)})")
    return parts


_COUNT_WORDS = {3: "three", 4: "four"}


def account_for_tensors(
    path: Path, shapes: Mapping[str, tuple[int, ...]], config_name: str, vae_replaced: bool = False
) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...], tuple[str, ...]]:
    """Check the names against ``config_name``; return (keys per component, ignored, replaced).

    Raises :class:`CheckpointError` naming, per component, the first missing and unknown tensors.
    Shapes were already checked by :func:`choose_config`.
    """
    family = FAMILIES[CONFIG_FAMILY[config_name]]
    prefixes = component_prefixes(family.name)
    expected = expected_checkpoint(config_name)
    components: dict[str, set[str]] = {component: set() for component in prefixes}
    ignored, replaced, stray = [], [], []
    for key in sorted(shapes):
        component = _component_of(key, prefixes)
        if key in MARKER_KEYS:
            continue  # read as markers, never converted
        if _is_ignored(key):
            ignored.append(key)
        elif component == "vae" and vae_replaced:
            replaced.append(key)
        elif component is None:
            stray.append(key)
        else:
            components[component].add(key)
    problems = []
    for component, present in components.items():
        if component == "vae" and vae_replaced:
            continue
        wanted = {key for key, tensor in expected.items() if tensor.component == component}
        missing, unknown = wanted - present, present - wanted  # shapes were checked by choose_config
        if not present:
            problems.append(
                f"{component}: no tensors at all under {prefixes[component]} (the checkpoint lacks this "
                f"component; a full {family.description.removeprefix('an ')} has UNet, VAE and "
                + ("the OpenCLIP-bigG text encoder" if family.name == REFINER_FAMILY else "both text encoders")
                + ("; pass a separate VAE with --vae" if component == "vae" else "")
                + ")"
            )
            continue
        parts = name_problems(sorted(missing), sorted(unknown), len(wanted))
        if parts:
            problems.append(f"{component}: " + "; ".join(parts) + "." + _hints(component, missing, unknown))
    if stray:
        problems.append(
            f"{len(stray)} unknown tensors outside the {_COUNT_WORDS[len(prefixes)]} SDXL"
            f"{' refiner' if family.name == REFINER_FAMILY else ''} components ({shown_names(stray)}); the converter "
            "does not know what they are, so it will not guess"
        )
    if problems:
        what = "an SDXL checkpoint" if family.name == BASE_FAMILY else family.description
        raise CheckpointError(
            f"{path.name} does not hold exactly the tensors of {what} ({config_name}):\n  " + "\n  ".join(problems)
        )
    return (
        {component: tuple(sorted(keys)) for component, keys in components.items()},
        tuple(ignored),
        tuple(replaced),
    )


def inspect_checkpoint(path: Path, vae_replaced: bool = False) -> CheckpointInfo:
    """Every check that needs no tensor data: format, header, family, config, names and shapes."""
    path = Path(path)
    check_file_format(path)
    header = read_header(path)
    shapes = {key: entry.shape for key, entry in header.tensors.items()}
    family = identify_family(shapes)
    refuse_family(path, family, shapes)
    refuse_edm(path, shapes)
    config_name = choose_config(path, shapes, vae_replaced, family)
    component_keys, ignored, replaced = account_for_tensors(path, shapes, config_name, vae_replaced)
    refuse_non_float_weights(path.name, header.tensors, (key for keys in component_keys.values() for key in keys))
    try:
        is_dev_model = bool(json.loads(header.metadata.get(DEV_METADATA_KEY, "null")))
    except ValueError:
        is_dev_model = False
    return CheckpointInfo(
        path=path,
        config_name=config_name,
        is_dev_model=is_dev_model,
        num_tensors=len(shapes),
        family=family,
        component_keys=component_keys,
        ignored=ignored,
        replaced=replaced,
        dtypes=tuple(sorted({entry.dtype for key, entry in header.tensors.items() if key not in MARKER_KEYS})),
        markers=markers_in(shapes),
    )


def refuse_non_float_weights(name: str, tensors: Mapping[str, TensorEntry], keys: Iterable[str]) -> None:
    """Every weight that is converted must be floating point (F16/BF16/F32/F64 or fp8).

    An integer tensor (an int8-quantised export, a broken cast) would be copied into the fp16
    parameters as its raw integer values without a word. The integer buffers real checkpoints
    carry (CLIP's position_ids) are in IGNORED_KEYS and never reach this check.
    """
    integer = sorted(key for key in keys if not tensors[key].is_float)
    if integer:
        dtypes = ", ".join(sorted({tensors[key].dtype for key in integer}))
        raise CheckpointError(
            f"{name} holds {len(integer)} weight tensors that are not floating point ({dtypes}: "
            f"{shown_names(integer)}); an integer or quantised checkpoint cannot be converted faithfully. "
            "Use the model's fp16, bf16 or fp32 release."
        )
