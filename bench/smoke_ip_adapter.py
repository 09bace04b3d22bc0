"""The smoke's IP-Adapter checks (bench/smoke.py), on random IP-Adapters in h94/IP-Adapter's layout
(``model_build dev-ip-adapter``: at full size SDXL's ``ip-adapter_sdxl_vit-h`` and ``ip-adapter-plus_sdxl_vit-h``
with a random OpenCLIP ViT-H image encoder; in the dry run the dev-sized ones).

Each check returns its details with ``ok``; every one also requires that the plain job after it gives the square
job's bytes (the UNet's processors restored, and with ``COMPILE`` set its compiled code running again: a guard that
failed would run it eagerly, whose fp16 bytes differ).
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.smoke_inpainting import pixels, run_job

ROOT = Path(__file__).resolve().parents[1]


def build_ip_adapters(work: Path, full_size: bool) -> tuple[Path, dict[str, str]]:
    """The IP_ADAPTER_DIR folder as ``model_build`` writes it, and its adapters' names by kind."""
    root = work / "ip-adapters"
    size = ["--full-size"] if full_size else []
    subprocess.run(
        [sys.executable, "-m", "model_build", "-q", "dev-ip-adapter", str(root), *size], check=True, cwd=ROOT
    )
    if full_size:
        return root, {"ip-adapter": "ip-adapter_sdxl_vit-h", "plus": "ip-adapter-plus_sdxl_vit-h"}
    return root, {"ip-adapter": "ip-adapter_dev", "plus": "ip-adapter-plus_dev_vit-h"}


def reference_image() -> str:
    """A 512x384 photo-sized PNG data URI (not square: CLIP's processor resizes and crops it)."""
    rows = np.linspace(0, 255, 384, dtype=np.uint8)[:, None, None]
    columns = np.linspace(255, 0, 512, dtype=np.uint8)[None, :, None]
    picture = np.concatenate([np.broadcast_to(rows, (384, 512, 1)), np.broadcast_to(columns, (384, 512, 1)),
                              np.full((384, 512, 1), 90, np.uint8)], axis=2)  # fmt: skip
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ip_adapter_checks(
    worker: Any, base: dict[str, Any], first: dict[str, Any], names: dict[str, str], lora: str
) -> list[tuple[str, dict[str, Any]]]:
    """``ip_adapter_plus`` and ``ip_adapter`` (each kind steers the image and is listed in the metadata),
    ``ip_adapter_scale0`` (the square job's pixels exactly), ``ip_adapter_lora`` (with the fused LoRA ``lora``;
    the LoRA job after it gives the LoRA job's image from before it)."""
    if "error" in first:
        return [("ip_adapter", {"ok": False, "error": "the square job failed: nothing to compare with"})]
    image = reference_image()
    plain = pixels(first["images"][0])
    lora_before, _ = run_job(worker, "lora-before-ip-adapter", **base, seed=7, loras=[{"name": lora, "scale": 0.8}])
    checks = []
    for check, kind, scale, extra in (
        ("ip_adapter_plus", "plus", 0.6, {}),
        ("ip_adapter", "ip-adapter", 0.6, {}),
        ("ip_adapter_scale0", "plus", 0.0, {}),
        ("ip_adapter_lora", "plus", 0.6, {"loras": [{"name": lora, "scale": 0.8}]}),
    ):
        unit = {"name": names[kind], "image": image, "scale": scale}
        output, seconds = run_job(worker, check, **base, **extra, seed=7, ip_adapters=[unit])
        after, _ = run_job(worker, f"after-{check}", **base, seed=7)
        metadata = output.get("metadata", {})
        listed = metadata.get("ip_adapters") or [{}]
        made = "error" not in output and "error" not in after
        steered = made and not np.array_equal(pixels(output["images"][0]), plain)
        details: dict[str, Any] = {
            "seconds": round(seconds, 2),
            "error": output.get("error") or after.get("error"),
            "ip_adapters": metadata.get("ip_adapters"),
            "cache": metadata.get("cache", {}).get("ip_adapters"),
            "timings": metadata.get("timings"),
            "no_ip_adapter_after_equals_before": made and after["images"][0] == first["images"][0],
        }
        ok = made and listed[0].get("kind") == kind and details["no_ip_adapter_after_equals_before"]
        if check == "ip_adapter_scale0":
            details["equals_plain"] = made and not steered
            ok = ok and details["equals_plain"]
        else:
            details["steers"] = steered
            ok = ok and steered
        if check == "ip_adapter_lora":
            lora_after, _ = run_job(
                worker, "lora-after-ip-adapter", **base, seed=7, loras=[{"name": lora, "scale": 0.8}]
            )
            same = "error" not in lora_before and lora_after.get("images") == lora_before.get("images")
            details["lora_after_equals_lora_before"] = same
            ok = ok and same and [e.get("name") for e in metadata.get("loras", [])] == [lora]
        checks.append((check, {"ok": ok, **details}))
    return checks
