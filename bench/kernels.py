"""Where a UNet call's GPU time goes: its kernels under torch's profiler, the largest first, grouped by kind.

The kinds answer issue 23's question (what bounds the step): matrix products (cuBLAS / nvjet / CUTLASS GEMMs),
convolutions (cuDNN), attention (flash / memory-efficient kernels), Inductor's fused Triton kernels (norms,
activations, residual adds) and the rest (copies, PyTorch's own elementwise kernels). ``busy_ms`` against the
call's wall time says how much of the step is the host's (launches, Python) rather than the GPU's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# Checked in this order: cuDNN's convolutions are implicit GEMMs, so "conv"-like names must win over "gemm".
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "cudnn", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "matmul", "addmm", "bmm", "aten::mm", "splitk")),
    ("triton_fused", ("triton_",)),
    ("copy", ("memcpy", "memset", "copy", "cat_", "catarray")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def kernel_profile(call: Callable[[], Any], calls: int = 3, top: int = 12) -> dict[str, Any]:
    """Profile ``calls`` runs of ``call`` (warmed up before: compiled code compiles outside the profile).

    Returns GPU milliseconds per call in total (``busy_ms``), by kind with shares, and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch.no_grad():
        call()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            for _ in range(calls):
                call()
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - started) / calls

    def self_us(event: Any) -> float:
        # On the CPU the operators' self times stand in for kernels (the dev model's figures are for checking only).
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    events = [event for event in prof.key_averages() if self_us(event) > 0]
    total = sum(self_us(event) for event in events) or 1.0
    by_kind: dict[str, float] = {}
    for event in events:
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + self_us(event)
    largest = sorted(events, key=self_us, reverse=True)[:top]
    return {
        "device": "cuda" if cuda else "cpu",
        "wall_ms": round(1000 * wall, 2),
        "busy_ms": round(total / calls / 1000, 2),
        "kernels_per_call": sum(event.count for event in events) // calls,
        "by_kind": {
            kind: {"ms": round(us / calls / 1000, 2), "share": round(us / total, 3)}
            for kind, us in sorted(by_kind.items(), key=lambda item: -item[1])
        },
        "top": [
            {
                "kernel": event.key[:90],
                "kind": kind_of(event.key),
                "ms": round(self_us(event) / calls / 1000, 3),
                "share": round(self_us(event) / total, 3),
                "calls": event.count // calls,
            }
            for event in largest
        ],
    }
