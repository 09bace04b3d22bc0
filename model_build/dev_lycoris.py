"""Random LyCORIS LoHa and LoKr files for a given SDXL pipeline, in the key layout LyCORIS writes: dev LyCORIS files.

``python -m model_build dev-lora OUT.safetensors --model models/sdxl-dev --kind loha`` (or ``lokr``) writes one
that fits the dev model, for trying the worker's LoHa/LoKr merging; the tests use the same functions.

The layers are named as Kohya's sd-scripts and LyCORIS name SDXL layers (``lora_unet_<original sgm module path>``,
``lora_te1_text_model_...``, ``lora_te2_text_model_...``), with LyCORIS' tensor names and shapes
(``lycoris/modules/loha.py`` and ``lokr.py`` at LyCORIS f49d30d): ``hada_w1_a`` (out x r), ``hada_w1_b``
(r x in·k·k), or for a k x k convolution with ``tucker`` ``hada_t1`` (r x r x k x k) with ``hada_w1_a`` (r x out)
and ``hada_w1_b`` (r x in); ``lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``) for the small Kronecker factor and
``lokr_w2_a``/``lokr_w2_b`` (or ``lokr_t2`` for a k x k convolution with ``tucker``) for the large one; one ``alpha``
per layer. The images such a file makes on the dev model are noise, as the dev model's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_build.dev_lora import (
    TEXT_ENCODERS,
    TEXT_KOHYA_TARGETS,
    UNET_KOHYA_TARGETS,
    adaptable_layers,
    kohya_name,
    load_dev_pipeline,
)

# Beyond Kohya's default targets, LyCORIS' usual SDXL presets also adapt the resnets: 3x3 and 1x1 convolutions and
# the time-embedding projections.
UNET_LYCORIS_TARGETS = (*UNET_KOHYA_TARGETS, "conv1", "conv2", "conv_shortcut", "time_emb_proj")
KINDS = ("loha", "lokr")


@dataclass
class RandomLycoris:
    """Per component, per module path: the layer's tensors under LyCORIS' names (without the layer name)."""

    kind: str
    rank: int
    alpha: float
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)


def factorization(dimension: int) -> tuple[int, int]:
    """``dimension = m * n`` with ``m <= n`` as close as possible (LyCORIS' split with its default factor -1)."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def random_lycoris(
    pipe: Any,
    kind: str,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    strength: float = 1.0,
    tucker: bool = False,
    decompose_both: bool = False,
    unet_targets: tuple[str, ...] = UNET_LYCORIS_TARGETS,
    text_targets: tuple[str, ...] = TEXT_KOHYA_TARGETS,
    components: tuple[str, ...] = ("unet", *TEXT_ENCODERS),
    device: str = "cpu",
) -> RandomLycoris:
    """Random LoHa (``kind="loha"``) or LoKr (``"lokr"``) factors for ``pipe``'s layers.

    Each layer's ΔW·alpha/rank has rows of norm about ``strength`` (a visible change on the dev model). ``tucker``
    stores k x k convolutions in the Tucker form, ``decompose_both`` stores LoKr's small factor as a product. The
    factors are drawn on ``device`` (fast on a GPU for a full-size model) and returned on the CPU, ready to save.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    generator = torch.Generator(device).manual_seed(seed)
    lycoris = RandomLycoris(kind=kind, rank=rank, alpha=float(alpha if alpha is not None else rank))
    for component in components:
        targets = unet_targets if component == "unet" else text_targets
        part: dict[str, dict[str, torch.Tensor]] = {}
        for name, module in adaptable_layers(getattr(pipe, component), targets):
            shape = tuple(module.weight.shape)
            make = _loha if kind == "loha" else _lokr
            tensors, product = make(shape, rank, generator, tucker and len(shape) == 4 and shape[2:] != (1, 1))
            if kind == "lokr" and decompose_both:
                w1 = tensors.pop("lokr_w1")
                tensors["lokr_w1_a"] = w1.clone()
                # w1_a @ w1_b == w1: the same update, decomposed
                tensors["lokr_w1_b"] = torch.eye(w1.shape[1], device=device)
            rows = shape[0]
            scale = strength * math.sqrt(rows) / (float(product.norm()) * lycoris.alpha / rank)
            first = "hada_w2_a" if kind == "loha" else "lokr_w2_a"
            tensors[first] = tensors[first] * scale  # ΔW is linear in this factor
            tensors["alpha"] = torch.tensor(lycoris.alpha)
            part[name] = {key: tensor.cpu() for key, tensor in tensors.items()}
        lycoris.layers[component] = part
    return lycoris


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device)


def _loha(shape: tuple[int, ...], rank: int, generator: torch.Generator, tucker: bool):
    out, fan_in = shape[0], math.prod(shape[1:])
    if tucker:
        kernel = shape[2:]
        tensors = {
            f"hada_{key}": value
            for index in ("1", "2")
            for key, value in (
                (f"w{index}_a", _randn(generator, rank, out)),
                (f"w{index}_b", _randn(generator, rank, shape[1])),
                (f"t{index}", _randn(generator, rank, rank, *kernel)),
            )
        }
        product = _tucker(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"]) * _tucker(
            tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"]
        )
        return tensors, product
    tensors = {
        "hada_w1_a": _randn(generator, out, rank),
        "hada_w1_b": _randn(generator, rank, fan_in),
        "hada_w2_a": _randn(generator, out, rank),
        "hada_w2_b": _randn(generator, rank, fan_in),
    }
    return tensors, (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])


def _lokr(shape: tuple[int, ...], rank: int, generator: torch.Generator, tucker: bool):
    (out_l, out_k), (in_m, in_n) = factorization(shape[0]), factorization(shape[1])
    kernel = shape[2:]
    w1 = _randn(generator, out_l, in_m)
    if tucker:
        tensors = {
            "lokr_w1": w1,
            "lokr_w2_a": _randn(generator, rank, out_k),
            "lokr_w2_b": _randn(generator, rank, in_n),
            "lokr_t2": _randn(generator, rank, rank, *kernel),
        }
        w2 = _tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
        return tensors, torch.kron(w1[:, :, None, None], w2.contiguous())
    tensors = {
        "lokr_w1": w1,
        "lokr_w2_a": _randn(generator, out_k, rank),
        "lokr_w2_b": _randn(generator, rank, in_n * math.prod(kernel)),
    }
    return tensors, torch.kron(w1, tensors["lokr_w2_a"] @ tensors["lokr_w2_b"])


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", core, wb, wa)


def kohya_lycoris_state_dict(lycoris: RandomLycoris, pipe: Any) -> dict[str, torch.Tensor]:
    """The file's tensors: ``<Kohya layer name>.<LyCORIS tensor name>``."""
    return {
        f"{kohya_name(pipe, component, module)}.{key}": tensor.contiguous()
        for component, part in lycoris.layers.items()
        for module, tensors in part.items()
        for key, tensor in tensors.items()
    }


def save_lycoris(lycoris: RandomLycoris, pipe: Any, path: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write as LyCORIS does (its ``ss_network_module``/``ss_network_args`` metadata), plus ``extra`` tensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": f'{{"algo": "{lycoris.kind}"}}',
        "ss_network_dim": str(lycoris.rank),
        "ss_network_alpha": str(lycoris.alpha),
    }
    save_file({**kohya_lycoris_state_dict(lycoris, pipe), **(extra or {})}, str(path), metadata=metadata)
    return path


def write_dev_lycoris(
    model_dir: Path, output: Path, kind: str, rank: int = 4, seed: int = 0, strength: float = 1.0
) -> Path:
    """A random LoHa or LoKr fitted to the converted model in ``model_dir`` (UNet and both text encoders)."""
    pipe = load_dev_pipeline(model_dir)
    return save_lycoris(random_lycoris(pipe, kind, rank=rank, seed=seed, strength=strength), pipe, output)
