"""QUANTIZE=fp8 on the CPU: the setting, its refusal without FP8 hardware, the FP8 product's error, merged LoRAs.

torch's CPU runs ``torch._scaled_mm`` with row-wise scales, so the layer's arithmetic is checked here; what only an
FP8 GPU can show (speed, the compiled kernels) is measured by ``bench/fp8_unet.py`` on the device machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import ConfigurationError
from core.settings import load_settings
from model_build.dev_lora import random_lora, save_diffusers_lora
from worker.adapters.lora.manager import LoraManager
from worker.adapters.lora.sources import LoraSettings
from worker.generation import fp8
from worker.generation.acceleration import SpeedupOptions, apply_speedups, options_from_settings

# e4m3 keeps 3 mantissa bits: each quantised value is within 2^-4 (6.25 %) of its input, relative. A product of
# two such values, summed over many terms of random sign, lands near 2^-4 / sqrt(3) * sqrt(2) = 5 % relative L2
# at worst and ~3.5 % typically (measured here on normal data). The bound: 5 %.
FP8_PRODUCT_ERROR = 0.05
# The output is rounded to bf16 (8 bits of mantissa): within 2^-8 of the exact product of the quantised operands.
BF16_ROUNDING = 2**-8


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def load_pipeline(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(3)
    return pipe("a cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent").images


@pytest.fixture(scope="module")
def pipe(dev_model_dir: Path):
    return load_pipeline(dev_model_dir)


# -- the setting and its refusal -------------------------------------------------------------------------------------


def test_quantize_is_off_by_default_and_parses_fp8_only() -> None:
    assert load_settings({}).quantize == "off"
    assert load_settings({"QUANTIZE": "fp8"}).quantize == "fp8"
    assert options_from_settings(load_settings({"QUANTIZE": "fp8"})).quantize == "fp8"
    with pytest.raises(ConfigurationError, match="QUANTIZE='int8' is invalid"):
        load_settings({"QUANTIZE": "int8"})
    with pytest.raises(ValueError, match="quantize='int4'"):
        SpeedupOptions(quantize="int4")


def test_fp8_is_refused_on_the_cpu_and_the_pipeline_is_left_as_it_was(pipe) -> None:
    before = {name: type(module) for name, module in pipe.unet.named_modules()}
    with pytest.raises(ConfigurationError, match=r"QUANTIZE=fp8 needs an NVIDIA GPU .* on the CPU: set QUANTIZE=off"):
        apply_speedups(pipe, options_from_settings(load_settings({"QUANTIZE": "fp8"})))
    assert {name: type(module) for name, module in pipe.unet.named_modules()} == before
    assert fp8.fp8_layers(pipe.unet) == 0


def test_the_engine_refuses_fp8_on_the_cpu(dev_model_dir: Path) -> None:
    from worker.generation.engine import Engine

    with pytest.raises(ConfigurationError, match=r"QUANTIZE=fp8 .* CPU"):
        Engine(dev_model_dir, settings=load_settings({"QUANTIZE": "fp8"}))


@pytest.mark.parametrize(
    ("capability", "name", "refused"),
    [
        ((8, 6), "NVIDIA A10G", True),
        ((8, 0), "NVIDIA A100-SXM4-80GB", True),
        ((7, 5), "Tesla T4", True),
        ((8, 9), "NVIDIA L4", False),
        ((9, 0), "NVIDIA H200", False),
    ],
)
def test_cards_without_fp8_are_refused_by_name_and_capability(monkeypatch, capability, name, refused) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    reason = fp8.refuse_reason(torch.device("cuda", 0))
    if not refused:
        assert reason is None
        fp8.require_fp8("cuda:0")  # raises nothing
        return
    assert f"this card, {name}, has {capability[0]}.{capability[1]}" in reason
    with pytest.raises(ConfigurationError, match=r"QUANTIZE=fp8 needs compute capability 8\.9 .*set QUANTIZE=off$"):
        fp8.require_fp8("cuda:0")


# -- the FP8 product -------------------------------------------------------------------------------------------------


def emulated(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact product of the quantised operands, in float64: what the FP8 GEMM computes before bf16 rounding."""
    x_q, x_scale = fp8.quantize_rows(x.reshape(-1, x.shape[-1]))
    w_q, w_scale = fp8.quantize_rows(weight)
    out = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()).t()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_linear_is_within_the_e4m3_bound_of_the_float_product(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes (per-row scales must handle each), a zero row, fan-in scaled weights
    x = torch.randn(2, 40, 320, generator=generator) * torch.logspace(-3, 4, 40).reshape(1, 40, 1)
    x[1, 7] = 0.0
    weight = torch.randn(640, 320, generator=generator) * 320**-0.5
    bias = torch.randn(640, generator=generator)
    out = fp8.fp8_linear(x, weight, bias)
    reference = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert out.shape == reference.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, 7], bias)  # a zero row gives exactly the bias (no 0/0)
    # Element by element: each operand is within u = 2^-4 of its value (relative; below e4m3's smallest normal,
    # within half its subnormal step, 2^-10 of the scale), so each product term within (2u + u^2) |x| |w| plus
    # the subnormal slack; then bf16 rounding of the sum.
    u = 2**-4
    rows = x.reshape(-1, 320).double()
    x_scale = fp8.quantize_rows(x.reshape(-1, 320))[1].double()
    w_scale = fp8.quantize_rows(weight)[1].double()
    magnitude = rows.abs() @ weight.double().abs().t()
    slack = (
        2**-10
        * (1 + u)
        * (x_scale @ weight.double().abs().sum(1, keepdim=True).t() + rows.abs().sum(1, keepdim=True) @ w_scale.t())
    )
    bound = (2 * u + u * u) * magnitude + slack + BF16_ROUNDING * (magnitude + bias.double().abs()) + 1e-6
    error = (out.reshape(-1, 640).double() - reference.reshape(-1, 640)).abs()
    assert (error <= bound).all(), float((error / bound).max())
    total = rel_l2(out - bias, reference - bias.double())
    assert 1e-3 < total < FP8_PRODUCT_ERROR  # really quantised, and within the typical bound for random data
    assert rel_l2(out, emulated(x, weight, bias)) < BF16_ROUNDING  # the GEMM is the product of the quantised values


def test_each_row_and_output_channel_has_its_own_scale() -> None:
    # Per-row activation scales and per-channel weight scales: scaling one row or one weight channel by a power of
    # two scales exactly that row or channel of the output and leaves every other output bit for bit as it was
    # (so an image's result does not depend on the other images of its batch).
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(24, 128, generator=generator)
    weight = torch.randn(64, 128, generator=generator) * 128**-0.5
    out = fp8.fp8_linear(x, weight, None)
    x2, weight2 = x.clone(), weight.clone()
    x2[3] *= 2.0**10
    weight2[5] *= 2.0**7
    out2 = fp8.fp8_linear(x2, weight2, None)
    others = torch.ones_like(out, dtype=torch.bool)
    others[3], others[:, 5] = False, False
    assert torch.equal(out2[others], out[others])
    assert torch.equal(out2[3, :5], out[3, :5] * 2.0**10)
    assert torch.equal(out2[:3, 5], out[:3, 5] * 2.0**7)
    assert torch.equal(fp8.fp8_linear(x[:7], weight, None), out[:7])  # fewer rows: the same rows


def test_fp8_linear_module_keeps_its_parameters_and_falls_back_where_fp8_cannot_run() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    weight = layer.weight.detach().clone()
    layer.__class__ = fp8.Fp8Linear
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), fp8.fp8_linear(x, layer.weight, layer.bias))
    assert torch.equal(layer.weight, weight) and layer.weight.dtype == torch.float32  # never written
    odd = torch.nn.Linear(24, 48)  # 24 is no multiple of 16: _scaled_mm refuses it, the layer runs in float
    odd.__class__ = fp8.Fp8Linear
    y = torch.randn(3, 24)
    assert torch.equal(odd(y), torch.nn.functional.linear(y, odd.weight, odd.bias))


# -- the dev UNet and merged LoRAs -----------------------------------------------------------------------------------


def test_enable_fp8_converts_the_transformer_linears_but_not_the_text_projections(pipe) -> None:
    unet = pipe.unet
    state = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    fresh = latents(pipe)
    names = fp8.enable_fp8(unet)
    try:
        assert names and fp8.fp8_layers(unet) == len(names)
        assert all(".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")) for name in names)
        assert not [name for name in names if name.endswith(fp8.KEEP_16_BIT)]
        assert any(name.endswith("attn2.to_q") for name in names) and any(name.endswith("ff.net.2") for name in names)
        kept = [n for n, m in unet.named_modules() if n.endswith(fp8.KEEP_16_BIT) and type(m) is torch.nn.Linear]
        assert kept  # the cross-attention's key and value projections exist and stay nn.Linear
        assert not any(isinstance(m, fp8.Fp8Linear) for n, m in unet.named_modules() if "time_emb" in n)
        quantised = latents(pipe)
        assert torch.isfinite(quantised).all()
        # 2 steps of the dev UNet: measured 0.05-0.12 relative L2 against float (bench/fp8_unet.py --dev: 4 steps,
        # cosine 0.993); well under 0.3 says each layer is right, above 1e-3 says the layers really are quantised.
        assert 1e-3 < rel_l2(quantised, fresh) < 0.3
        assert torch.equal(latents(pipe), quantised)  # deterministic
        assert unet.state_dict().keys() == state.keys()
        assert all(torch.equal(tensor, state[name]) for name, tensor in unet.state_dict().items())
    finally:
        assert fp8.disable_fp8(unet) == len(names)
    assert torch.equal(latents(pipe), fresh)


def test_merged_loras_are_quantised_with_their_weights_and_restored_bit_for_bit(pipe, tmp_path: Path) -> None:
    # The rule: FP8 stays on with LoRAs. A merged LoRA changes the 16-bit weight, which the next call quantises;
    # restoring the weight restores the layer. peft's layers (LORA_FUSE=0) wrap the FP8 layer like any Linear.
    from dataclasses import replace

    save_diffusers_lora(random_lora(pipe, rank=4, seed=11, components=("unet",)), tmp_path / "style.safetensors")
    job = [type("Lora", (), {"name": "style", "scale": 0.8})()]
    manager = LoraManager(pipe, settings=LoraSettings(roots=(tmp_path,)))
    try:
        manager.activate(job)  # float reference: the LoRA's effect without FP8
        float_lora = latents(pipe)
        manager.activate([])
        float_fresh = latents(pipe)
        weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
        names = fp8.enable_fp8(pipe.unet)
        try:
            fp8_fresh = latents(pipe)
            manager.activate(job)
            assert fp8.fp8_layers(pipe.unet) == len(names)  # merged: the UNet runs its own (FP8) modules
            fp8_merged = latents(pipe)
            lora_effect = rel_l2(float_lora, float_fresh)
            assert lora_effect > 0.05
            # with FP8 the LoRA moves the output as in float: the two runs differ by FP8's error, not the LoRA's
            assert rel_l2(fp8_merged, float_lora) < 0.3 * lora_effect + rel_l2(fp8_fresh, float_fresh)
            assert (
                torch.nn.functional.cosine_similarity(
                    (fp8_merged - fp8_fresh).flatten(), (float_lora - float_fresh).flatten(), dim=0
                )
                > 0.9
            )
            manager.activate([])
            for name, parameter in pipe.unet.named_parameters():  # copied back, not subtracted: exact
                assert torch.equal(parameter, weights[name]), name
            assert torch.equal(latents(pipe), fp8_fresh)

            manager.settings = replace(manager.settings, fuse_unet=False)  # LORA_FUSE=0: peft wraps the FP8 layer
            manager.activate(job)
            from peft.tuners.lora import Linear as LoraLinear

            wrapped = [m for m in pipe.unet.modules() if isinstance(m, LoraLinear)]
            assert wrapped and any(isinstance(m.get_base_layer(), fp8.Fp8Linear) for m in wrapped)
            peft_lora = latents(pipe)  # the base product in FP8, the LoRA's in float: close to the merged run
            assert rel_l2(peft_lora, fp8_merged) < 0.3 * lora_effect
            manager.activate([])
            assert torch.equal(latents(pipe), fp8_fresh)
        finally:
            fp8.disable_fp8(pipe.unet)
    finally:
        manager.clear()
    assert torch.equal(latents(pipe), float_fresh)
