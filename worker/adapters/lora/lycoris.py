"""One layer's weight update from a LoRA file that is merged into the weights: LoRA/LoCon, LoHa, LoKr, and DoRA.

Written from the formulas of the implementations people use these files with, read at these versions:
A1111 stable-diffusion-webui 1.10 (``extensions-builtin/Lora``: ``network.py`` with ``calc_scale`` applied before
``apply_weight_decompose`` since PR #16151, ``network_lora.py``, ``network_hada.py``, ``network_lokr.py``,
``lyco_helpers.py``), ComfyUI (``comfy/weight_adapter/base.py``, ``loha.py``, ``lokr.py`` at commits 14c2085,
17adbb5, 179c2d3), LyCORIS f49d30d (``lycoris/modules/loha.py``, ``lokr.py``: the key names and factor shapes it
writes) and peft 0.21.2 (``tuners/lora/dora.py``: the DoRA of diffusers/peft files). With ``s`` the layer's
``alpha / rank`` (1 without alpha) and ``m`` the request's scale:

- LoRA: ``ΔW = up @ down``; LoCon with Tucker decomposition (``lora_mid``): ``ΔW[i,j,k,l] = Σ mid[n,m,k,l]
  up[i,n] down[m,j]``. rank = ``lora_down``'s first dimension.
- LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with ``hada_t1/t2`` (Tucker) each factor is
  ``Σ t[i,j,k,l] w_b[j,r] w_a[i,p] -> [p,r,k,l]``. rank = ``hada_w1_b``'s first dimension.
- LoKr: ``ΔW = w1 ⊗ w2`` (Kronecker), ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, ``w2 = lokr_w2``,
  ``lokr_w2_a @ lokr_w2_b`` or the Tucker form with ``lokr_t2``. rank = ``lokr_w2_b``'s first dimension, else
  ``lokr_w1_b``'s; with both halves full there is no rank and ``s = 1``.
- The new weight is ``W + m·s·ΔW`` (ΔW reshaped to the weight's shape: a conv's 2-D product is ``out x in·k·k``).
- Kohya/LyCORIS DoRA (``dora_scale``, one magnitude per *input* channel, shape ``1 x in``), as A1111 1.10 and
  ComfyUI apply it: ``W + m·(dora_scale / ‖W + s·ΔW‖ · (W + s·ΔW) − W)``, the norm taken per input channel.
- diffusers/peft DoRA (``lora_magnitude_vector``, one magnitude per *output* channel), as peft merges it:
  ``magnitude / ‖W + m·s·ΔW‖ · (W + m·s·ΔW)``, the norm taken per output channel (``torch.linalg.norm(W, dim=1)``).

Everything is computed in float32 from the layer's current weight; the caller rounds once to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Key suffixes after the layer name, per adapter type (Kohya/LyCORIS names; diffusers' lora_A/lora_B are LoRA's).
_LORA = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
_LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
_COMMON = {"alpha", "dora_scale"}
KNOWN_SUFFIXES = _LORA | _LOHA | _LOKR | _COMMON


class UpdateError(ValueError):
    """A layer's tensors do not make a weight update (missing, unknown or mismatched factors)."""


@dataclass(frozen=True)
class LayerUpdate:
    """The tensors of one layer as the file stores them, and how they become a new weight."""

    kind: str  # "LoRA", "LoCon (Tucker)", "LoHa", "LoKr"
    factors: dict[str, torch.Tensor]
    scale: float  # alpha / rank, or 1.0
    dora: torch.Tensor | None = None  # the magnitudes, flattened
    dora_axis: str = "input"  # "input": Kohya/LyCORIS dora_scale; "output": peft's lora_magnitude_vector

    @property
    def nbytes(self) -> int:
        tensors = [*self.factors.values(), *([self.dora] if self.dora is not None else [])]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def to(self, device: torch.device | str) -> LayerUpdate:
        factors = {key: tensor.to(device) for key, tensor in self.factors.items()}
        return replace(self, factors=factors, dora=None if self.dora is None else self.dora.to(device))

    def product(self) -> torch.Tensor:
        """ΔW before scaling (2-D ``out x in·k·k`` or 4-D), in float32."""
        f = {key: tensor.float() for key, tensor in self.factors.items()}
        if self.kind in ("LoRA", "LoCon (Tucker)"):
            up, down = f["lora_up.weight"], f["lora_down.weight"]
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            if "lora_mid.weight" in f:
                return torch.einsum("n m k l, i n, m j -> i j k l", f["lora_mid.weight"], up, down)
            return up @ down
        if self.kind == "LoHa":
            if "hada_t1" in f:
                first = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
                return first * _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
            return _flat_product(f["hada_w1_a"], f["hada_w1_b"]) * _flat_product(f["hada_w2_a"], f["hada_w2_b"])
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = _flat_product(f["lokr_w2_a"], f["lokr_w2_b"])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous())  # kron fails on a strided einsum result (A1111's make_kron too)

    def shape(self) -> torch.Size:
        """The shape of :meth:`product`, worked out on the meta device (no memory, no arithmetic)."""
        meta = {key: torch.empty(tensor.shape, device="meta") for key, tensor in self.factors.items()}
        try:
            return replace(self, factors=meta, dora=None).product().shape
        except RuntimeError as error:
            raise UpdateError(f"its {self.kind} factors do not fit together ({_shapes(self.factors)})") from error

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """The new weight (float32) from the current one (float32) at the request's scale ``multiplier``."""
        delta = self.product().to(weight.device).reshape(weight.shape) * self.scale
        if self.dora is None:
            return weight + multiplier * delta
        magnitude = self.dora.to(weight.device, torch.float32)
        if self.dora_axis == "input":
            merged = weight + delta
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            column = (1, -1, *[1] * (weight.ndim - 2))
            return weight + multiplier * (merged * (magnitude.reshape(column) / norm.reshape(column)) - weight)
        merged = weight + multiplier * delta
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        row = (-1, *[1] * (weight.ndim - 1))
        return merged * (magnitude.reshape(row) / norm.reshape(row))

    def check_fits(self, weight_shape: torch.Size) -> str | None:
        """Why this update cannot be merged into a weight of ``weight_shape`` (None when it can)."""
        shape = self.shape()
        if shape[0] != weight_shape[0] or shape.numel() != weight_shape.numel():
            return f"is {_dims(weight_shape)} but the {self.kind} update is {_dims(shape)}"
        if self.dora is not None:
            axis = 1 if self.dora_axis == "input" else 0
            if self.dora.numel() != weight_shape[axis]:
                side = "input" if axis else "output"
                return f"has {weight_shape[axis]} {side} channels but {self.dora.numel()} DoRA magnitudes"
        return None


def kohya_update(name: str, tensors: dict[str, torch.Tensor]) -> LayerUpdate:
    """The update of one Kohya/LyCORIS-named layer from its tensors (``{"hada_w1_a": ..., "alpha": ...}``)."""
    unknown = sorted(set(tensors) - KNOWN_SUFFIXES)
    if unknown:
        raise UpdateError(f"{name} has keys of no supported adapter type ({', '.join(unknown)})")
    kinds = [kind for kind, keys in (("LoRA", _LORA), ("LoHa", _LOHA), ("LoKr", _LOKR)) if keys & set(tensors)]
    if len(kinds) != 1:
        raise UpdateError(f"{name} has {' and '.join(kinds) or 'no'} weights; a layer is one adapter type")
    kind, keys = kinds[0], set(tensors)
    if kind == "LoRA":
        _require(name, keys, {"lora_down.weight", "lora_up.weight"})
        if "lora_mid.weight" in keys:
            kind = "LoCon (Tucker)"
        rank: int | None = int(tensors["lora_down.weight"].shape[0])
    elif kind == "LoHa":
        _require(name, keys, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
        if ("hada_t1" in keys) != ("hada_t2" in keys):
            raise UpdateError(f"{name} has one of hada_t1/hada_t2 without the other")
        rank = int(tensors["hada_w1_b"].shape[0])
    else:
        for half in ("1", "2"):
            if f"lokr_w{half}" not in keys:
                _require(name, keys, {f"lokr_w{half}_a", f"lokr_w{half}_b"})
        if "lokr_t2" in keys and "lokr_w2" in keys:
            raise UpdateError(f"{name} has both lokr_w2 and lokr_t2")
        decomposed = [key for key in ("lokr_w2_b", "lokr_w1_b") if key in keys]
        rank = int(tensors[decomposed[0]].shape[0]) if decomposed else None
    scale = 1.0
    if "alpha" in tensors and rank is not None:
        scale = float(tensors["alpha"].float().item()) / rank
    factors = {key: value for key, value in tensors.items() if key not in _COMMON}
    dora = tensors.get("dora_scale")
    if dora is not None and dora.ndim >= 2 and dora.shape[0] != 1:
        # LyCORIS' wd_on_out: magnitudes per output channel, which neither A1111 1.10 nor ComfyUI applies as such.
        raise UpdateError(
            f"{name} has DoRA magnitudes per output channel (dora_scale {tuple(dora.shape)}, LyCORIS wd_on_out); "
            "A1111 1.10 and ComfyUI read dora_scale per input channel (1 x in), so no reference says how to apply it"
        )
    return LayerUpdate(kind, factors, scale, None if dora is None else dora.flatten(), "input")


def peft_update(module: str, tensors: dict[str, torch.Tensor], scaling: float) -> LayerUpdate:
    """A diffusers/peft layer (``lora_A.weight``, ``lora_B.weight``, optional ``lora_magnitude_vector``)."""
    unknown = sorted(set(tensors) - {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"})
    if unknown:
        raise UpdateError(f"{module} has keys this worker cannot merge ({', '.join(unknown)})")
    _require(module, set(tensors), {"lora_A.weight", "lora_B.weight"})
    factors = {"lora_down.weight": tensors["lora_A.weight"], "lora_up.weight": tensors["lora_B.weight"]}
    magnitude = tensors.get("lora_magnitude_vector")
    return LayerUpdate("LoRA", factors, scaling, None if magnitude is None else magnitude.flatten(), "output")


def _require(name: str, keys: set[str], required: set[str]) -> None:
    missing = sorted(required - keys)
    if missing:
        raise UpdateError(f"{name} lacks {', '.join(missing)}")


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A1111's ``make_weight_cp`` / ComfyUI's einsum: ``wa`` is rank x out, ``wb`` rank x in."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, wb, wa)


def _flat_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with conv factors flattened to 2-D (A1111's ``rebuild_conventional``)."""
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def _dims(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def _shapes(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{key} {_dims(tensor.shape)}" for key, tensor in sorted(tensors.items()))
