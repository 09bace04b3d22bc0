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

Nothing here reads tensor data except :func:`read_tensors`, which streams one tensor at a time and
refuses NaN and Inf values (diffusers passes them through without a word).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from core.safetensors_files import (
    SNIFF_BYTES,
    SafetensorsDamage,
    SafetensorsHeader,
    TensorEntry,
    foreign_format,
    pickle_suffix,
)
from core.safetensors_files import read_header as read_safetensors_header
from model_build.architectures import (
    CONFIG_FAMILY,
    FAMILIES,
    KNOWN_CONFIGS,
    expected_checkpoint,
    load_component_config,
)
from model_build.dev_model import DEV_METADATA_KEY
from model_build.errors import CheckpointError, shown_names
from model_build.layout import (
    BASE_FAMILY,
    COMPONENT_PREFIXES,
    REFINER_COMPONENT_PREFIXES,
    REFINER_FAMILY,
    component_prefixes,
    to_original_layout,
)
from model_build.tensor_checks import all_finite

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

FAMILY_DESCRIPTIONS = {
    "sd1": "a Stable Diffusion 1.x checkpoint (one CLIP-L text encoder under cond_stage_model.transformer.)",
    "sd2": "a Stable Diffusion 2.x checkpoint (one OpenCLIP-H text encoder under cond_stage_model.model.)",
    "sdxl_mixed": (
        "a mix of an SDXL base and an SDXL refiner (the base's text encoders under conditioner.embedders.0.transformer."
        " or conditioner.embedders.1.model. beside a refiner's under conditioner.embedders.0.model.), a broken merge "
        "or two files joined"
    ),
    "sd3": "a Stable Diffusion 3 checkpoint (an MMDiT with joint_blocks, not a UNet)",
    "flux": "a Flux checkpoint (double_blocks/single_blocks transformer, not a UNet)",
    "lora": "a LoRA (lora_up/lora_down or lora_A/lora_B tensors), not a full checkpoint",
    "vae": "a VAE on its own, not a full checkpoint",
    "diffusers_component": "one component of a Diffusers folder (Diffusers tensor names, not the original layout)",
    "unet_only": "a bare UNet of an unknown family (no text encoders, no VAE)",
    "unknown": "not a Stable Diffusion checkpoint this converter recognises",
}
FAMILY_ADVICE = {
    "lora": "load it as a LoRA at generation time and convert the base SDXL checkpoint it was trained on",
    "vae": "pass it with --vae next to a full SDXL base checkpoint",
    "diffusers_component": "convert the model's original single-file .safetensors checkpoint instead",
    "sdxl_mixed": "convert the base and the refiner each from its own original file, into two --output folders",
}


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


# --- 1. format: decided from the name and the safetensors header, before any other parser sees the file ---

_FORMAT_ADVICE = {
    "a GGUF file (quantised weights)": "only .safetensors checkpoints convert",
    "a Git LFS pointer, not the file itself": "run `git lfs pull` or download the file",
    "an HTML page (a download that returned an error or a login page)": (
        "check the URL (and your access to it) and fetch it again"
    ),
}


def check_file_format(path: Path, role: str = "checkpoint") -> None:
    """Refuse anything that is not plausibly a safetensors file, above all pickles (never unpickled).

    A pickle suffix is refused by name alone. Otherwise the file's own safetensors header decides
    (:func:`core.safetensors_files.foreign_format`); only a file that does not start like one is
    named by the magic bytes of another format. :func:`read_header` checks the header in full.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{role} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{role} {path} is a folder; pass the single-file .safetensors checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{role} {path} is not a regular file (a pipe, socket or device); pass a .safetensors")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    suffix = pickle_suffix(path.name)
    other = foreign_format(head, path.stat().st_size)
    pickle_kind = other[0] if other and other[1] else (f"a {suffix} file" if suffix else None)
    if pickle_kind:
        raise CheckpointError(
            f"{path.name} is {pickle_kind}, a pickle checkpoint: loading a pickle can run arbitrary code, so it is "
            "never opened here. Use the model's .safetensors release, or convert the file to safetensors yourself "
            "in a sandbox you trust."
        )
    if other:
        description = other[0]
        raise CheckpointError(f"{path.name} is {description}, not a checkpoint; {_FORMAT_ADVICE[description]}")


# --- 2. the safetensors header, parsed by hand so that damage is named precisely ---

_DAMAGE_ADVICE = {
    "truncated": "The download or copy was cut short; fetch it again (a --sha256 pin catches this).",
    "corrupt": "Fetch it again.",
    "not_safetensors": "Only .safetensors checkpoints convert; fetch it again if it should be one.",
}


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header; raise :class:`CheckpointError` for a truncated or corrupt file."""
    path = Path(path)
    try:
        header = read_safetensors_header(path)
    except SafetensorsDamage as damage:
        raise CheckpointError(f"{path.name} {damage}. {_DAMAGE_ADVICE[damage.kind]}") from None
    try:  # the library must agree before anything is read through it
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise CheckpointError(f"{path.name} is not a valid safetensors file ({error}); fetch it again") from error
    return header


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorReader:
    """Reads one tensor at a time with plain file reads.

    safetensors' own reader maps the file: every page it touches stays mapped, and counted in the
    process's memory, until the file is closed, so streaming a 7 GB checkpoint through it shows up
    as 7 GB more memory. Plain reads leave only the tensor itself (the page cache is the kernel's).
    """

    def __init__(self, path: Path, header: SafetensorsHeader | None = None) -> None:
        self.path = Path(path)
        self.header = header or read_header(self.path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close() / the with block)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def get(self, key: str) -> torch.Tensor:
        entry = self.header.tensors[key]
        dtype = _TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointError(f"tensor {key} of {self.path.name} has dtype {entry.dtype}, which is not converted")
        data = bytearray(entry.end - entry.begin)
        view, done = memoryview(data), 0
        self._file.seek(self.header.data_start + entry.begin)
        while done < len(data):
            count = self._file.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{self.path.name} ended while reading tensor {key}: the file was cut short")
            done += count
        if not data:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)


# --- 3. what is it: family from the names, config from the shapes ---


def identify_family(keys: Iterable[str]) -> str:
    """``sdxl-base``, ``sdxl-refiner``, or what the file looks like instead (a key of FAMILY_DESCRIPTIONS)."""
    keys = set(keys)

    def any_prefix(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if any(re.search(r"(^|[._])lora(_unet|_te\d?)?[._]|\.lora_(up|down|A|B)\.|^lora_", key) for key in keys):
        return "lora"
    if any_prefix("model.diffusion_model.joint_blocks.", "joint_blocks.", "text_encoders.clip_g."):
        return "sd3"
    if any_prefix("double_blocks.", "single_blocks.", "model.diffusion_model.double_blocks."):
        return "flux"
    # The text encoders tell base from refiner: CLIP-L at embedder 0 and OpenCLIP-bigG at embedder 1,
    # or OpenCLIP-bigG alone at embedder 0.
    refiner_encoder = any_prefix(REFINER_COMPONENT_PREFIXES["text_encoder_2"])
    if refiner_encoder and any_prefix(COMPONENT_PREFIXES["text_encoder"], COMPONENT_PREFIXES["text_encoder_2"]):
        return "sdxl_mixed"
    if refiner_encoder:
        return REFINER_FAMILY
    if any_prefix("conditioner.embedders.", "model.diffusion_model.label_emb."):
        return BASE_FAMILY
    if any_prefix("cond_stage_model.model."):
        return "sd2"
    if any_prefix("cond_stage_model.transformer."):
        return "sd1"
    if any_prefix("model.diffusion_model."):
        return "unet_only"
    if keys and all(key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for key in keys):
        return "vae"
    if keys and all(key.startswith("first_stage_model.") for key in keys):
        return "vae"
    if any_prefix("down_blocks.", "time_embedding.", "text_model.encoder.", "encoder.down_blocks."):
        return "diffusers_component"
    return "unknown"


def refuse_family(path: Path, family: str, keys: Iterable[str]) -> None:
    if family in FAMILIES:
        return
    advice = FAMILY_ADVICE.get(family, "this converter handles SDXL base and SDXL refiner checkpoints only")
    first = f" (first tensors: {shown_names(sorted(keys))})" if family == "unknown" else ""
    raise CheckpointError(f"{path.name} looks like {FAMILY_DESCRIPTIONS[family]}{first}; {advice}.")


def expected_checkpoint_shape(config_name: str, key: str) -> tuple[int, ...] | None:
    """One tensor's expected shape, read from the config without building the model."""
    if key != "model.diffusion_model.input_blocks.0.0.weight":
        tensor = expected_checkpoint(config_name).get(key)
        return tensor.shape if tensor else None
    unet = load_component_config(config_name, "unet")
    return (unet["block_out_channels"][0], unet["in_channels"], unet["conv_in_kernel"], unet["conv_in_kernel"])


def choose_config(
    path: Path, shapes: Mapping[str, tuple[int, ...]], vae_replaced: bool = False, family: str = BASE_FAMILY
) -> str:
    """The shipped config of ``family`` whose tensor shapes this checkpoint has; an error naming sizes if none fits."""
    # Building a config's expected tensors costs a second for sdxl_base, so the UNet's first
    # convolution picks the candidate; all the family's configs are scored only when it matches none.
    signature = "model.diffusion_model.input_blocks.0.0.weight"
    configs = FAMILIES[family].configs
    candidates = [name for name in configs if expected_checkpoint_shape(name, signature) == shapes.get(signature)]
    scores = {}
    for name in candidates if len(candidates) == 1 else configs:
        expected = expected_checkpoint(name)
        scores[name] = sum(
            1
            for key, tensor in expected.items()
            if shapes.get(key) == tensor.shape and not (vae_replaced and tensor.component == "vae")
        )
    best = max(scores, key=scores.__getitem__)
    expected = expected_checkpoint(best)
    mismatched = [
        key
        for key, tensor in expected.items()
        if key in shapes and shapes[key] != tensor.shape and not (vae_replaced and tensor.component == "vae")
    ]
    if mismatched:
        conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
            raise CheckpointError(
                f"{path.name} has a UNet with {conv_in[1]} input channels (SDXL base has 4): an inpainting or "
                "other special-purpose SDXL variant, which this converter does not support."
            )
        _refuse_other_family_unet(path, shapes, family)
        details = shown_names(f"{k} is {list(shapes[k])}, expected {list(expected[k].shape)}" for k in mismatched)
        raise CheckpointError(
            f"{path.name} is SDXL-shaped but its tensor sizes match no shipped config (closest: {best}, "
            f"{len(mismatched)} tensors differ: {details}). Only the SDXL base and SDXL refiner architectures "
            f"({', '.join(KNOWN_CONFIGS)}) convert."
        )
    return best


def _refuse_other_family_unet(path: Path, shapes: Mapping[str, tuple[int, ...]], family: str) -> None:
    """A UNet shaped exactly like another family's, beside this family's text encoders: a mixed file."""
    unet_prefix = COMPONENT_PREFIXES["unet"]
    unet_shapes = {key: shape for key, shape in shapes.items() if key.startswith(unet_prefix)}
    for name in KNOWN_CONFIGS:
        if CONFIG_FAMILY[name] == family:
            continue
        wanted = {key: t.shape for key, t in expected_checkpoint(name).items() if t.component == "unet"}
        if wanted == unet_shapes:
            other = FAMILIES[CONFIG_FAMILY[name]].description
            if not any(key.startswith("conditioner.") for key in shapes):
                raise CheckpointError(
                    f"{path.name} has the UNet of {other} ({name}) but no text encoder at all: a full "
                    f"{other.removeprefix('an ')} holds its text encoders too. Convert the complete checkpoint."
                )
            raise CheckpointError(
                f"{path.name} mixes two SDXL models: its text encoders are those of {FAMILIES[family].description}, "
                f"but its UNet is shaped exactly like {other}'s ({name}). A broken merge or two files joined; "
                f"{FAMILY_ADVICE['sdxl_mixed']}."
            )


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


def _name_problems(missing: list[str], unknown: list[str], num_wanted: int) -> list[str]:
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
        parts = _name_problems(sorted(missing), sorted(unknown), len(wanted))
        if parts:
            problems.append(f"{component}: " + "; ".join(parts) + "." + _hints(component, missing, unknown))
    if stray:
        problems.append(
            f"{len(stray)} unknown tensors outside the {_COUNT_WORDS[len(prefixes)]} SDXL"
            f"{' refiner' if family.name == REFINER_FAMILY else ''} components ({shown_names(stray)}); the converter "
            "does not know what they are, so it will not guess"
        )
    if problems:
        what = "an SDXL refiner checkpoint" if family.name == REFINER_FAMILY else "an SDXL checkpoint"
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
        dtypes=tuple(sorted({entry.dtype for entry in header.tensors.values()})),
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


# --- reading tensor data: one tensor at a time, refusing NaN, Inf and overflow on the cast ---


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``name`` if it holds NaN or Inf values."""
    if all_finite(tensor):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise CheckpointError(
        f"tensor {name} ({where}) holds {nan} NaN and {inf} Inf values out of {tensor.numel()}: the checkpoint is "
        "damaged (a broken merge or fine-tune, or a corrupt file) and would only produce black or noise images. "
        "Fetch or export it again."
    )


def check_cast(original: torch.Tensor, cast: torch.Tensor, name: str, where: str, dtype_name: str) -> None:
    """A finite tensor that becomes Inf when cast does not fit the target dtype's range."""
    if cast is original or not cast.is_floating_point():
        return
    if all_finite(cast):
        return
    largest = float(original.abs().max())
    raise CheckpointError(
        f"tensor {name} ({where}) has values up to {largest:.4g}, beyond the range of {dtype_name}: converting it "
        f"would turn them into Inf. Convert with --dtype bf16 or --dtype fp32 instead."
    )


def read_tensors(
    path: Path, keys: Iterable[str], dtype: torch.dtype, dtype_name: str, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``keys`` from ``path``, checked for NaN/Inf and cast to ``dtype`` one at a time."""
    with TensorReader(path) as reader:
        for key in keys:
            tensor = reader.get(key)
            check_finite(tensor, key, where)
            cast = tensor.to(dtype) if tensor.is_floating_point() else tensor
            check_cast(tensor, cast, key, where, dtype_name)
            yield key, cast


# --- a separate VAE (--vae), in any of the three layouts VAE files come in ---

_LEGACY_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass(frozen=True)
class VaeFile:
    path: Path
    layout: str  # how the file named its tensors
    tensors: dict[str, torch.Tensor]  # original layout, with the first_stage_model. prefix, source dtype
    ignored: tuple[str, ...]


def load_vae_file(path: Path, config_name: str) -> VaeFile:
    """Read a VAE file (original layout with or without ``first_stage_model.``, or Diffusers layout).

    Returns its tensors renamed to the checkpoint's original layout, so the VAE is checked,
    converted and proven exactly like one inside a checkpoint.
    """
    path = Path(path)
    check_file_format(path, role="--vae file")
    header = read_header(path)
    prefix = COMPONENT_PREFIXES["vae"]
    keys = set(header.tensors)
    ignored = tuple(sorted(key for key in keys if key.startswith(("loss.", "model_ema."))))  # training leftovers
    keys -= set(ignored)
    where = f"--vae {path.name}"
    refuse_non_float_weights(f"--vae {path.name}", header.tensors, keys)
    with TensorReader(path, header) as reader:
        raw = {key: reader.get(key) for key in sorted(keys)}
    for key, tensor in raw.items():
        check_finite(tensor, key, where)
    if any(key.startswith(prefix) for key in keys):
        layout = f"original ({prefix}…)"
        tensors = raw
    elif "encoder.conv_in.weight" in keys and any(key.startswith("encoder.down.") for key in keys):
        layout = "original (no prefix)"
        tensors = {prefix + key: tensor for key, tensor in raw.items()}
    elif any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        layout = "diffusers"
        renamed = {}
        for key, tensor in raw.items():
            for old, new in _LEGACY_VAE_ATTENTION.items():  # diffusers < 0.14 attention names
                key = key.replace(old, new)
            renamed[key] = tensor
        try:
            tensors = to_original_layout("vae", renamed, load_component_config(config_name, "vae"))
        except KeyError as error:
            raise CheckpointError(f"{path.name}: unknown Diffusers VAE tensor {error}; is this an SDXL VAE?") from error
    else:
        raise CheckpointError(
            f"{path.name} does not look like a VAE (first tensors: {shown_names(sorted(keys))}); --vae takes an SDXL "
            "VAE .safetensors in the original or the Diffusers layout"
        )
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    stray = sorted(key for key in shapes if not key.startswith(prefix))
    if stray:
        raise CheckpointError(f"{path.name} holds tensors that are not the VAE's ({shown_names(stray)})")
    wanted = {key: t.shape for key, t in expected_checkpoint(config_name).items() if t.component == "vae"}
    missing = sorted(set(wanted) - set(shapes))
    unknown = sorted(set(shapes) - set(wanted))
    wrong = sorted(key for key in set(shapes) & set(wanted) if shapes[key] != wanted[key])
    problems = _name_problems(missing, unknown, len(wanted))
    if wrong:
        problems.append(
            f"{len(wrong)} with the wrong shape ("
            + shown_names(f"{k} is {list(shapes[k])}, expected {list(wanted[k])}" for k in wrong)
            + ")"
        )
    if problems:
        raise CheckpointError(
            f"--vae {path.name} ({layout} layout) is not a VAE for this checkpoint ({config_name}): "
            + "; ".join(problems)
        )
    return VaeFile(path, layout, tensors, ignored)
