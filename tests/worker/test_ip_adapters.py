"""IP-Adapters through the handler on the dev model and the dev IP-Adapters (SDXL's plain and plus kinds scaled to
the dev UNet, with their two dev image encoders, in h94/IP-Adapter's layout).

What must hold: a job with an adapter gives stock diffusers' image bit for bit (``load_ip_adapter`` from the same
folder, ``set_ip_adapter_scale``, ``ip_adapter_image``: the reference the worker's own loading, encoding and
install are measured against); scale 0 is the plain job exactly; several adapters, img2img, inpainting, the hires
pass, ControlNets and fused LoRAs combine; after any of it the UNet is the one the worker started with, object for
object, and the next plain job is the fresh worker's bytes; every bad input is an error naming its field.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from core.settings import load_settings
from model_build.dev_lora import write_dev_lora
from tests.support.dev_pipes import one_torch_thread
from worker.handler import Worker

JOB = {"prompt": "a lighthouse at dawn", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 11}
REFERENCE_JOB = {**JOB, "num_inference_steps": 3, "scheduler": "K_EULER", "guidance_scale": 5.0}
PLAIN, PLUS = "ip-adapter_dev", "ip-adapter-plus_dev_vit-h"
ENCODERS = {PLAIN: "image_encoder", PLUS: "models/image_encoder"}  # as diffusers' image_encoder_folder takes them


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def reference_image(seed: int = 0, size: tuple[int, int] = (100, 80)) -> Image.Image:
    """A picture of another size and aspect than the encoders' square input (the processor resizes and crops it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def unit(name: str = PLAIN, **fields) -> dict:
    return {"name": name, "image": png(reference_image()), **fields}


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def _edited(source: Path, target: Path, drop: tuple[str, ...] = (), **replace: torch.Tensor) -> None:
    tensors = {key: value for key, value in load_file(str(source)).items() if not key.startswith(drop)}
    save_file({**tensors, **replace}, str(target))


@pytest.fixture(scope="module")
def roots(dev_ip_adapter_root: Path, dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """IP_ADAPTER_DIR with the dev adapters and files that must be refused, each for its own reason."""
    root = tmp_path_factory.mktemp("ip-adapter-root")
    shutil.copytree(dev_ip_adapter_root, root, dirs_exist_ok=True)
    adapters = root / "sdxl_models"
    plain, plus = adapters / f"{PLAIN}.safetensors", adapters / f"{PLUS}.safetensors"
    _edited(plain, adapters / "fewer-layers.safetensors", drop=("ip_adapter.33.",))
    sd15 = {f"ip_adapter.{2 * i + 1}.{part}.weight": torch.zeros(8, 768) for i in range(16) for part in ("to_k_ip",
            "to_v_ip")}  # fmt: skip
    save_file({**sd15, "image_proj.proj.weight": torch.zeros(4 * 768, 40)}, str(adapters / "sd15.safetensors"))
    face_id = {
        "image_proj.proj.0.weight": torch.zeros(8, 4),
        "image_proj.proj.2.weight": torch.zeros(16, 8),
        "image_proj.norm.weight": torch.ones(4),
        "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 96),
        "ip_adapter.1.to_k_lora.down.weight": torch.zeros(4, 64),
    }
    save_file(face_id, str(adapters / "faceid.safetensors"))
    (adapters / "legacy.bin").write_bytes(b"\x80\x02}q\x00.")  # h94's pickles: never opened
    write_dev_lora(dev_model_dir, adapters / "a-lora.safetensors")
    _edited(plain, adapters / "no-encoder.safetensors", **{"image_proj.proj.weight": torch.zeros(384, 77)})
    _edited(plus, adapters / "incomplete.safetensors", drop=("image_proj.layers.3.1.3",))
    data = plain.read_bytes()
    (adapters / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    loras = tmp_path_factory.mktemp("ip-adapter-loras")
    write_dev_lora(dev_model_dir, loras / "style.safetensors")
    return {"ip_adapters": root, "loras": loras}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path, roots: dict) -> Worker:
    """A worker with IP_ADAPTER_DIR set, its plain and LoRA jobs' bytes from before any IP-Adapter job, and its UNet's
    attention processors and attributes as it started."""
    settings = load_settings({"IP_ADAPTER_DIR": str(roots["ip_adapters"]), "LORA_DIR": str(roots["loras"])})
    made = Worker(settings)
    made.start(dev_model_dir)
    assert made.startup_error is None, made.startup_error
    made.fresh_plain = run(made, JOB)["images"][0]
    made.fresh_lora = run(made, {**JOB, "loras": [{"name": "style", "scale": 0.8}]})["images"][0]
    unet = made.engine.pipe.unet
    made.fresh_unet = (dict(unet.attn_processors), set(unet._modules), dict(unet.__dict__))
    return made


def run(worker: Worker, payload: dict) -> dict:
    return worker.handle({"id": "ip-adapter-test", "input": payload})


def stock_pipeline(dev_model_dir: Path, root: Path, names: list[str], scales: list[float]):
    """Stock diffusers: the dev model's StableDiffusionXLPipeline (fp32, CPU) with load_ip_adapter of ``names`` from
    the IP-Adapter folder (one image encoder for all, as diffusers allows), at ``scales``."""
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(dev_model_dir, dtype=torch.float32, local_files_only=True)
        pipe.load_ip_adapter(
            str(root),
            subfolder="sdxl_models",
            weight_name=[f"{name}.safetensors" for name in names],
            image_encoder_folder=ENCODERS[names[0]],
            local_files_only=True,
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(scales)
    return pipe


def stock_image(pipe, images: list[Image.Image], job: dict = REFERENCE_JOB) -> np.ndarray:
    generator = [torch.Generator("cpu").manual_seed(job["seed"])]
    out = pipe(
        prompt=job["prompt"],
        height=job["height"],
        width=job["width"],
        num_inference_steps=job["num_inference_steps"],
        guidance_scale=job["guidance_scale"],
        generator=generator,
        ip_adapter_image=images,
    )
    return np.asarray(out.images[0])


@pytest.mark.parametrize("name", [PLAIN, PLUS])
def test_a_job_gives_stock_diffusers_load_ip_adapter_image_bit_for_bit(worker, roots, dev_model_dir, name) -> None:
    """The independent reference: stock diffusers loads the file itself, encodes the image itself (its image
    encoder and feature extractor) and runs its own processors; the worker's PNG has exactly its pixels."""
    out = run(worker, {**REFERENCE_JOB, "ip_adapters": [unit(name, scale=0.7)]})
    assert "error" not in out, out
    expected = stock_image(stock_pipeline(dev_model_dir, roots["ip_adapters"], [name], [0.7]), [reference_image()])
    assert np.array_equal(pixels(out["images"][0]), expected)
    plain = run(worker, REFERENCE_JOB)["images"][0]
    assert np.abs(pixels(plain).astype(int) - expected).max() > 32  # it steers: the reference is not the plain job


def test_two_adapters_give_stock_diffusers_list_of_adapters_image(worker, roots, dev_model_dir) -> None:
    """Two units (here one file with two images, as diffusers takes a list) each read their own image at their own
    scale, their attention added up as diffusers' processor for a list of adapters adds it."""
    images = [reference_image(0), reference_image(1, (64, 96))]
    units = [unit(scale=0.6), {**unit(scale=0.3), "image": png(images[1])}]
    out = run(worker, {**REFERENCE_JOB, "ip_adapters": units})
    assert "error" not in out, out
    pipe = stock_pipeline(dev_model_dir, roots["ip_adapters"], [PLAIN, PLAIN], [0.6, 0.3])
    assert np.array_equal(pixels(out["images"][0]), stock_image(pipe, images))


def test_scale_zero_is_the_plain_job_exactly(worker) -> None:
    for name in (PLAIN, PLUS):
        silent = run(worker, {**JOB, "ip_adapters": [unit(name, scale=0)]})
        assert "error" not in silent, silent
        assert silent["images"][0] == worker.fresh_plain


def test_metadata_says_what_ran(worker) -> None:
    out = run(worker, {**JOB, "ip_adapters": [unit(PLUS, scale=0.5), unit(PLAIN)]})
    assert "error" not in out, out
    first, second = out["metadata"]["ip_adapters"]
    assert first == {
        "name": PLUS,
        "file": f"sdxl_models/{PLUS}.safetensors",
        "kind": "plus",
        "tokens": 4,
        "image_encoder": "models/image_encoder",  # its sibling sdxl_models/image_encoder is another width
        "scale": 0.5,
        "input_size": [100, 80],
        "applied_to": "base",
        "unet": "eager",  # this worker does not compile; with COMPILE set it says the compiled code was set aside
    }
    assert (second["kind"], second["image_encoder"], second["scale"]) == ("ip-adapter", "sdxl_models/image_encoder", 1)
    cache = out["metadata"]["cache"]["ip_adapters"]
    assert [entry["name"] for entry in cache] == [PLUS, PLAIN] and all(entry["cache_hit"] for entry in cache)
    assert out["metadata"]["timings"]["ip_adapter_s"] >= 0
    assert run(worker, JOB)["metadata"]["ip_adapters"] == []


def test_modes_take_the_image_prompt_and_scale_zero_leaves_each_as_it_was(worker) -> None:
    """img2img, inpainting and the hires fix (both of its passes) run with IP-Adapters; at scale 0 each gives its
    plain bytes, so the adapters reached those calls and nothing else changed."""
    picture = png(reference_image(2, (64, 64)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    modes = {
        "img2img": {"image_url": picture, "strength": 0.8},
        "inpaint": {"image_url": picture, "mask": png(mask)},
        "hires": {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.6},
    }
    for mode, fields in modes.items():
        plain = run(worker, {**JOB, **fields})
        steered = run(worker, {**JOB, **fields, "ip_adapters": [unit(PLUS)]})
        silent = run(worker, {**JOB, **fields, "ip_adapters": [unit(PLUS, scale=0)]})
        assert "error" not in steered and "error" not in silent, (mode, steered, silent)
        assert steered["images"][0] != plain["images"][0], mode
        assert silent["images"][0] == plain["images"][0], mode


def test_the_hires_pass_takes_the_image_prompt_too(worker, monkeypatch) -> None:
    """A1111 applies an IP-Adapter unit to both passes of a hires job: both pipeline calls take the embeddings."""
    manager = worker.engine.ip_adapters
    prepared, prepare = [], manager.prepare
    monkeypatch.setattr(manager, "prepare", lambda units: prepared.append(prepare(units)) or prepared[-1])
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    out = run(worker, {**JOB, **hires, "ip_adapters": [unit()]})
    assert "error" not in out, out
    assert prepared[0].calls == 2  # the first pass's call and the hires pass's


def test_with_a_fused_lora_and_afterwards_the_unet_is_as_built(worker) -> None:
    """A LoRA merged into the UNet's weights and IP-Adapter processors in the same job; afterwards the LoRA job, the
    plain job and the UNet (its processors, the very objects, and its attributes) are as before any IP-Adapter."""
    engine = worker.engine
    unet = engine.pipe.unet
    weights = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    lora = {"loras": [{"name": "style", "scale": 0.8}]}
    both = run(worker, {**JOB, **lora, "ip_adapters": [unit(PLUS), unit()]})
    assert "error" not in both, both
    assert both["metadata"]["loras"][0]["name"] == "style" and both["images"][0] != worker.fresh_lora
    assert run(worker, {**JOB, **lora})["images"][0] == worker.fresh_lora
    assert run(worker, JOB)["images"][0] == worker.fresh_plain
    processors, modules, attributes = worker.fresh_unet
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
    assert set(unet._modules) == modules and set(unet.__dict__) == set(attributes)
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    after = unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[name], weights[name]) for name in weights)


def test_with_controlnets(dev_model_dir, dev_controlnet_root, roots) -> None:
    """diffusers' ControlNet pipeline over the base's modules takes the image prompt as the plain one does."""
    settings = load_settings({"IP_ADAPTER_DIR": str(roots["ip_adapters"]), "CONTROLNET_DIR": str(dev_controlnet_root)})
    made = Worker(settings)
    made.start(dev_model_dir)
    control = {"controlnets": [{"name": "dev-controlnet", "image": png(reference_image(3, (64, 64)))}]}
    plain = run(made, {**JOB, **control})
    steered = run(made, {**JOB, **control, "ip_adapters": [unit()]})
    silent = run(made, {**JOB, **control, "ip_adapters": [unit(scale=0)]})
    assert "error" not in steered, steered
    assert steered["images"][0] != plain["images"][0] and silent["images"][0] == plain["images"][0]
    assert steered["metadata"]["controlnets"][0]["name"] == "dev-controlnet"


BAD = [
    ({"ip_adapters": [unit("missing")]}, r"ip_adapters\[0\]\.name: no IP-Adapter named 'missing'.*ip-adapter_dev"),
    (
        {"ip_adapters": [unit(), unit("fewer-layers")]},
        r"ip_adapters\[1\]\.name: IP-Adapter 'fewer-layers' does not fit this worker's model: it has 16 "
        r"cross-attention layers reading width 96; this model has 17",
    ),
    ({"ip_adapters": [unit("sd15")]}, r"ip_adapters\[0\]\.name: .*\(an SD 1\.5 IP-Adapter: 16 layers, width 768\)"),
    ({"ip_adapters": [unit("faceid")]}, r"ip_adapters\[0\]\.name: 'faceid' .* is an IP-Adapter FaceID: .*InsightFace"),
    ({"ip_adapters": [unit("legacy")]}, r"ip_adapters\[0\]\.name: \S+legacy\.bin is a pickle, which this worker never"),
    ({"ip_adapters": [unit("a-lora")]}, r"ip_adapters\[0\]\.name: 'a-lora' .* is not an IP-Adapter file"),
    (
        {"ip_adapters": [unit("no-encoder")]},
        r"ip_adapters\[0\]\.name: IP-Adapter 'no-encoder' \(ip-adapter\) reads an image encoder with projection_dim "
        r"77, and no encoder folder fits \(\S+sdxl_models/image_encoder has projection_dim 40; \S+models/image_encoder "
        r"has projection_dim 32\)",
    ),
    ({"ip_adapters": [unit("truncated")]}, r"ip_adapters\[0\]\.name: 'truncated' .* truncated"),
    (
        {"ip_adapters": [unit("incomplete")]},
        r"^ip-adapter: ip_adapters\[0\]\.name: IP-Adapter 'incomplete' \(\S+\) could not be loaded .*replace the file",
    ),
    (
        {"ip_adapters": [unit(image=base64.b64encode(b"GIF89a....").decode())]},
        r"ip_adapters\[0\]\.image: this is a GIF",
    ),
    ({"ip_adapters": [unit(scale=3)]}, r"ip_adapters\.0\.scale: .*allowed 0\.\.2"),
    (
        {"ip_adapters": [unit(image="http://127.0.0.1:9/face.png")]},  # image_url's address rules
        r"ip_adapters\[0\]\.image: .*ALLOW_PRIVATE_URLS",
    ),
    ({"ip_adapters": [unit("../x")]}, r"ip_adapters\.0\.name: .*no path separators"),
    ({"ip_adapters": [unit()] * 5}, r"ip_adapters: .*at most 4"),
    (
        {"ip_adapters": [unit()], "image_url": png(reference_image()), "refiner": True},
        r"ip_adapters: img2img through the refiner \(refiner: true\) cannot use IP-Adapters",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_input_is_an_error_naming_the_field_and_the_next_job_is_a_fresh_workers(worker, fields, message) -> None:
    out = run(worker, {**JOB, **fields})
    assert "error" in out, out
    assert re.search(message, out["error"]), out["error"]
    assert run(worker, JOB)["images"][0] == worker.fresh_plain


def test_sequential_offload_is_refused_by_name(worker) -> None:
    from worker.adapters.ip_adapter.manager import IpAdapterManager
    from worker.request.ip_adapter import IpAdapterUnit

    engine = worker.engine
    placement = SimpleNamespace(plan=SimpleNamespace(offload="sequential", device="cuda"), adopt=lambda module: None)
    manager = IpAdapterManager(engine.pipe.unet, engine.dtype, engine.settings, placement)
    with pytest.raises(Exception, match=r"ip_adapters: OFFLOAD=sequential .* OFFLOAD=model or none"):
        manager.check([IpAdapterUnit(name=PLAIN, image="aGk=")])
    assert manager.check([]) == []


def test_a_compiled_unet_runs_ip_adapter_calls_eagerly(worker, roots) -> None:
    """With COMPILE set, the calls run under torch's force_eager stance: a compiled function compiles nothing there."""
    from torch._dynamo.utils import counters

    from worker.adapters.ip_adapter.install import installed

    engine = worker.engine
    assert not engine.ip_adapters.eager_unet  # this worker does not compile
    adapters = engine.ip_adapters.cache.adapters
    run(worker, {**JOB, "ip_adapters": [unit()]})
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", fullgraph=True)
    before = counters["stats"]["unique_graphs"]
    with installed(engine.pipe.unet, list(adapters.values())[-1:], [1.0], eager=True):
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert counters["stats"]["unique_graphs"] == before
    from worker.adapters.ip_adapter.manager import IpAdapterManager
    from worker.request.ip_adapter import IpAdapterUnit

    for compile_setting, eager in (("unet", True), ("regional", True), ("off", False)):
        settings = load_settings({"COMPILE": compile_setting, "IP_ADAPTER_DIR": str(roots["ip_adapters"])})
        manager = IpAdapterManager(engine.pipe.unet, engine.dtype, settings, engine.placement)
        assert manager.eager_unet is eager
        said = manager.prepare([IpAdapterUnit(name=PLAIN, image=unit()["image"])]).stable()[0]["unet"]
        assert said == (f"eager (COMPILE={compile_setting} set aside for this job)" if eager else "eager")
        # At scale 0 nothing goes into the UNet and nothing into its call: a compiled UNet runs its own code (on the
        # H200 its fp16 bytes differ from eager ones, so scale 0 would not be the plain job's image otherwise)
        silent = manager.prepare([IpAdapterUnit(name=PLAIN, image=unit()["image"], scale=0.0)])
        assert silent.stable()[0]["unet"] == "as without IP-Adapters (every scale is 0)"
        assert isinstance(manager.applied(silent), contextlib.nullcontext) and silent.call_kwargs(cfg=True) == {}


def test_memory_planning_counts_the_largest_adapters_and_their_encoders(dev_ip_adapter_root: Path) -> None:
    from safetensors import safe_open

    from worker.adapters.ip_adapter.manager import ip_adapter_reserve

    def values(path: Path) -> int:
        with safe_open(str(path), "pt") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118

    adapters = dev_ip_adapter_root / "sdxl_models"
    plus, plain = values(adapters / f"{PLUS}.safetensors"), values(adapters / f"{PLAIN}.safetensors")
    vit_h = values(dev_ip_adapter_root / "models" / "image_encoder" / "model.safetensors")
    big_g = values(adapters / "image_encoder" / "model.safetensors")
    assert plus > plain
    one = load_settings({"IP_ADAPTER_DIR": str(dev_ip_adapter_root), "IP_ADAPTER_CACHE_SIZE": "1"})
    assert ip_adapter_reserve(one, torch.float16) == {"ip_adapter.0": 2 * plus, "image_encoder.0": 2 * vit_h}
    two = load_settings({"IP_ADAPTER_DIR": str(dev_ip_adapter_root)})
    assert ip_adapter_reserve(two, torch.float32) == {
        "ip_adapter.0": 4 * plus,
        "ip_adapter.1": 4 * plain,
        "image_encoder.0": 4 * vit_h,
        "image_encoder.1": 4 * big_g,
    }


UNIT_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=12), st.just("aGk=")
)


@given(
    st.dictionaries(st.sampled_from(["name", "image", "scale", "weight", "model"]), UNIT_VALUES, max_size=4),
    st.integers(0, 5),
)
def test_any_ip_adapter_entry_parses_or_is_an_error_naming_ip_adapters(entry: dict, count: int) -> None:
    from core.errors import InvalidRequest
    from worker.request.schema import parse_request

    try:
        request = parse_request({"prompt": "x", "ip_adapters": [entry] * count})
    except InvalidRequest as error:
        assert "ip_adapters" in str(error)
        return
    assert len(request.ip_adapters) == count
    for item in request.ip_adapters:
        assert 0 <= item.scale <= 2 and "/" not in item.name and not item.name.endswith(".safetensors")


def test_with_a_refiner_the_image_prompt_steers_the_base_stage(dev_model_dir, dev_refiner_dir, roots) -> None:
    settings = load_settings({"IP_ADAPTER_DIR": str(roots["ip_adapters"])})
    with_refiner = Worker(settings)
    with_refiner.start(dev_model_dir, dev_refiner_dir)
    payload = {**JOB, "num_inference_steps": 4, "refiner_inference_steps": 4, "high_noise_frac": 0.5}
    out = run(with_refiner, {**payload, "ip_adapters": [unit()]})
    assert "error" not in out, out
    metadata = out["metadata"]
    assert [stage["model"] for stage in metadata["stages"]] == ["base", "refiner"]
    assert metadata["ip_adapters"][0]["applied_to"] == "base"
    assert out["images"][0] != run(with_refiner, payload)["images"][0]


def test_one_adapter_may_be_an_object_or_ip_adapter() -> None:
    """diffusers' users give one image prompt; it is a list of one, under either name (not both)."""
    from core.errors import InvalidRequest
    from worker.request.schema import parse_request

    entry = {"name": PLAIN, "image": "aGk=", "scale": 0.5}
    for fields in ({"ip_adapters": entry}, {"ip_adapter": entry}, {"ip_adapter": [entry]}):
        assert (
            parse_request({"prompt": "x", **fields}).ip_adapters
            == parse_request({"prompt": "x", "ip_adapters": [entry]}).ip_adapters
        )
    with pytest.raises(InvalidRequest, match="ip_adapter: give ip_adapter or ip_adapters, not both"):
        parse_request({"prompt": "x", "ip_adapter": entry, "ip_adapters": [entry]})
    with pytest.raises(InvalidRequest, match=r"ip_adapters\.0\.scale: .*allowed 0\.\.2"):
        parse_request({"prompt": "x", "ip_adapter": {**entry, "scale": 2.5}})


def test_with_an_unfused_lora_it_gives_stock_diffusers_lora_and_ip_adapter_image(dev_model_dir, roots) -> None:
    """LORA_FUSE=0 keeps the LoRA as peft layers inside the very attention modules the IP-Adapter processors call:
    the job equals stock diffusers with load_lora_weights and load_ip_adapter, and afterwards the worker's LoRA and
    plain jobs are its fresh bytes."""
    settings = load_settings(
        {"IP_ADAPTER_DIR": str(roots["ip_adapters"]), "LORA_DIR": str(roots["loras"]), "LORA_FUSE": "0"}
    )
    made = Worker(settings)
    made.start(dev_model_dir)
    lora = {"loras": [{"name": "style", "scale": 0.8}]}
    fresh_plain, fresh_lora = run(made, REFERENCE_JOB)["images"][0], run(made, {**REFERENCE_JOB, **lora})["images"][0]
    both = run(made, {**REFERENCE_JOB, **lora, "ip_adapters": [unit(PLUS, scale=0.7)]})
    assert "error" not in both, both
    pipe = stock_pipeline(dev_model_dir, roots["ip_adapters"], [PLUS], [0.7])
    pipe.load_lora_weights(str(roots["loras"] / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    assert np.array_equal(pixels(both["images"][0]), stock_image(pipe, [reference_image()]))
    assert run(made, {**REFERENCE_JOB, **lora})["images"][0] == fresh_lora
    assert run(made, REFERENCE_JOB)["images"][0] == fresh_plain
