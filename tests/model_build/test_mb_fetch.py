"""Fetching sources: sha256 pins, real HTTP downloads with resume (loopback only), hf:// parsing and cache."""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.hub_names import HubFileName
from model_build.__main__ import main
from model_build.errors import FetchError
from model_build.source import display_url, fetch, parse_hf_uri

REVISION = "0123456789abcdef0123456789abcdef01234567"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- local files and pins ---


def test_local_file_is_used_in_place(dev_checkpoint: Path) -> None:
    fetched = fetch(dev_checkpoint)
    assert (fetched.path, fetched.name, fetched.origin, fetched.sha256) == (
        dev_checkpoint,
        dev_checkpoint.name,
        "local",
        None,
    )


def test_a_matching_pin_is_checked_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    assert fetch(path, sha256=sha256(b"weights").upper()).sha256 == sha256(b"weights")


def test_a_pin_mismatch_names_the_file_and_both_hashes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"other weights")
    pin = sha256(b"weights")
    with pytest.raises(FetchError) as error:
        fetch(path, sha256=pin)
    message = str(error.value)
    assert "sha256 mismatch for file model.safetensors" in message
    assert f"it is {sha256(b'other weights')}, the pin (--sha256) says {pin}" in message
    assert path.exists()  # a local file is never deleted


def test_bad_pins_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="is not a sha256"):
        fetch(tmp_path, sha256="abc")
    with pytest.raises(FetchError, match="no such file"):
        fetch(tmp_path / "absent.safetensors")


# --- URLs, served by a real HTTP server on the loopback interface ---


class _Server(ThreadingHTTPServer):
    data: bytes
    cut_first_response_at: int | None  # send only this many bytes of the first full response, then hang up
    honour_range: bool
    requests: list[str | None]  # the Range header of each GET


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        data, server = self.server.data, self.server
        asked = self.headers.get("Range")
        server.requests.append(asked)
        if self.path.startswith("/missing"):
            self.send_error(404, "Not Found")
            return
        start = int(asked.removeprefix("bytes=").split("-")[0]) if asked and server.honour_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if self.path.startswith("/api/"):
            self.send_header("Content-Disposition", 'attachment; filename="my model.safetensors"')
        self.end_headers()
        body = data[start:]
        if server.cut_first_response_at is not None:
            body, server.cut_first_response_at = body[: server.cut_first_response_at], None
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.data = bytes(range(256)) * 4096  # 1 MiB
    httpd.cut_first_response_at, httpd.honour_range, httpd.requests = None, True, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_url_download_resumes_after_an_interruption(server: _Server, tmp_path: Path) -> None:
    server.cut_first_response_at = 300_000
    source = url(server, "/files/model.safetensors?token=SECRET")
    with pytest.raises(FetchError, match=r"after 300,000 of 1,048,576 bytes; run the same command again to resume"):
        fetch(source, cache_dir=tmp_path)
    fetched = fetch(source, sha256=sha256(server.data), cache_dir=tmp_path)
    assert server.requests == [None, "bytes=300000-"]
    assert fetched.path.read_bytes() == server.data and fetched.path.name == "model.safetensors"
    assert fetched.origin == "url" and "SECRET" not in fetched.name and fetched.name.endswith("/model.safetensors")
    # Fetched again: the complete download is reused, nothing more is requested.
    assert fetch(source, cache_dir=tmp_path).path == fetched.path and len(server.requests) == 2


def test_a_server_that_ignores_range_restarts_the_download(server: _Server, tmp_path: Path) -> None:
    server.cut_first_response_at, server.honour_range = 1000, False
    source = url(server, "/api/download/42")
    with pytest.raises(FetchError, match=r"ended after 1,000 of 1,048,576 bytes"):
        fetch(source, cache_dir=tmp_path)
    fetched = fetch(source, cache_dir=tmp_path)
    assert fetched.path.read_bytes() == server.data
    assert fetched.path.name == "my_model.safetensors"  # from Content-Disposition, made safe


def test_a_url_pin_mismatch_removes_the_download(server: _Server, tmp_path: Path) -> None:
    source = url(server, "/model.safetensors")
    with pytest.raises(FetchError, match=r"sha256 mismatch .* The downloaded copy was removed"):
        fetch(source, sha256=sha256(b"something else"), cache_dir=tmp_path)
    assert not any(p.is_file() for p in (tmp_path / "downloads").rglob("*"))


def test_http_errors_and_refused_urls_never_leak_tokens(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"/missing\.safetensors: HTTP 404") as error:
        fetch(url(server, "/missing.safetensors?token=SECRET"), cache_dir=tmp_path)
    assert "SECRET" not in str(error.value)
    with pytest.raises(FetchError, match=r"only https:// URLs"):
        fetch("http://example.com/model.safetensors", cache_dir=tmp_path)  # refused before connecting
    with pytest.raises(FetchError, match=r"is a pickle checkpoint \(\.ckpt\)"):
        fetch("https://example.invalid/model.ckpt", cache_dir=tmp_path)  # refused before connecting
    assert display_url("https://user:pw@host:8443/a/b.safetensors?sig=1#x") == "https://host:8443/a/b.safetensors"


def test_cli_inspects_a_downloaded_checkpoint(server: _Server, dev_checkpoint: Path, tmp_path: Path, capsys) -> None:
    server.data = dev_checkpoint.read_bytes()
    source = url(server, "/models/sdxl-dev.safetensors")
    assert main(["inspect", source, "--sha256", sha256(server.data), "--cache-dir", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"{source}: SDXL base checkpoint, config dev_tiny, 957 tensors")


# --- hf:// ---


def test_hf_uri_is_parsed() -> None:
    parsed = parse_hf_uri(f"hf://stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors@{REVISION}")
    assert parsed == HubFileName("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", REVISION)
    nested = parse_hf_uri(f"hf://owner/repo/unet/sub/model.safetensors@{REVISION.upper()}")
    assert (nested.filename, nested.revision) == ("unet/sub/model.safetensors", REVISION)
    assert nested.uri == f"hf://owner/repo/unet/sub/model.safetensors@{REVISION}"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://owner/repo/model.safetensors@main", r"revision 'main' is not a 40-hex commit hash"),
        ("hf://owner/repo/model.safetensors@v1.0", r"revision 'v1\.0' is not a 40-hex commit hash"),
        (f"hf://owner/repo/model.safetensors@{REVISION[:12]}", r"is not a 40-hex commit hash"),
        ("hf://owner/repo/model.safetensors", r"names no revision"),
        (f"hf://owner/model.safetensors@{REVISION}", r"does not name a repository and a file"),
        (f"hf://owner/repo/model.ckpt@{REVISION}", r"is a pickle file"),
    ],
)
def test_hf_uri_errors_say_how_to_pin(uri: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=message):
        fetch(uri, cache_dir=tmp_path)


def test_hf_file_comes_from_the_cache_offline(dev_checkpoint: Path, tmp_path: Path) -> None:
    """The tests run with HF_HUB_OFFLINE=1: a cached pinned file is found, an uncached one is a clear error."""
    snapshot = tmp_path / "hf" / "models--owner--sdxl" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    shutil.copyfile(dev_checkpoint, snapshot / "sdxl-dev.safetensors")
    fetched = fetch(f"hf://owner/sdxl/sdxl-dev.safetensors@{REVISION}", cache_dir=tmp_path)
    assert fetched.origin == "hf" and fetched.path.read_bytes() == dev_checkpoint.read_bytes()
    with pytest.raises(FetchError, match="is not in the local cache and the Hub cannot be reached"):
        fetch(f"hf://owner/other/model.safetensors@{REVISION}", cache_dir=tmp_path)
