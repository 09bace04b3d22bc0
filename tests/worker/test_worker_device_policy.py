"""The offload decision from memory figures (no GPU needed: the policy is a pure function)."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError
from worker.model.placement import ACTIVATION_HEADROOM, GIB, plan_device

SDXL_FP16 = {
    "unet": int(4.8 * GIB),
    "vae": int(0.3 * GIB),
    "text_encoder": int(0.23 * GIB),
    "text_encoder_2": int(1.3 * GIB),
}
TOTAL = sum(SDXL_FP16.values())


def test_cpu_only_machine_runs_on_cpu() -> None:
    assert plan_device("auto", False, None, SDXL_FP16).device == "cpu"


def test_enough_memory_keeps_everything_on_the_gpu() -> None:
    plan = plan_device("auto", True, 80 * GIB, SDXL_FP16)
    assert (plan.device, plan.offload) == ("cuda", "none")


def test_less_memory_uses_model_offload() -> None:
    free = TOTAL + ACTIVATION_HEADROOM - 1
    assert plan_device("auto", True, free, SDXL_FP16).offload == "model"


def test_very_little_memory_uses_sequential_offload() -> None:
    assert plan_device("auto", True, 4 * GIB, SDXL_FP16).offload == "sequential"


def test_override_wins_and_is_explained() -> None:
    plan = plan_device("sequential", True, 80 * GIB, SDXL_FP16)
    assert plan.offload == "sequential" and "OFFLOAD=sequential" in plan.reason


def test_bad_override_and_gpu_modes_without_gpu_are_errors() -> None:
    with pytest.raises(ConfigurationError, match="OFFLOAD"):
        plan_device("sometimes", True, 80 * GIB, SDXL_FP16)
    with pytest.raises(ConfigurationError, match="needs a CUDA GPU"):
        plan_device("model", False, None, SDXL_FP16)
