"""FP8 (float8 e4m3) matrix products for the UNet's transformer linears (``QUANTIZE=fp8``; issue 23).

Cards with FP8 tensor cores (compute capability 8.9 and up: Ada, Hopper) multiply float8 matrices at about twice
their 16-bit rate. :func:`enable_fp8` turns the UNet's attention and feed-forward ``nn.Linear`` layers (those inside
its ``Transformer2DModel`` blocks, which hold most of its FLOPs) into :class:`Fp8Linear`, in place and without new
parameters: each call quantises its input per row (one scale per token) and its weight per output channel (one
scale per row of the weight) to e4m3 and multiplies with ``torch._scaled_mm`` (cuBLASLt's FP8 GEMM), the output in
bf16, then cast back to the UNet's dtype. Under ``torch.compile`` Inductor fuses each quantisation into one pass.

Why the weight is quantised on every call rather than once: the layer's parameter stays the 16-bit weight, so
everything that reads or writes weights is unchanged. A job's LoRAs merged into the weight (``LORA_FUSE=1``) are
quantised together with it at the next call, and restoring the weight bit for bit restores the layer bit for bit;
peft's LoRA layers (``LORA_FUSE=0``) wrap an :class:`Fp8Linear` like any ``nn.Linear`` (the base product
in FP8, the LoRA product in 16 bits). The cost is one read of each weight per step (~2.4 GB for SDXL at 4.8 TB/s:
~0.5 ms of a ~30 ms step); the memory is the same as without FP8.

Left in 16 bits: the cross-attention's ``to_k``/``to_v`` (they read the text encoders' 77-token states: small
products with little to gain, and the prompt's whole say over the image runs through them), the resnets'
convolutions and time embeddings, and any layer whose sizes are not multiples of 16 (``_scaled_mm`` needs them).
Per-row scales keep each image's arithmetic independent of the other images in its batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
# Layers inside the transformer blocks left in 16 bits: the cross-attention's projections of the text states.
KEEP_16_BIT = ("attn2.to_k", "attn2.to_v")


def refuse_reason(device: torch.device | str) -> str | None:
    """Why ``QUANTIZE=fp8`` cannot run on ``device`` (None when it can): the CPU, or a card without FP8."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"QUANTIZE=fp8 needs an NVIDIA GPU with FP8 tensor cores; the UNet runs on the {device.type.upper()}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"QUANTIZE=fp8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher (Ada, Hopper: "
            f"L4, L40S, RTX 4090, H100, H200); this card, {name}, has {major}.{minor}"
        )
    return None


def require_fp8(device: torch.device | str) -> None:
    """Raise :class:`core.errors.ConfigurationError` naming QUANTIZE and the card where FP8 cannot run."""
    reason = refuse_reason(device)
    if reason is not None:
        from core.errors import ConfigurationError

        raise ConfigurationError(f"{reason}: set QUANTIZE=off")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows x columns) as e4m3 and one float32 scale per row, so that ``x ≈ q * scale``; zero rows stay 0."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.clamp(amax, min=1e-12) / FP8_MAX
    q = torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through FP8: per-row input scales, per-output-channel weight scales."""
    shape = x.shape
    x_q, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    w_q, w_scale = quantize_rows(weight)
    # mat1 row-major, mat2 column-major (the weight's transpose is), scales (M, 1) and (1, N) in float32.
    out = torch._scaled_mm(
        x_q.contiguous(), w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16
    ).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], weight.shape[0])


class Fp8Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose product runs in FP8 (:func:`fp8_linear`); its parameters are the 16-bit ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[-1] % 16 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return super().forward(x)
        return fp8_linear(x, self.weight, self.bias)


def fp8_layer_names(unet: torch.nn.Module) -> list[str]:
    """The UNet's linears that :func:`enable_fp8` converts (see the module doc for what stays in 16 bits)."""
    names = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for name, module in block.named_modules():
            full = f"{block_name}.{name}"
            if type(module) is not torch.nn.Linear or full.endswith(KEEP_16_BIT):
                continue
            if module.in_features % 16 or module.out_features % 16:
                continue
            names.append(full)
    return names


def enable_fp8(unet: torch.nn.Module) -> list[str]:
    """Turn the UNet's transformer linears into :class:`Fp8Linear` in place (same objects, same parameters).

    No device check here (the CPU's ``_scaled_mm`` runs it for tests); the engine calls :func:`require_fp8` first.
    Returns the converted layers' names. Undo with :func:`disable_fp8`.
    """
    names = fp8_layer_names(unet)
    for name in names:
        unet.get_submodule(name).__class__ = Fp8Linear
    log.info("QUANTIZE=fp8: %d UNet linear layers run in float8", len(names))
    return names


def disable_fp8(unet: torch.nn.Module) -> int:
    """Every :class:`Fp8Linear` back to ``nn.Linear``; returns how many (for benchmarks comparing both)."""
    count = 0
    for module in unet.modules():
        if type(module) is Fp8Linear:
            module.__class__ = torch.nn.Linear
            count += 1
    return count


def fp8_layers(model: Any) -> int:
    """How many :class:`Fp8Linear` layers ``model`` holds (peft wrappers' base layers included)."""
    return sum(isinstance(module, Fp8Linear) for module in model.modules())
