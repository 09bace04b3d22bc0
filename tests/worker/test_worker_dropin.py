"""Drop-in parity with the official RunPod SDXL worker: its payloads, img2img, uploads and embedded parameters."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from core.settings import load_settings
from tests.support import official_worker
from tests.support.official_worker import shrunk_for_the_cpu
from worker.handler import Worker
from worker.output.images import MAX_EXIF_PARAMETER_BYTES, read_parameters

ROOT = Path(__file__).resolve().parents[2]
# The official samples, shrunk for the CPU: 256² instead of 1024², 2 base steps instead of 25, 4 refiner steps
# instead of 50. Every other field as sent there.
OFFICIAL_TEST_INPUT = shrunk_for_the_cpu(official_worker.OFFICIAL_TEST_INPUT)
OFFICIAL_HUB_TEST = shrunk_for_the_cpu(official_worker.OFFICIAL_HUB_TEST)
SMALL = {"prompt": "a lighthouse at dawn", "height": 256, "width": 256, "num_inference_steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path) -> Worker:
    worker = Worker(load_settings({}))
    worker.start(dev_model_dir)
    assert worker.startup_error is None, worker.startup_error
    return worker


def png_bytes(size: tuple[int, int] = (320, 256), colour: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 16):  # some structure, so img2img has something to keep
        image.paste((20, 40, 220), (x, 0, x + 8, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.mark.parametrize("payload", [OFFICIAL_TEST_INPUT, OFFICIAL_HUB_TEST], ids=["test_input", "hub_tests"])
def test_official_payloads_are_served_with_the_official_output_keys(worker: Worker, payload: dict) -> None:
    out = worker.handle({"id": "official", "input": payload})
    assert "error" not in out, out
    assert set(out) == {"images", "image_url", "seed", "metadata"}
    assert out["images"][0].startswith("data:image/png;base64,") and out["image_url"] == out["images"][0]
    assert out["seed"] == payload["seed"] and decode(out["images"][0]).size == (256, 256)
    refiner = out["metadata"]["refiner"]
    assert refiner == {"used": False, "reason": refiner["reason"]} and "no refiner is loaded" in refiner["reason"]
    assert worker.handle({"id": "again", "input": payload})["images"] == out["images"]


def test_explicit_refiner_without_one_loaded_is_an_error(worker: Worker) -> None:
    out = worker.handle({"id": "r", "input": {**SMALL, "refiner": True}})
    assert out["error"].startswith("invalid input: refiner: true, but this worker has no refiner loaded")


def test_img2img_from_a_data_uri_follows_the_input_size_and_is_reproducible(worker: Worker) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    payload = {"prompt": "a blue fence", "image_url": uri, "strength": 0.5, "num_inference_steps": 4, "seed": 3}
    out = worker.handle({"id": "i2i", "input": payload})
    assert "error" not in out, out
    assert decode(out["images"][0]).size == (320, 256)
    metadata = out["metadata"]
    assert metadata["mode"] == "img2img" and metadata["img2img"]["input_size"] == [320, 256]
    assert metadata["img2img"]["model"] == "base" and (metadata["width"], metadata["height"]) == (320, 256)
    assert worker.handle({"id": "i2i-again", "input": payload})["images"] == out["images"]
    # Bare base64 is the same image; a given size resizes the input.
    bare = worker.handle({"id": "bare", "input": {**payload, "image_url": uri.split(",", 1)[1]}})
    assert bare["images"] == out["images"]
    sized = worker.handle({"id": "sized", "input": {**payload, "width": 256, "height": 256}})
    assert decode(sized["images"][0]).size == (256, 256)


def test_img2img_requests_over_their_own_pictures_share_a_call(worker: Worker) -> None:
    """Issue 23: with width/height given, img2img requests over different pictures share one call, so a batch run over
    a folder of pictures fills whole calls instead of padding each picture's. Each image is byte for byte the one its
    picture makes in a call of the same size with copies of itself (what the batch runner's padding gives)."""
    import torch

    from worker.generation.grouping import fields_key
    from worker.request.schema import parse_request

    engine = worker.engine
    pictures = [png_bytes((320, 256), (200, 120, 40)), png_bytes((192, 192), (30, 160, 90))]
    common = {"strength": 0.5, "num_inference_steps": 4, "width": 128, "height": 128}
    first, second = (
        parse_request({**common, "prompt": prompt, "seed": seed, "image_url": base64.b64encode(picture).decode()})
        for prompt, seed, picture in zip(("a blue fence", "a green gate"), (3, 4), pictures, strict=True)
    )
    assert engine.group_key(first) == engine.group_key(second)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread count for every call compared
    try:
        shared = engine.generate_group([first, second])
        alone = [engine.generate_group([request, request])[0] for request in (first, second)]
    finally:
        torch.set_num_threads(threads)
    for together, by_itself in zip(shared, alone, strict=True):
        assert together.images[0].tobytes() == by_itself.images[0].tobytes()
        assert together.metadata.stable == by_itself.metadata.stable
    assert shared[0].images[0].tobytes() != shared[1].images[0].tobytes()
    assert [result.metadata.stable["img2img"]["input_size"] for result in shared] == [[320, 256], [192, 192]]
    # The picture still splits calls where it shapes them: no size given (the output follows it), or a mask.
    unsized = [parse_request({"prompt": "x", "image_url": r.image_url, "strength": 0.5}) for r in (first, second)]
    masked = [parse_request({**common, "prompt": "x", "image_url": r.image_url, "mask": r.image_url}) for r in unsized]
    plain = parse_request({**common, "prompt": "x"})
    for pair in (unsized, masked):
        assert fields_key(pair[0]) != fields_key(pair[1])
    assert fields_key(plain) != fields_key(first)  # text-to-image never shares an img2img call


def test_img2img_strength_too_small_for_the_steps_is_a_clear_error(worker: Worker) -> None:
    uri = base64.b64encode(png_bytes((256, 256))).decode()
    out = worker.handle({"id": "s", "input": {"prompt": "x", "image_url": uri, "num_inference_steps": 3}})
    assert out["error"].startswith("invalid input: strength: 0.3 x num_inference_steps 3 leaves no denoising step")


def test_img2img_strength_changes_how_much_of_the_input_survives(worker: Worker) -> None:
    uri = base64.b64encode(png_bytes((256, 256))).decode()
    source = Image.open(io.BytesIO(png_bytes((256, 256)))).convert("RGB")

    def distance(strength: float) -> float:
        out = worker.handle({"id": "s", "input": {"prompt": "x", "image_url": uri, "strength": strength, "seed": 1}})
        image = decode(out["images"][0]).convert("RGB")
        return sum(abs(a - b) for a, b in zip(image.tobytes(), source.tobytes(), strict=True)) / len(source.tobytes())

    assert distance(0.1) < distance(0.9)


class _ImageServer(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    paths: ClassVar[list[str]] = []  # every path asked for, to show what never reached the server

    def do_GET(self) -> None:
        self.paths.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b"not here"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """An image server on 127.0.0.1 (the hostile ones are in test_image_downloads.py)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    tiff = io.BytesIO()
    Image.new("RGB", (64, 64)).save(tiff, format="TIFF")
    _ImageServer.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, png_bytes((256, 288))),
        "/loop.png": (302, {"Location": "/loop.png"}, b""),
        "/to-file.png": (302, {"Location": "file:///etc/passwd"}, b""),
        "/text.png": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
        "/huge.png": (200, {"Content-Length": str(10**9)}, b""),
        "/photo.tiff": (200, {"Content-Type": "image/tiff"}, tiff.getvalue()),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()


@pytest.fixture(scope="module")
def private_worker(dev_model_dir: Path) -> Worker:
    """A worker of a private deployment: job URLs may reach loopback, where the test servers are."""
    worker = Worker(load_settings({"ALLOW_PRIVATE_URLS": "1"}))
    worker.start(dev_model_dir)
    assert worker.startup_error is None, worker.startup_error
    return worker


def test_image_urls_on_loopback_are_refused_by_default(worker: Worker, image_server: str) -> None:
    before = len(_ImageServer.paths)
    out = worker.handle({"id": "ssrf", "input": {"prompt": "x", "image_url": f"{image_server}/ok.png"}})
    assert out["error"].startswith(f"invalid input: image_url: {image_server}/ok.png points to 127.0.0.1, a loopback")
    assert "ALLOW_PRIVATE_URLS=1" in out["error"] and len(_ImageServer.paths) == before  # never connected


def test_img2img_from_a_url_on_loopback(private_worker: Worker, image_server: str) -> None:
    payload = {"prompt": "a fence", "image_url": f"{image_server}/ok.png", "num_inference_steps": 4, "seed": 8}
    payload["strength"] = 0.5
    out = private_worker.handle({"id": "url", "input": payload})
    assert "error" not in out, out
    assert decode(out["images"][0]).size == (256, 288)
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((256, 288))).decode()
    same = private_worker.handle({"id": "uri", "input": {**payload, "image_url": data_uri}})
    assert same["images"] == out["images"]  # the same bytes by URL or inline give the same image


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/loop.png", "redirects more than 5 times"),
        ("/to-file.png", "only http(s) is followed"),
        ("/text.png", "this is an HTML page; only PNG, JPEG and WebP images are accepted"),
        ("/photo.tiff", "this is a TIFF image; only PNG, JPEG and WebP images are accepted"),
        ("/huge.png", "1000.0 MB, larger than the 20.0 MB limit"),
        ("/missing.png", "answered HTTP 404 Not Found"),
    ],
)
def test_bad_image_urls_are_clear_errors(private_worker: Worker, image_server: str, path: str, message: str) -> None:
    out = private_worker.handle({"id": "bad", "input": {"prompt": "x", "image_url": f"{image_server}{path}"}})
    assert out["error"].startswith("invalid input: image_url: ") and message in out["error"], out


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_prompts_past_the_exif_limit_still_give_an_image(worker: Worker, output_format: str) -> None:
    # Prompt and negative of 19,800 characters each: 79 kB as UTF-16, 1,800 tokens (24 chunks) each. (16,400 emoji
    # are 219 chunks, over worker.prompting.chunks.MAX_CHUNKS_PER_PROMPT: refused before generating.)
    text = "lighthouse " * 1_800
    payload = {**SMALL, "num_inference_steps": 1, "prompt": text, "negative_prompt": text}
    payload["output_format"] = output_format
    out = worker.handle({"id": "exif", "input": payload})
    assert "error" not in out, out["error"]
    data = base64.b64decode(out["images"][0].split(",", 1)[1])
    embedded = read_parameters(data)
    assert "truncated" in embedded and len(embedded.encode("utf-16-be")) <= MAX_EXIF_PARAMETER_BYTES
    assert embedded.startswith(text[:1000])


def test_a_bucket_without_keys_is_an_error_not_a_local_folder(worker: Worker, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # rp_upload's stand-in would write ./local_upload here
    bucket_only = Worker(load_settings({"BUCKET_ENDPOINT_URL": "https://bucket.example.invalid/images"}))
    bucket_only.engine, bucket_only.startup_error = worker.engine, None
    for return_type in ({}, {"return_type": "s3"}):
        out = bucket_only.handle({"id": "up", "input": {**SMALL, "num_inference_steps": 1, **return_type}})
        assert out["error"].startswith("upload failed: BUCKET_ENDPOINT_URL is set but BUCKET_ACCESS_KEY_ID and")
    assert not (tmp_path / "local_upload").exists()
    # base64 asked for explicitly still works with a bucket configured, as in the official worker.
    out = bucket_only.handle({"id": "b64", "input": {**SMALL, "num_inference_steps": 1, "return_type": "base64"}})
    assert out["images"][0].startswith("data:image/png;base64,") and out["metadata"]["returned_as"] == "base64"


def test_test_input_json_is_valid_for_the_official_schema_too() -> None:
    """The repository's own sample job uses only fields the official worker also knows (plus our extras)."""
    job = json.loads((ROOT / "test_input.json").read_text())
    assert set(job["input"]) <= set(OFFICIAL_TEST_INPUT) | {"loras", "clip_skip", "output_format", "quality"}


# -- with a refiner loaded --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refined(dev_model_dir: Path, dev_refiner_dir: Path) -> Worker:
    worker = Worker(load_settings({}))
    worker.start(dev_model_dir, refiner_dir=dev_refiner_dir)
    assert worker.startup_error is None, worker.startup_error
    return worker


def test_official_payload_runs_the_ensemble_of_experts_with_a_refiner(refined: Worker) -> None:
    out = refined.handle({"id": "official", "input": OFFICIAL_TEST_INPUT})
    assert "error" not in out, out
    refiner = out["metadata"]["refiner"]
    assert refiner["used"] is True and refiner["high_noise_frac"] == 0.8 and refiner["refiner_inference_steps"] == 4
    assert refiner["model"]["shares_with_base"] == ["text_encoder_2", "vae"]  # no second copy of either in memory
    assert "refiner_s" in out["metadata"]["timings"]
    assert refined.handle({"id": "again", "input": OFFICIAL_TEST_INPUT})["images"] == out["images"]
    base_only = refined.handle({"id": "base", "input": {**OFFICIAL_TEST_INPUT, "refiner": False}})
    assert base_only["metadata"]["refiner"] == {"used": False, "reason": "the request set refiner: false"}
    assert base_only["images"] != out["images"]
    engine = refined.engine
    assert engine.refiner.vae is engine.pipe.vae and engine.refiner.text_encoder_2 is engine.pipe.text_encoder_2


def test_refiner_without_high_noise_frac_refines_at_strength_as_the_official_worker(refined: Worker) -> None:
    payload = {**OFFICIAL_TEST_INPUT, "high_noise_frac": None, "strength": 0.5}
    out = refined.handle({"id": "strength", "input": payload})
    assert "error" not in out, out
    assert out["metadata"]["refiner"]["strength"] == 0.5 and out["metadata"]["refiner"]["high_noise_frac"] is None
    weaker = refined.handle({"id": "weaker", "input": {**payload, "strength": 0.25}})
    assert weaker["images"] != out["images"]


def test_long_weighted_prompts_reach_the_refiner_chunked(refined: Worker) -> None:
    long_prompt = ", ".join(f"(tower {i}:1.2)" for i in range(60))  # ~300 tokens: 4+ chunks on both models
    out = refined.handle({"id": "long", "input": {**OFFICIAL_TEST_INPUT, "prompt": long_prompt}})
    assert "error" not in out, out
    assert out["metadata"]["prompt"]["num_chunks"] >= 4 and out["metadata"]["refiner"]["used"] is True


def test_img2img_through_the_refiner_when_asked(refined: Worker) -> None:
    uri = base64.b64encode(png_bytes((256, 256))).decode()
    payload = {"prompt": "x", "image_url": uri, "seed": 2, "refiner_inference_steps": 4, "strength": 0.5}
    on_base = refined.handle({"id": "i2i-base", "input": payload})
    on_refiner = refined.handle({"id": "i2i-refiner", "input": {**payload, "refiner": True}})
    assert on_base["metadata"]["img2img"]["model"] == "base"
    assert on_refiner["metadata"]["img2img"]["model"] == "refiner" and on_refiner["metadata"]["refiner"]["used"]
    assert on_base["images"] != on_refiner["images"]


def test_a_refiner_with_its_own_encoder_gets_its_own_chunked_conditioning(dev_model_dir: Path, tmp_path: Path) -> None:
    from model_build.convert import convert
    from model_build.dev_model import write_dev_checkpoint

    # Another seed: the refiner's VAE and bigG encoder differ from the base's, so nothing can be shared.
    checkpoint = write_dev_checkpoint(tmp_path / "other-refiner.safetensors", seed=1, refiner=True)
    convert(checkpoint, tmp_path / "other-refiner")
    worker = Worker(load_settings({}))
    worker.start(dev_model_dir, refiner_dir=tmp_path / "other-refiner")
    assert worker.startup_error is None, worker.startup_error
    engine = worker.engine
    assert engine.refiner.text_encoder_2 is not engine.pipe.text_encoder_2 and engine.refiner_prompt_encoder
    payload = {**OFFICIAL_TEST_INPUT, "prompt": "(a castle:1.3) BREAK on a hill"}
    out = worker.handle({"id": "own", "input": payload})
    assert "error" not in out, out
    assert out["metadata"]["refiner"]["model"]["shares_with_base"] == []
    assert worker.handle({"id": "own-again", "input": payload})["images"] == out["images"]


def test_batch_lines_take_the_same_refiner_and_img2img_fields(
    dev_model_dir: Path, dev_refiner_dir: Path, tmp_path: Path
) -> None:
    from batch.cli import main as batch_main

    image = base64.b64encode(png_bytes((256, 256))).decode()
    lines = [
        {"id": "refined", **OFFICIAL_TEST_INPUT},
        {"id": "img2img", "prompt": "a fence", "image_url": image, "strength": 0.5, "num_inference_steps": 4},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    argv = ["run", str(jobs), "--out", str(out), "--model", str(dev_model_dir), "--refiner", str(dev_refiner_dir)]
    assert batch_main([*argv, "--no-progress"]) == 0
    refined = json.loads((out / "refined.json").read_text())["metadata"]
    assert refined["refiner"]["used"] is True and refined["refiner"]["high_noise_frac"] == 0.8
    img2img = json.loads((out / "img2img.json").read_text())["metadata"]
    assert img2img["mode"] == "img2img" and img2img["img2img"]["model"] == "base"
    assert Image.open(out / "images" / "img2img-0.png").size == (256, 256)


def test_a_folder_of_the_other_family_is_refused_by_name(dev_model_dir: Path, dev_refiner_dir: Path) -> None:
    swapped = Worker(load_settings({}))
    swapped.start(dev_refiner_dir)  # the refiner given as the base model
    assert str(swapped.startup_error).startswith(f"configuration: MODEL_DIR {dev_refiner_dir} holds a converted ")
    assert "sdxl-refiner model, not sdxl-base" in swapped.handle({"id": "x", "input": SMALL})["error"]
    base_as_refiner = Worker(load_settings({}))
    base_as_refiner.start(dev_model_dir, refiner_dir=dev_model_dir)
    assert "REFINER_DIR" in str(base_as_refiner.startup_error)
    assert "sdxl-base model, not sdxl-refiner" in str(base_as_refiner.startup_error)
