"""S3 uploads against real S3 servers on 127.0.0.1: moto's S3 server, and one that never answers.

Each image goes up with its Content-Type (the official worker sends image/png; without it S3 serves
binary/octet-stream), and a bucket that hangs costs at most UPLOAD_TIMEOUT_S, retries included.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UploadFailed
from core.results import EncodedImage
from core.settings import load_settings
from worker.handler import Worker
from worker.output.delivery import UPLOAD_ATTEMPTS, upload

KEYS = {"BUCKET_ACCESS_KEY_ID": "test-key", "BUCKET_SECRET_ACCESS_KEY": "test-secret"}


def encoded(fmt: str, seed: int = 1) -> EncodedImage:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (seed * 40 % 256, 90, 200)).save(buffer, format=fmt.upper())
    return EncodedImage(buffer.getvalue(), fmt, seed)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEYS["BUCKET_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["BUCKET_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=time.strftime("%m-%y"))  # the bucket rp_upload (and so this worker) writes to
    yield endpoint
    server.stop()


def fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers.get("Content-Type"), response.read()


def test_every_image_goes_up_with_its_content_type(s3_endpoint: str) -> None:
    settings = load_settings({"BUCKET_ENDPOINT_URL": s3_endpoint, **KEYS})
    images = [encoded("png", 1), encoded("jpeg", 2), encoded("webp", 3)]
    urls = upload("job-1", images, settings)
    assert len(set(urls)) == 3
    for url, image in zip(urls, images, strict=True):
        content_type, data = fetch(url)
        assert content_type == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[image.format]
        assert data == image.data
        assert f"/{time.strftime('%m-%y')}/job-1/job-1-" in url and url.split("?")[0].endswith(f".{image.extension}")


def test_a_job_through_the_worker_returns_urls_of_pngs(s3_endpoint: str, dev_model_dir: Path) -> None:
    worker = Worker(load_settings({"BUCKET_ENDPOINT_URL": s3_endpoint, **KEYS}))
    worker.start(dev_model_dir)
    out = worker.handle({"id": "s3-job", "input": {"prompt": "a dock", "width": 64, "height": 64, "seed": 5}})
    assert "error" not in out, out
    assert out["image_url"] == out["images"][0] and out["metadata"]["returned_as"] == "s3"
    content_type, data = fetch(out["images"][0])
    assert content_type == "image/png" and Image.open(io.BytesIO(data)).size == (64, 64)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A server that accepts connections and reads requests but never answers (a hung bucket)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(connection)  # kept open, never answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_bucket_that_never_answers_costs_at_most_the_deadline(silent_endpoint: str) -> None:
    settings = load_settings({"BUCKET_ENDPOINT_URL": silent_endpoint, **KEYS, "UPLOAD_TIMEOUT_S": "2"})
    import boto3  # noqa: F401  (imported ahead: on a loaded machine its first import alone takes seconds)

    started = time.monotonic()
    with pytest.raises(UploadFailed) as caught:
        upload("job-2", [encoded("png"), encoded("png", 2)], settings)
    elapsed = time.monotonic() - started
    assert elapsed < 2 + 1.0, elapsed
    message = str(caught.value)
    assert "UPLOAD_TIMEOUT_S=2 s" in message and f"{UPLOAD_ATTEMPTS} attempts" in message and silent_endpoint in message
    assert UploadFailed.retriable  # another worker (or a later attempt) may reach the bucket


def test_a_refused_connection_is_an_upload_error_naming_the_retries() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    settings = load_settings({"BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{port}", **KEYS, "UPLOAD_TIMEOUT_S": "10"})
    with pytest.raises(UploadFailed, match=rf"failed \(after up to {UPLOAD_ATTEMPTS} attempts"):
        upload("job-3", [encoded("png")], settings)
