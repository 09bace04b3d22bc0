"""Floating-point work of full-size SDXL per UNet call and per VAE decode, counted on the meta device (no weights,
no GPU, seconds on a CPU): the floor under issue 23's speed targets.

    python bench/unet_flops.py [--rows 2 8 16] [--size 1024] [--out results.jsonl]

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products and convolutions (2 FLOP per multiply-add);
elementwise work, norms and softmax are not counted, so the figures are a lower bound. A CFG step at batch ``b``
is one UNet call of ``2b`` rows. With a measured time per step, ``tflop / seconds`` is the rate achieved, to be set
against the card's measured dense 16-bit rate (bench/results/README.md: ~790 TFLOP/s on the H200 machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.jsonlines import emit, start
from model_build.architectures import empty_component, materialize


def unet_call_flops(unet: torch.nn.Module, rows: int, latent: int) -> dict[str, float]:
    """FLOP of one UNet call on ``rows`` latents of ``latent``² (SDXL's added conditions, 77 prompt tokens)."""
    with torch.device("meta"):
        sample = torch.randn(rows, 4, latent, latent, dtype=torch.float16)
        prompt = torch.randn(rows, 77, 2048, dtype=torch.float16)
        added = {
            "text_embeds": torch.randn(rows, 1280, dtype=torch.float16),
            "time_ids": torch.randn(rows, 6, dtype=torch.float16),
        }
        timestep = torch.tensor(500.0)
    with FlopCounterMode(display=False) as counter:
        unet(sample, timestep, encoder_hidden_states=prompt, added_cond_kwargs=added)
    return {str(op): float(flops) for op, flops in counter.get_flop_counts()["Global"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16], help="UNet rows (2 = batch 1 with CFG)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start(args.out)
    materialize("sdxl_base", Path(tempfile.mkdtemp(prefix="sdxl-flops-")))
    unet = empty_component("sdxl_base", "unet").to(torch.float16)  # on meta: shapes only
    vae = empty_component("sdxl_base", "vae").to(torch.float16)
    latent = args.size // 8
    for rows in args.rows:
        by_op = unet_call_flops(unet, rows, latent)
        total = sum(by_op.values())
        emit(
            bench="unet_flops",
            size=args.size,
            unet_rows=rows,
            tflop=round(total / 1e12, 3),
            tflop_per_row=round(total / rows / 1e12, 3),
            by_op_tflop={op: round(flops / 1e12, 3) for op, flops in sorted(by_op.items(), key=lambda kv: -kv[1])},
        )
    with torch.device("meta"):
        latents = torch.randn(1, 4, latent, latent, dtype=torch.float16)
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    emit(bench="vae_decode_flops", size=args.size, tflop=round(counter.get_total_flops() / 1e12, 3))


if __name__ == "__main__":
    main()
