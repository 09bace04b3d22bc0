"""COMPILE=aot for a UNet whose batch cannot stay open at export (code that fixes it somewhere): the call's exact
shapes are packaged instead, and a marker beside the package spares the next start the failed export.

In a file of its own: it builds a second real package (about 50 s on 2 cores), which pytest-xdist can then run
beside test_aot_unet.py's build instead of after it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.settings import load_settings
from worker.generation.engine import Engine
from worker.request.schema import GenerationRequest

JOB = {"prompt": "a lighthouse at dawn", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 7}


def image(engine: Engine) -> np.ndarray:
    return np.asarray(engine.generate(GenerationRequest(**JOB)).images[0].convert("RGB"), dtype=np.int16)


def test_a_unet_whose_batch_cannot_stay_open_gets_a_package_for_its_exact_shapes(
    dev_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.exc import UserError, UserErrorType

    export = torch.export.export
    exports: list[bool] = []

    def fixed_batch(module, inputs, dynamic_shapes=None, **kwargs):
        exports.append(dynamic_shapes is not None)
        if dynamic_shapes is not None:
            raise UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (rows)!")
        return export(module, inputs, **kwargs)

    monkeypatch.setattr(torch.export, "export", fixed_batch)
    settings = load_settings({"COMPILE": "aot", "COMPILE_CACHE_DIR": str(tmp_path / "cache"), "WARMUP_SIZES": "64x64"})
    exact = Engine(dev_model_dir, settings=settings)
    (package,) = exact.accelerator.report.aot_packages
    assert exact.accelerator.report.error is None and not package["hit"] and package["batch_rows"] is None
    assert exports == [True, False]  # the open batch tried once, then the exact shapes
    (marker,) = (tmp_path / "cache" / "aot").glob("*.batch-closed.txt")
    assert "Constraints violated (rows)" in marker.read_text()
    eager = Engine(dev_model_dir, settings=load_settings({}))
    assert np.abs(image(exact) - image(eager)).max() <= 2
    assert exact.accelerator.aot.packaged_calls >= 3

    again = Engine(dev_model_dir, settings=settings)  # the marker: no export at all, the exact package loaded
    (loaded,) = again.accelerator.report.aot_packages
    assert exports == [True, False] and loaded["hit"] and loaded["key"] == package["key"]
