"""LyCORIS LoHa/LoKr, Tucker LoCon and DoRA: each layer's new weight against a reference, and through the worker.

The references are written here from the formulas (A1111 1.10's ``extensions-builtin/Lora``, ComfyUI's
``comfy/weight_adapter``, peft 0.21.2's ``tuners/lora/dora.py``), index by index in float64, without calling the
worker's code; the worker's :mod:`worker.adapters.lora.lycoris` computes them with matrix products in float32.
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from core.settings import load_settings
from model_build.dev_lora import TEXT_ENCODERS, kohya_name, random_lora, save_kohya_lora
from model_build.dev_lycoris import random_lycoris, save_lycoris
from worker.adapters.lora.lycoris import UpdateError, kohya_update, peft_update
from worker.adapters.lora.manager import LoraManager
from worker.adapters.lora.sources import LoraSettings
from worker.handler import Worker

LINEAR = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV_1X1 = "down_blocks.1.resnets.0.conv_shortcut"
CONV_3X3 = "down_blocks.1.resnets.0.conv1"
TEXT_LINEAR = "encoder.layers.0.self_attn.q_proj"
JOB = {"prompt": "a lighthouse at dawn", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- references, straight from the formulas ------------------------------------------------------------------------


def matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a @ b)[i, j] = Σ_r a[i, r] b[r, j], as a broadcast sum (conv factors flattened to 2-D)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return (a[:, :, None] * b[None, :, :]).sum(dim=1)


def tucker_ref(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, k, l] = Σ_i Σ_j core[i, j, k, l] a[i, p] b[j, q] (a: rank x out, b: rank x in), as a broadcast sum."""
    core, a, b = core.double(), a.double(), b.double()
    terms = core[:, :, None, None] * a[:, None, :, None, None, None] * b[None, :, None, :, None, None]
    return terms.sum(dim=(0, 1))


def lora_mid_ref(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """A1111's rebuild_cp_decomposition: W[i, j, k, l] = Σ_n Σ_m mid[n, m, k, l] up[i, n] down[m, j]."""
    return tucker_ref(mid, up.reshape(up.shape[0], -1).T, down.reshape(down.shape[0], -1))


def kron_ref(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(w1 ⊗ w2)[a·C + c, b·D + d] = w1[a, b] w2[c, d]; a 4-D w2 keeps its kernel dimensions."""
    w1, w2 = w1.double(), w2.double()
    rows, cols = w2.shape[:2]
    out = torch.zeros(w1.shape[0] * rows, w1.shape[1] * cols, *w2.shape[2:], dtype=torch.float64)
    for a in range(w1.shape[0]):
        for b in range(w1.shape[1]):
            out[a * rows : (a + 1) * rows, b * cols : (b + 1) * cols] = w1[a, b] * w2
    return out


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[:, j, ...]‖ for each input channel j."""
    return torch.stack([weight[:, j].double().pow(2).sum().sqrt() for j in range(weight.shape[1])])


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[i, ...]‖ for each output channel i."""
    return torch.stack([weight[i].double().pow(2).sum().sqrt() for i in range(weight.shape[0])])


def expand(values: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


# -- each formula, per layer kind ----------------------------------------------------------------------------------

SHAPES = {"linear": (6, 4), "conv 1x1": (6, 4, 1, 1), "conv 3x3": (6, 4, 3, 3)}


def loha_case(shape: tuple[int, ...], tucker: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    out, fan_in, rank = shape[0], shape[1], 2
    if tucker:
        t = {f"hada_t{i}": rand(rank, rank, *shape[2:], seed=i) for i in (1, 2)}
        t |= {f"hada_w{i}_a": rand(rank, out, seed=10 + i) for i in (1, 2)}
        t |= {f"hada_w{i}_b": rand(rank, fan_in, seed=20 + i) for i in (1, 2)}
        ref = tucker_ref(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        return t, ref * tucker_ref(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    flat = fan_in * (shape[2] * shape[3] if len(shape) == 4 else 1)
    t = {f"hada_w{i}_a": rand(out, rank, seed=10 + i) for i in (1, 2)}
    t |= {f"hada_w{i}_b": rand(rank, flat, seed=20 + i) for i in (1, 2)}
    product = matmul_ref(t["hada_w1_a"], t["hada_w1_b"]) * matmul_ref(t["hada_w2_a"], t["hada_w2_b"])
    return t, product.reshape(shape)


def lokr_case(shape: tuple[int, ...], variant: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """6 = 2 x 3 output rows, 4 = 2 x 2 input channels; rank 2."""
    kernel = shape[2:]
    w1 = rand(2, 2, seed=1)
    if variant == "w1 full, w2 = a @ b":
        t = {"lokr_w1": w1, "lokr_w2_a": rand(3, 2, seed=2), "lokr_w2_b": rand(2, 2 * math.prod(kernel), seed=3)}
        w2 = matmul_ref(t["lokr_w2_a"], t["lokr_w2_b"])
        return t, kron_ref(w1, w2).reshape(shape)
    if variant == "w1 = a @ b, w2 full":
        t = {"lokr_w1_a": rand(2, 2, seed=4), "lokr_w1_b": rand(2, 2, seed=5), "lokr_w2": rand(3, 2, *kernel, seed=6)}
        return t, kron_ref(matmul_ref(t["lokr_w1_a"], t["lokr_w1_b"]), t["lokr_w2"]).reshape(shape)
    if variant == "w2 Tucker":
        t = {"lokr_w1": w1, "lokr_t2": rand(2, 2, *kernel, seed=7)}
        t |= {"lokr_w2_a": rand(2, 3, seed=8), "lokr_w2_b": rand(2, 2, seed=9)}
        return t, kron_ref(w1, tucker_ref(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]))
    t = {"lokr_w1": w1, "lokr_w2": rand(3, 2, *kernel, seed=10)}  # both full
    return t, kron_ref(w1, t["lokr_w2"]).reshape(shape)


def lora_case(shape: tuple[int, ...], tucker: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    kernel = shape[2:]
    if tucker:
        t = {
            "lora_down.weight": rand(2, shape[1], 1, 1, seed=1),
            "lora_mid.weight": rand(2, 2, *kernel, seed=2),
            "lora_up.weight": rand(shape[0], 2, 1, 1, seed=3),
        }
        return t, lora_mid_ref(t["lora_up.weight"], t["lora_down.weight"], t["lora_mid.weight"])
    t = {
        "lora_down.weight": rand(2, *shape[1:], seed=1),
        "lora_up.weight": rand(shape[0], 2, *[1] * len(kernel), seed=3),
    }
    return t, matmul_ref(t["lora_up.weight"], t["lora_down.weight"]).reshape(shape)


CASES = [
    *[(f"LoHa {kind}", "LoHa", shape, lambda s: loha_case(s, False), 2) for kind, shape in SHAPES.items()],
    ("LoHa conv 3x3 Tucker (hada_t1/t2)", "LoHa", SHAPES["conv 3x3"], lambda s: loha_case(s, True), 2),
    *[
        (f"LoKr {kind}, {variant}", "LoKr", shape, lambda s, v=variant: lokr_case(s, v), None if full else 2)
        for kind, shape in SHAPES.items()
        for variant, full in (("w1 full, w2 = a @ b", False), ("w1 = a @ b, w2 full", False), ("both full", True))
    ],
    ("LoKr conv 3x3, w2 Tucker (lokr_t2)", "LoKr", SHAPES["conv 3x3"], lambda s: lokr_case(s, "w2 Tucker"), 2),
    ("LoCon conv 3x3 Tucker (lora_mid)", "LoCon (Tucker)", SHAPES["conv 3x3"], lambda s: lora_case(s, True), 2),
    *[(f"LoRA {kind}", "LoRA", shape, lambda s: lora_case(s, False), 2) for kind, shape in SHAPES.items()],
]


@pytest.mark.parametrize(("label", "kind", "shape", "make", "rank"), CASES, ids=[case[0] for case in CASES])
def test_each_update_is_its_formula_times_alpha_over_rank(label, kind, shape, make, rank) -> None:
    tensors, reference = make(shape)
    alpha, multiplier = 3.0, 0.7
    update = kohya_update("layer", {**tensors, "alpha": torch.tensor(alpha)})
    assert update.kind == kind
    weight = rand(*shape, seed=99)
    scale = alpha / rank if rank else 1.0  # LoKr with both halves full has no rank: A1111 and ComfyUI use 1
    expected = weight.double() + multiplier * scale * reference
    torch.testing.assert_close(update.apply(weight, multiplier).double(), expected, rtol=1e-5, atol=1e-5)
    without_alpha = kohya_update("layer", tensors)  # no alpha: scale 1
    torch.testing.assert_close(
        without_alpha.apply(weight, 1.0).double(), weight.double() + reference, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape", [SHAPES["linear"], SHAPES["conv 3x3"]], ids=["linear", "conv 3x3"])
def test_kohya_dora_is_a1111_weight_decomposition_per_input_channel(shape) -> None:
    # A1111 1.10 network.py: updown * alpha/rank, then W + multiplier * (dora_scale / ‖W + ΔW‖_col * (W + ΔW) - W).
    tensors, reference = lora_case(shape, False)
    dora_scale = 1.0 + rand(1, shape[1], *[1] * (len(shape) - 2), seed=5).abs()
    update = kohya_update("layer", {**tensors, "alpha": torch.tensor(1.0), "dora_scale": dora_scale})
    weight = rand(*shape, seed=98)
    merged = weight.double() + 0.5 * reference  # alpha 1 / rank 2
    decomposed = merged * expand(dora_scale.flatten().double() / column_norms(merged), 1, len(shape))
    for multiplier in (1.0, 0.6, -0.4):
        expected = weight.double() + multiplier * (decomposed - weight.double())
        torch.testing.assert_close(update.apply(weight, multiplier).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [SHAPES["linear"], SHAPES["conv 3x3"]], ids=["linear", "conv 3x3"])
def test_peft_dora_is_peft_magnitude_over_output_channel_norm(shape) -> None:
    # peft 0.21.2 dora.py: magnitude / ‖W + s·m·BA‖ (per output channel) · (W + s·m·BA), s = lora_alpha / r.
    down, up = rand(2, *shape[1:], seed=1), rand(shape[0], 2, *[1] * (len(shape) - 2), seed=2)
    magnitude = 1.0 + rand(shape[0], seed=3).abs()
    update = peft_update("layer", {"lora_A.weight": down, "lora_B.weight": up, "lora_magnitude_vector": magnitude}, 1.5)
    weight = rand(*shape, seed=97)
    for multiplier in (1.0, 0.6):
        merged = weight.double() + multiplier * 1.5 * matmul_ref(up, down).reshape(shape)
        expected = merged * expand(magnitude.double() / row_norms(merged), 0, len(shape))
        torch.testing.assert_close(update.apply(weight, multiplier).double(), expected, rtol=1e-5, atol=1e-5)


BAD_LAYERS = [
    ({"hada_w1_a": torch.ones(2, 1), "hada_w1_b": torch.ones(1, 2), "hada_w2_a": torch.ones(2, 1)}, "lacks hada_w2_b"),
    ({"lokr_w1": torch.ones(1, 1), "lokr_w2_a": torch.ones(2, 1)}, "lacks lokr_w2_b"),
    ({"lokr_w1": torch.ones(1, 1), "lokr_w2": torch.ones(2, 2), "lora_up.weight": torch.ones(2, 1)}, "LoRA and LoKr"),
    ({"hada_w1_a": torch.ones(2, 1), "w_norm": torch.ones(2)}, r"no supported adapter type \(w_norm\)"),
    (
        {"lora_down.weight": torch.ones(1, 2), "lora_up.weight": torch.ones(2, 1), "dora_scale": torch.ones(2, 1)},
        "per output channel",
    ),
]


@pytest.mark.parametrize(("tensors", "message"), BAD_LAYERS, ids=[message for _, message in BAD_LAYERS])
def test_incomplete_mixed_or_unknown_layers_are_refused(tensors, message) -> None:
    with pytest.raises(UpdateError, match=message):
        kohya_update("lora_unet_x", tensors)


# -- merged into the dev model's layers, and restored ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(dev_model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(dev_model_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def all_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{name}": parameter.detach().clone()
        for component in ("unet", *TEXT_ENCODERS)
        for name, parameter in getattr(pipe, component).named_parameters()
    }


def assert_weights_equal(pipe, before: dict[str, torch.Tensor]) -> None:
    after = all_weights(pipe)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed[:5]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("tucker", [False, True], ids=["plain", "tucker"])
def test_a_lycoris_file_merges_each_layer_kind_exactly_and_restores_bit_for_bit(bare, tmp_path, kind, tucker) -> None:
    targets = (LINEAR, CONV_1X1, CONV_3X3)
    lycoris = random_lycoris(
        bare,
        kind,
        rank=2,
        alpha=1.0,
        seed=3,
        tucker=tucker,
        unet_targets=targets,
        text_targets=(TEXT_LINEAR,),
        decompose_both=tucker,
    )
    save_lycoris(lycoris, bare, tmp_path / "file.safetensors")
    stored = load_file(str(tmp_path / "file.safetensors"))
    manager = LoraManager(bare, settings=LoraSettings(roots=(tmp_path,)))
    before = all_weights(bare)
    try:
        (applied,) = manager.activate([SimpleNamespace(name="file", scale=0.8)])
        assert applied.adapter.kind == kind.replace("loha", "LoHa").replace("lokr", "LoKr")
        assert applied.adapter.layers == {"unet": 3, "text_encoder": 1, "text_encoder_2": 1}
        layers = [(component, path) for component, part in lycoris.layers.items() for path in part]
        assert len(layers) == 5
        for component, path in layers:
            name = kohya_name(bare, component, path)
            factors = {key.split(".", 1)[1]: value for key, value in stored.items() if key.startswith(name + ".")}
            original = before[f"{component}.{path}.weight"]
            reference = reference_update(factors, original.shape)
            merged = getattr(bare, component).get_submodule(path).weight
            torch.testing.assert_close(merged.double(), original.double() + 0.8 * 0.5 * reference, rtol=1e-5, atol=1e-6)
    finally:
        manager.activate([])
    assert_weights_equal(bare, before)


def reference_update(factors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW from a file's factors by the reference formulas above, reshaped to the layer's weight."""
    if "hada_w1_a" in factors:
        if "hada_t1" in factors:
            first = tucker_ref(factors["hada_t1"], factors["hada_w1_a"], factors["hada_w1_b"])
            return first * tucker_ref(factors["hada_t2"], factors["hada_w2_a"], factors["hada_w2_b"])
        first = matmul_ref(factors["hada_w1_a"], factors["hada_w1_b"])
        return (first * matmul_ref(factors["hada_w2_a"], factors["hada_w2_b"])).reshape(shape)
    w1 = factors.get("lokr_w1")
    w1 = matmul_ref(factors["lokr_w1_a"], factors["lokr_w1_b"]) if w1 is None else w1
    if "lokr_t2" in factors:
        return kron_ref(w1, tucker_ref(factors["lokr_t2"], factors["lokr_w2_a"], factors["lokr_w2_b"]))
    return kron_ref(w1, matmul_ref(factors["lokr_w2_a"], factors["lokr_w2_b"])).reshape(shape)


# -- through the worker -------------------------------------------------------------------------------------------


def save_kohya_dora(pipe, path: Path) -> Path:
    """A Kohya LoRA with ``dora_scale`` per input channel on every layer (as sd-scripts/LyCORIS save DoRA)."""
    lora = random_lora(pipe, rank=4, seed=21, strength=0.5)
    save_kohya_lora(lora, pipe, path)
    tensors = load_file(str(path))
    for key in [key for key in tensors if key.endswith(".lora_down.weight")]:
        fan_in = tensors[key].shape[1]
        tensors[key.replace("lora_down.weight", "dora_scale")] = 1.0 + 0.3 * rand(1, fan_in, seed=len(key)).abs()
    save_file(tensors, str(path))
    return path


def peft_dora_layers(pipe, component: str, targets: tuple[str, ...], alpha: float, rank: int = 4) -> dict:
    """diffusers/peft DoRA weights for ``component``: lora_A, lora_B, and magnitudes near the layers' row norms."""
    from model_build.dev_lora import adaptable_layers

    layers = {}
    for index, (path, module) in enumerate(adaptable_layers(getattr(pipe, component), targets)):
        out_features, in_features = module.weight.shape
        down, up = (
            rand(rank, in_features, seed=index) / in_features**0.5,
            0.3 * rand(out_features, rank, seed=index + 1),
        )
        merged = module.weight.detach() + alpha / rank * up @ down
        layers[f"{path}.lora_A.weight"] = down
        layers[f"{path}.lora_B.weight"] = up
        layers[f"{path}.lora_magnitude_vector"] = merged.norm(dim=1) * (
            1.0 + 0.3 * rand(out_features, seed=index).abs()
        )
    return layers


def save_peft_dora(pipe, path: Path, alpha: float = 8.0, rank: int = 4) -> Path:
    """Saved as diffusers' training scripts save a DoRA LoRA: save_lora_weights with a LoraConfig(use_dora=True)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    unet = peft_dora_layers(pipe, "unet", ("to_q", "to_v"), alpha, rank)
    text = peft_dora_layers(pipe, "text_encoder", ("q_proj", "fc1"), alpha, rank)

    def config(layers: dict) -> dict:
        modules = sorted({key.split(".lora_")[0] for key in layers})
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, use_dora=True).to_dict()

    StableDiffusionXLPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=unet,
        text_encoder_lora_layers=text,
        unet_lora_adapter_metadata=config(unet),
        text_encoder_lora_adapter_metadata=config(text),
        weight_name=path.name,
    )
    return path


@pytest.fixture(scope="module")
def lycoris_dir(dev_model_dir: Path, bare, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented dev LoHa and LoKr, a text-encoder-only LoKr, a plain LoRA, both DoRA forms, and broken files."""
    from model_build.__main__ import main

    root = tmp_path_factory.mktemp("lycoris-loras")
    # README: python -m model_build dev-lora loras/dev-lokr.safetensors --model models/sdxl-dev --kind lokr
    assert main(["dev-lora", str(root / "dev-lokr.safetensors"), "--model", str(dev_model_dir), "--kind", "lokr"]) == 0
    save_lycoris(random_lycoris(bare, "loha"), bare, root / "dev-loha.safetensors")  # what --kind loha writes
    te_only = random_lycoris(bare, "lokr", seed=5, strength=0.5, components=TEXT_ENCODERS)
    save_lycoris(te_only, bare, root / "words-lokr.safetensors")
    save_kohya_lora(random_lora(bare, seed=6, strength=0.5), bare, root / "plain.safetensors")
    save_kohya_dora(bare, root / "kohya-dora.safetensors")
    save_peft_dora(bare, root / "peft-dora.safetensors")

    loha = random_lycoris(bare, "loha", rank=2, seed=7, unet_targets=(LINEAR, CONV_3X3), components=("unet",))
    linear = kohya_name(bare, "unet", LINEAR)
    save_lycoris(loha, bare, root / "unknown-keys.safetensors", extra={f"{linear}.w_norm": torch.ones(64)})
    state = load_file(str(save_lycoris(loha, bare, root / "incomplete.safetensors")))
    del state[f"{linear}.hada_w2_b"]
    save_file(state, str(root / "incomplete.safetensors"))
    # A LoKr made for a 64-wide projection, stored under the name of one with 96 inputs (cross-attention's to_k).
    lokr = random_lycoris(bare, "lokr", rank=2, seed=8, unet_targets=(LINEAR,), components=("unet",))
    state = {
        key.replace("attn1_to_q", "attn2_to_k"): value
        for key, value in load_file(str(save_lycoris(lokr, bare, root / "tmp.safetensors"))).items()
    }
    save_file(state, str(root / "wrong-shape.safetensors"))
    (root / "tmp.safetensors").unlink()
    # An SD 1.5 LoKr: Kohya names of SD 1.5's diffusers-style UNet, 768-wide cross-attention.
    sd15 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{sd15}.lokr_w1": rand(16, 16, seed=1),
            f"{sd15}.lokr_w2_a": rand(20, 4, seed=2),
            f"{sd15}.lokr_w2_b": rand(4, 48, seed=3),
            f"{sd15}.alpha": torch.tensor(4.0),
        },
        root / "sd15-lokr.safetensors",
    )
    state = load_file(str(save_lycoris(lokr, bare, root / "rank-mismatch.safetensors")))
    state[f"{linear}.lokr_w2_b"] = rand(3, state[f"{linear}.lokr_w2_b"].shape[1], seed=4)
    save_file(state, str(root / "rank-mismatch.safetensors"))
    dora_out = load_file(str(root / "plain.safetensors"))
    dora_out[f"{linear}.dora_scale"] = torch.ones(64, 1)  # LyCORIS wd_on_out: per output channel
    save_file(dora_out, str(root / "dora-per-output.safetensors"))
    save_file({f"unet.{LINEAR}.hada_w1_a": torch.ones(64, 2)}, root / "diffusers-loha.safetensors")
    ia3 = {f"{linear}.weight": torch.ones(64), f"{linear}.on_input": torch.tensor(False)}  # LyCORIS IA3
    save_file(ia3, root / "ia3.safetensors")
    return root


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path, lycoris_dir: Path) -> SimpleNamespace:
    handler_worker = Worker(load_settings({"LORA_DIR": str(lycoris_dir)}))
    handler_worker.start(dev_model_dir)
    state = SimpleNamespace(worker=handler_worker, engine=handler_worker.engine)
    state.fresh = run(state)
    return state


def run(worker: SimpleNamespace, *loras: tuple[str, float]) -> dict:
    out = worker.worker.handle({"id": "job", "input": {**JOB, "loras": [{"name": n, "scale": s} for n, s in loras]}})
    assert "error" not in out, out
    out["pixels"] = Image.open(io.BytesIO(base64.b64decode(out["images"][0].split(",", 1)[1]))).tobytes()
    return out


def test_dev_loha_and_lokr_run_through_the_worker_and_the_next_job_is_a_fresh_workers(worker) -> None:
    seen = {worker.fresh["pixels"]}
    for name, kind in (("dev-loha", "LoHa"), ("dev-lokr", "LoKr")):
        out = run(worker, (name, 0.8))
        (entry,) = out["metadata"]["loras"]
        assert entry["type"] == kind and entry["format"] == "kohya"
        assert entry["components"] == ["unet", *TEXT_ENCODERS]
        assert out["pixels"] not in seen
        seen.add(out["pixels"])
    assert run(worker, ("dev-loha", 0.8))["pixels"] in seen  # merged again after a switch: the same image
    words = run(worker, ("words-lokr", 1.0))  # text encoders only: acts through the prompt
    assert words["metadata"]["loras"][0]["components"] == list(TEXT_ENCODERS) and words["pixels"] not in seen
    mixed = run(worker, ("plain", 0.7), ("dev-loha", 0.5), ("words-lokr", -0.5))  # peft layers and merges together
    assert mixed["pixels"] not in seen
    # The same prompt as the text-encoder LoRA jobs: the prompt cache must not hand back their embeddings.
    assert run(worker)["pixels"] == worker.fresh["pixels"]


def test_both_dora_forms_run_through_the_worker(worker) -> None:
    for name in ("kohya-dora", "peft-dora"):
        out = run(worker, (name, 1.0))
        assert out["metadata"]["loras"][0]["type"] == "LoRA+DoRA"
        assert out["pixels"] != worker.fresh["pixels"]
    assert run(worker)["pixels"] == worker.fresh["pixels"]


def test_peft_dora_merges_as_peft_merges_it(dev_model_dir: Path, bare, lycoris_dir: Path) -> None:
    # The reference for the UNet is peft's own merge (stock diffusers: load_lora_weights, then fuse_lora); for the
    # text encoder the formula, since diffusers 0.42.1 with transformers 5.24 does not load its magnitudes.
    from diffusers import StableDiffusionXLPipeline

    stock = StableDiffusionXLPipeline.from_pretrained(dev_model_dir, dtype=torch.float32, local_files_only=True)
    stock.load_lora_weights(str(lycoris_dir / "peft-dora.safetensors"), adapter_name="dora")
    stock.fuse_lora(components=["unet"], lora_scale=0.6)
    stock.unload_lora_weights()
    manager = LoraManager(bare, settings=LoraSettings(roots=(lycoris_dir,)))
    before = all_weights(bare)
    try:
        manager.activate([SimpleNamespace(name="peft-dora", scale=0.6)])
        changed = 0
        for name, parameter in bare.unet.named_parameters():
            expected = stock.unet.get_parameter(name)
            torch.testing.assert_close(parameter, expected, rtol=1e-5, atol=1e-6)
            changed += not torch.equal(before[f"unet.{name}"], expected)
        assert changed == len([name for name, _ in bare.unet.named_modules() if name.endswith(("to_q", "to_v"))])
        tensors = load_file(str(lycoris_dir / "peft-dora.safetensors"))
        path = "encoder.layers.1.mlp.fc1"
        down, up = tensors[f"text_encoder.{path}.lora_A.weight"], tensors[f"text_encoder.{path}.lora_B.weight"]
        magnitude = tensors[f"text_encoder.{path}.lora_magnitude_vector"]
        merged = before[f"text_encoder.{path}.weight"].double() + 0.6 * 8.0 / 4 * matmul_ref(up, down)
        expected = merged * (magnitude.double() / row_norms(merged))[:, None]
        torch.testing.assert_close(
            bare.text_encoder.get_submodule(path).weight.double(), expected, rtol=1e-5, atol=1e-6
        )
    finally:
        manager.activate([])
    assert_weights_equal(bare, before)


REFUSALS = [
    (
        "unknown-keys",
        r"cannot be merged: lora_unet_\w+ has keys of no supported adapter type \(w_norm\).*Use a complete",
    ),
    ("incomplete", r"cannot be merged: lora_unet_\w+attn1_to_q lacks hada_w2_b"),
    (
        "wrong-shape",
        r"does not fit this model: 1 unet layers have the wrong shape \(e\.g\. unet\.\S+attn2\.to_k is 64x96 but "
        r"the LoKr update is 64x64\).*Use a LoRA trained",
    ),
    (
        "sd15-lokr",
        r"does not fit this model: 1 of its 1 unet layers do not exist in this model .*made for SD 1\.x "
        r"\(cross-attention width 768",
    ),
    ("rank-mismatch", r"wrong shape .*its LoKr factors do not fit together \(.*lokr_w2_a 8x2, lokr_w2_b 3x8"),
    (
        "dora-per-output",
        r"cannot be merged: \S+ has DoRA magnitudes per output channel \(dora_scale \(64, 1\), LyCORIS wd_on_out\)",
    ),
    ("diffusers-loha", r"LyCORIS weights are in diffusers' key layout .*Kohya/LyCORIS layout"),
    ("ia3", r"has keys of no supported adapter type \(on_input, weight; e\.g\. LyCORIS IA3"),
]


@pytest.mark.parametrize(("name", "message"), REFUSALS, ids=[name for name, _ in REFUSALS])
def test_bad_lycoris_files_are_clear_errors_and_nothing_is_half_applied(worker, name: str, message: str) -> None:
    engine = worker.engine
    run(worker, ("dev-lokr", 0.8), ("dev-loha", 0.3))  # merged LoRAs are in the weights when the bad one arrives
    loaded = sorted(entry["adapter"] for entry in engine.loras.loaded())
    job = {**JOB, "loras": [{"name": "dev-loha", "scale": 0.5}, {"name": name, "scale": 1.0}]}
    out = worker.worker.handle({"id": "bad", "input": job})
    assert out["error"].startswith(f"lora: LoRA {name!r}"), out
    assert re.search(message, out["error"]), out["error"]
    assert sorted(entry["adapter"] for entry in engine.loras.loaded()) == loaded  # nothing half-loaded
    assert run(worker)["pixels"] == worker.fresh["pixels"]
