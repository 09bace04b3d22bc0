"""ControlNets through the handler on the dev model and the dev ControlNet (SDXL's ControlNet scaled to the dev UNet).

What must hold: a unit at conditioning_scale 0 leaves the image exactly as without it (the residual plumbing changes
nothing else), a unit at 1 changes it; several units, img2img, long prompts and LoRAs combine; the metadata says
what ran; every bad input is an error naming its field, and after each the next plain job is byte for byte the
fresh worker's.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from core.settings import load_settings
from model_build.dev_lora import write_dev_lora
from model_build.manifest import describe_files, read_manifest, write_manifest
from tests.support.dev_pipes import one_torch_thread
from worker.handler import Worker

JOB = {"prompt": "a lighthouse at dawn", "height": 128, "width": 128, "num_inference_steps": 2, "seed": 11}


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def shapes_image(width: int = 128, height: int = 128) -> Image.Image:
    """A picture with edges for canny to find: a rectangle and a circle on a gradient."""
    gradient = np.tile(np.linspace(40, 200, width, dtype=np.uint8), (height, 1))
    image = Image.fromarray(np.stack([gradient, gradient[:, ::-1], gradient], axis=-1))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 6, width // 2, height // 2), fill=(250, 20, 20))
    draw.ellipse((width // 2, height // 2, width - 8, height - 8), fill=(10, 10, 240))
    return image


def unit(**fields) -> dict:
    return {"name": "dev-controlnet", "image": png(shapes_image()), **fields}


@pytest.fixture(scope="module")
def roots(dev_controlnet_root: Path, dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """CONTROLNET_DIR with the dev ControlNet, a base model put there by mistake, and a ControlNet for another UNet
    (the dev one with its config's cross-attention width changed and its manifest rewritten to match)."""
    root = tmp_path_factory.mktemp("controlnet-root")
    shutil.copytree(dev_controlnet_root / "dev-controlnet", root / "dev-controlnet")
    shutil.copytree(dev_model_dir, root / "a-base-model")
    other = root / "other-architecture"
    shutil.copytree(dev_controlnet_root / "dev-controlnet", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 768}))
    manifest = read_manifest(other)
    files = describe_files(other)
    if isinstance(manifest, dict):
        manifest["files"] = files
    else:
        manifest = manifest.model_copy(update={"files": files})
    write_manifest(other, manifest)
    loras = tmp_path_factory.mktemp("controlnet-loras")
    write_dev_lora(dev_model_dir, loras / "style.safetensors")
    return {"controlnets": root, "loras": loras}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path, roots: dict) -> Worker:
    """A worker with CONTROLNET_DIR set, and its plain job's bytes from before any ControlNet job (a fresh worker)."""
    settings = load_settings({"CONTROLNET_DIR": str(roots["controlnets"]), "LORA_DIR": str(roots["loras"])})
    made = Worker(settings)
    made.start(dev_model_dir)
    assert made.startup_error is None, made.startup_error
    made.fresh_plain = run(made, JOB)["images"][0]
    return made


def run(worker: Worker, payload: dict) -> dict:
    return worker.handle({"id": "controlnet-test", "input": payload})


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_scale_zero_is_the_plain_job_exactly_and_scale_one_steers(worker) -> None:
    silent = run(worker, {**JOB, "controlnets": [unit(preprocessor="canny", conditioning_scale=0)]})
    steered = run(worker, {**JOB, "controlnets": [unit(preprocessor="canny")]})
    assert "error" not in silent and "error" not in steered, (silent, steered)
    assert silent["images"][0] == worker.fresh_plain
    assert not np.array_equal(pixels(steered["images"][0]), pixels(worker.fresh_plain))


def test_metadata_lists_each_controlnet_with_what_applied(worker) -> None:
    window = {"control_guidance_start": 0.2, "control_guidance_end": 0.9, "conditioning_scale": 0.7}
    out = run(worker, {**JOB, "controlnets": [unit(preprocessor="canny", low_threshold=50, **window), unit()]})
    assert "error" not in out, out
    first, second = out["metadata"]["controlnets"]
    assert first["name"] == "dev-controlnet" and first["config"] == "dev_controlnet" and first["manifest_hash"]
    assert {key: first[key] for key in window} == window
    assert (first["preprocessor"], first["low_threshold"], first["high_threshold"]) == ("canny", 50, 200)
    assert second["preprocessor"] == "none" and "low_threshold" not in second
    assert first["control_size"] == [128, 128] and "note" not in first
    assert out["metadata"]["cache"]["controlnets"][0]["name"] == "dev-controlnet"
    assert out["metadata"]["timings"]["controlnet_s"] >= 0


def test_another_size_is_cropped_and_resized_with_a_note(worker) -> None:
    wide = unit(image=png(shapes_image(200, 100)))
    out = run(worker, {**JOB, "controlnets": [wide]})
    entry = out["metadata"]["controlnets"][0]
    assert entry["input_size"] == [200, 100] and entry["control_size"] == [128, 128]
    assert "centre-cropped" in entry["note"]


def test_img2img_with_two_controlnets_a_long_prompt_and_a_lora(worker) -> None:
    long_prompt = ", ".join(["a lighthouse on a cliff above a stormy sea at dawn"] * 10)  # > 75 tokens
    payload = {
        **JOB,
        "prompt": long_prompt,
        "image_url": png(shapes_image()),
        "strength": 0.7,
        "loras": [{"name": "style", "scale": 0.8}],
        "controlnets": [unit(preprocessor="canny"), unit(conditioning_scale=0.5, control_guidance_end=0.5)],
    }
    out = run(worker, payload)
    assert "error" not in out, out
    metadata = out["metadata"]
    assert metadata["mode"] == "img2img" and len(metadata["controlnets"]) == 2
    assert metadata["prompt"]["num_chunks"] >= 2
    assert metadata["loras"][0]["name"] == "style"
    plain = run(worker, {**payload, "controlnets": []})["images"][0]
    assert not np.array_equal(pixels(out["images"][0]), pixels(plain))
    # diffusers' ControlNet img2img pipeline is the img2img pipeline but for the residuals: at scale 0, the same bytes
    silent = run(worker, {**payload, "controlnets": [unit(conditioning_scale=0)]})
    assert silent["images"][0] == plain


BAD = [
    ({"controlnets": [unit(name="missing")]}, r"controlnets\[0\]\.name: no ControlNet named 'missing'.*dev-controlnet"),
    ({"controlnets": [unit(name="a-base-model")]}, r"controlnets\[0\]\.name: .*converted sdxl-base model"),
    (
        {"controlnets": [unit(), unit(name="other-architecture")]},
        r"controlnets\[1\]\.name: ControlNet 'other-architecture'.*cross_attention_dim 768 \(the model's 96\)",
    ),
    ({"controlnets": [unit(), unit(image=base64.b64encode(b"GIF89a....").decode())]}, r"controlnets\[1\]\.image: "),
    ({"controlnets": [unit(preprocessor="depth_midas")]}, r"controlnets\.0\.preprocessor: 'depth_midas' needs an"),
    ({"controlnets": [unit(preprocessor="sobel")]}, r"controlnets\.0\.preprocessor: unknown preprocessor.*canny"),
    (
        {"controlnets": [unit()], "image_url": png(shapes_image()), "refiner": True},
        r"controlnets: img2img through the refiner",
    ),
    (
        {"controlnets": [unit()], "guidance_rescale": 0.7},
        r"controlnets: diffusers' StableDiffusionXLControlNetPipeline has no guidance_rescale argument",
    ),
    (
        {
            "controlnets": [unit()],
            "image_url": png(shapes_image()),
            "strength": 1,
            "scheduler": "Euler",
            "timesteps": [999, 499],
        },
        r"controlnets: diffusers' StableDiffusionXLControlNetImg2ImgPipeline has no timesteps argument",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_input_is_an_error_naming_the_field_and_the_next_job_is_a_fresh_workers(worker, fields, message) -> None:
    out = run(worker, {**JOB, **fields})
    assert "error" in out, out
    assert re.search(message, out["error"]), out["error"]
    assert run(worker, JOB)["images"][0] == worker.fresh_plain


def test_a_job_after_controlnet_jobs_is_a_fresh_workers(worker) -> None:
    run(worker, {**JOB, "controlnets": [unit(preprocessor="canny"), unit()], "loras": [{"name": "style"}]})
    assert run(worker, JOB)["images"][0] == worker.fresh_plain


def test_memory_planning_counts_the_largest_controlnets(worker, roots: dict) -> None:
    from worker.adapters.controlnet.manager import controlnet_reserve
    from worker.model.placement import GIB, plan_device

    settings = load_settings({"CONTROLNET_DIR": str(roots["controlnets"]), "CONTROLNET_CACHE_SIZE": "1"})
    reserved = controlnet_reserve(settings, torch.float16)
    weights = (roots["controlnets"] / "dev-controlnet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert reserved == {"controlnet.0": weights}  # the base model's folder there is no ControlNet
    assert controlnet_reserve(settings, torch.float32) == {"controlnet.0": 2 * weights}
    pipeline = {"unet": 5 * GIB, "vae": GIB}
    fits = 5 * GIB + GIB + 6 * GIB  # the pipeline and the headroom, without room for a ControlNet
    assert plan_device("auto", True, fits, pipeline).offload == "none"
    assert plan_device("auto", True, fits, {**pipeline, "controlnet.0": 2 * GIB}).offload == "model"


def test_compile_unet_runs_controlnet_calls_eagerly(worker, roots: dict) -> None:
    """With COMPILE=unet the ControlNet jobs' calls run under torch's force_eager stance: a compiled function
    compiles nothing there (the whole-UNet graph would need a second compile for the residual inputs)."""
    from torch._dynamo.utils import counters

    from worker.adapters.controlnet.manager import ControlInputs, ControlNetManager

    engine = worker.engine
    settings = load_settings({"CONTROLNET_DIR": str(roots["controlnets"]), "COMPILE": "unet"})
    manager = ControlNetManager(engine.pipe.unet.config, engine.dtype, settings, engine.placement.adopt)
    assert manager.eager_unet and not engine.controlnets.eager_unet  # this worker does not compile
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", fullgraph=True)
    before = counters["stats"]["unique_graphs"]
    with ControlInputs([], eager_unet=True).unet_context():
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert counters["stats"]["unique_graphs"] == before


UNIT_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-300, 300),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "name",
                "image",
                "conditioning_scale",
                "control_guidance_start",
                "control_guidance_end",
                "preprocessor",
                "low_threshold",
                "high_threshold",
                "weight",
                "module",
            ]
        ),
        UNIT_VALUES,
        max_size=6,
    ),
    st.integers(0, 5),
)
def test_any_controlnet_entry_parses_or_is_an_error_naming_controlnets(entry: dict, count: int) -> None:
    """Whatever a client sends as units, the schema answers with a request or an InvalidRequest that names the
    controlnets field: never another exception."""
    from core.errors import InvalidRequest
    from worker.request.schema import parse_request

    try:
        request = parse_request({"prompt": "x", "controlnets": [entry] * count})
    except InvalidRequest as error:
        assert "controlnets" in str(error)
        return
    assert len(request.controlnets) == count
    for item in request.controlnets:
        assert 0 <= item.conditioning_scale <= 2 and item.control_guidance_start < item.control_guidance_end
        assert item.preprocessor in ("none", "canny") and item.low_threshold <= item.high_threshold


def test_with_a_refiner_the_controlnets_steer_the_base_stage(dev_model_dir, dev_refiner_dir, roots: dict) -> None:
    """The ensemble of experts with a ControlNet: the base runs diffusers' ControlNet pipeline up to high_noise_frac
    (its denoising_end), the refiner the rest without it; the metadata says both."""
    settings = load_settings({"CONTROLNET_DIR": str(roots["controlnets"])})
    with_refiner = Worker(settings)
    with_refiner.start(dev_model_dir, dev_refiner_dir)
    payload = {**JOB, "num_inference_steps": 4, "refiner_inference_steps": 4, "high_noise_frac": 0.5}
    out = run(with_refiner, {**payload, "controlnets": [unit(preprocessor="canny")]})
    assert "error" not in out, out
    metadata = out["metadata"]
    assert metadata["refiner"]["used"] and metadata["refiner"]["mode"] == "ensemble"
    assert [stage["model"] for stage in metadata["stages"]] == ["base", "refiner"]
    assert metadata["stages"][0]["model_calls"] == 2 and metadata["controlnets"][0]["applied_to"] == "base"
    assert out["images"][0] != run(with_refiner, payload)["images"][0]
