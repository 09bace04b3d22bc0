"""LoRAs by URL, the download side: a real HTTP server on loopback, no model (the jobs are in test_lora_urls.py).

The private-address allowance (ALLOW_PRIVATE_URLS) is on where a test needs the loopback server, and off in the
tests of the default; every expectation (bytes, hashes, Range headers) is computed here, not taken from the code.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import url_fetch
from core.errors import LoraFailed
from core.settings import load_settings
from core.url_download import download_file
from core.url_fetch import UrlFetchError, UrlPolicy
from tests.support.file_server import FileServer, Served
from tests.support.tls import https_host as tls_https_host
from worker.adapters.lora.sources import LoraError, LoraResolver, LoraSettings

DATA = os.urandom(300_000)  # stands for a LoRA file: the resolver never reads what it downloads
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    files = FileServer()
    files.files["/lora.safetensors"] = Served(DATA)
    yield files
    files.close()


def resolver(tmp_path: Path, **options) -> LoraResolver:
    settings = {"allow_download": True, "download_dir": tmp_path / "downloads", "allow_private_urls": True, **options}
    return LoraResolver(LoraSettings(roots=(tmp_path / "loras",), **settings))


def resolve(lookup: LoraResolver, url: str, sha256: str | None = DIGEST):
    return lookup.resolve(url, field="loras[0].name", sha256=sha256, sha256_field="loras[0].sha256")


def cache_files(tmp_path: Path) -> list[str]:
    """What the download cache holds, lock files left out (they stay, empty, as file locks do)."""
    root = tmp_path / "downloads"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")


def test_a_pinned_url_is_downloaded_once_and_kept_under_its_hash(server: FileServer, tmp_path: Path) -> None:
    lookup = resolver(tmp_path)
    source = resolve(lookup, server.url("/lora.safetensors?token=SECRET"))
    assert source.path == (tmp_path / "downloads" / "sha256" / f"{DIGEST}.safetensors").resolve()
    assert source.path.read_bytes() == DATA and source.origin == "url"
    assert source.label == server.url("/lora.safetensors?...") and "SECRET" not in source.label
    assert cache_files(tmp_path) == [f"sha256/{DIGEST}.safetensors"]
    # The same file by another URL (another token, another host name for the server) costs no request.
    again = resolve(lookup, server.url("/elsewhere.safetensors", host="localhost"), DIGEST.upper())
    assert again.path == source.path and len(server.requests) == 1


def test_the_default_refuses_a_loopback_address(server: FileServer, tmp_path: Path) -> None:
    env = {"ALLOW_LORA_DOWNLOAD": "1", "LORA_DOWNLOAD_DIR": str(tmp_path / "downloads")}
    lookup = LoraResolver(LoraSettings.from_settings(load_settings(env)))
    with pytest.raises(LoraFailed, match=r"loras\[0\]\.name: .* points to 127\.0\.0\.1, a loopback address; only"):
        resolve(lookup, server.url("/lora.safetensors"))
    assert server.requests == []


def test_downloads_are_off_unless_the_endpoint_allows_them(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(LoraError, match=r"loras\[0\]\.name: .*downloading LoRAs is off .*ALLOW_LORA_DOWNLOAD=1"):
        resolve(resolver(tmp_path, allow_download=False), server.url("/lora.safetensors"))
    assert server.requests == []


def test_a_url_without_sha256_is_refused_naming_the_field_and_the_fix(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(LoraError) as refused:
        resolve(resolver(tmp_path), server.url("/lora.safetensors"), sha256=None)
    message = str(refused.value)
    assert message.startswith("lora: loras[0].sha256: required for a LoRA by URL: 127.0.0.1 is not a host")
    assert "(LORA_URL_HOSTS: none)" in message and 'add "sha256": "<64 hex digits>" to the LoRA entry' in message
    # An allow-listed host over plain http still needs the pin: only TLS shows who sent the bytes.
    with pytest.raises(LoraError, match=r"loras\[0\]\.sha256: required for .*only https URLs of trusted hosts"):
        resolve(resolver(tmp_path, url_hosts=frozenset({"127.0.0.1"})), server.url("/lora.safetensors"), None)
    assert server.requests == []


def test_a_hash_mismatch_deletes_the_download_and_names_both_hashes(server: FileServer, tmp_path: Path) -> None:
    wrong = "ab" * 32
    with pytest.raises(LoraError) as refused:
        resolve(resolver(tmp_path), server.url("/lora.safetensors"), wrong)
    message = str(refused.value)
    assert message.startswith(f"lora: loras[0].sha256: the file at {server.url('/lora.safetensors')} has sha256")
    assert f"has sha256 {DIGEST}, not {wrong}" in message and "The download was deleted" in message
    assert cache_files(tmp_path) == []
    # The right pin next: a fresh download from the first byte, the same bytes as the server's.
    assert resolve(resolver(tmp_path), server.url("/lora.safetensors")).path.read_bytes() == DATA
    assert [request.range for request in server.requests] == [None, None]


def test_an_interrupted_download_is_resumed_with_range_and_if_range(server: FileServer, tmp_path: Path) -> None:
    server.files["/lora.safetensors"].cut_first_at = 100_000
    with pytest.raises(LoraError, match=r"100,000 of 300,000 bytes are kept and the next attempt resumes"):
        resolve(resolver(tmp_path), server.url("/lora.safetensors"))
    source = resolve(resolver(tmp_path), server.url("/lora.safetensors"))
    assert source.path.read_bytes() == DATA
    first, second = server.requests
    assert (first.range, second.range) == (None, "bytes=100000-")
    assert second.if_range == server.files["/lora.safetensors"].etag
    assert cache_files(tmp_path) == [f"sha256/{DIGEST}.safetensors"]  # no partial or validator left


def test_a_file_changed_on_the_server_is_not_spliced_onto_the_old_part(server: FileServer, tmp_path: Path) -> None:
    served = server.files["/lora.safetensors"]
    served.cut_first_at = 100_000
    with pytest.raises(LoraError, match="bytes are kept"):
        resolve(resolver(tmp_path), server.url("/lora.safetensors"))
    served.data = DATA[::-1]  # a new version: another ETag, so the server answers If-Range with the whole file
    source = resolve(resolver(tmp_path), server.url("/lora.safetensors"), hashlib.sha256(DATA[::-1]).hexdigest())
    assert source.path.read_bytes() == DATA[::-1]
    assert server.requests[-1].range == "bytes=100000-"


def test_a_file_over_the_size_limit_is_refused_and_nothing_is_kept(server: FileServer, tmp_path: Path) -> None:
    big = os.urandom(1_100_000)
    server.files["/big.safetensors"] = Served(big)
    server.files["/big-unsized.safetensors"] = Served(big, send_length=False)
    lookup = resolver(tmp_path, url_max_mb=1)
    for path in ("/big.safetensors", "/big-unsized.safetensors"):
        with pytest.raises(LoraError, match=r"larger than the 1\.0 MB limit \(LORA_DOWNLOAD_MAX_MB\)"):
            resolve(lookup, server.url(path), hashlib.sha256(big).hexdigest())
        assert cache_files(tmp_path) == []


def test_a_redirect_to_a_private_address_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """127.0.0.2 plays a public server (no public server is reachable offline); it redirects to loopback."""
    real = url_fetch.non_public_reason
    monkeypatch.setattr(url_fetch, "non_public_reason", lambda a: None if str(a) == "127.0.0.2" else real(a))
    private, public = FileServer(), FileServer("127.0.0.2")
    try:
        private.files["/lora.safetensors"] = Served(DATA)
        public.files["/lora.safetensors"] = Served(DATA)
        public.files["/away"] = Served(b"", redirect=private.url("/lora.safetensors"))
        lookup = resolver(tmp_path, allow_private_urls=False)
        assert resolve(lookup, public.url("/lora.safetensors")).path.read_bytes() == DATA  # the public one works
        with pytest.raises(LoraError, match=r"\(redirected from .*/away\) points to 127\.0\.0\.1, a loopback"):
            resolve(lookup, public.url("/away"), hashlib.sha256(b"other").hexdigest())
        assert private.requests == []
    finally:
        private.close()
        public.close()


def test_one_deadline_covers_the_download_and_the_part_is_resumed(server: FileServer, tmp_path: Path) -> None:
    server.files["/slow.safetensors"] = Served(DATA, drip_s=0.02)  # 74 pieces: about 1.5 s in all
    lookup = resolver(tmp_path, url_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(LoraError) as refused:
        resolve(lookup, server.url("/slow.safetensors"))
    assert time.monotonic() - started < 0.5 + 1.0
    message = str(refused.value)
    assert "took longer than 0.5 s (LORA_DOWNLOAD_TIMEOUT_S); it stopped while reading the body" in message
    (part,) = (tmp_path / "downloads" / "partial").glob("*.partial")
    kept = part.read_bytes()
    assert 0 < len(kept) < len(DATA) and DATA.startswith(kept) and f"{len(kept):,} of 300,000 bytes are kept" in message
    server.files["/slow.safetensors"].drip_s = 0.0
    assert resolve(lookup, server.url("/slow.safetensors")).path.read_bytes() == DATA
    assert [request.range for request in server.requests] == [None, f"bytes={len(kept)}-"]


def test_two_workers_asking_at_once_download_once(server: FileServer, tmp_path: Path) -> None:
    server.files["/lora.safetensors"].delay_s = 0.5
    results: list[object] = []

    def job() -> None:
        try:
            results.append(resolve(resolver(tmp_path), server.url("/lora.safetensors")).path)
        except Exception as error:  # reported by the assertion below
            results.append(error)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 2 and results[0] == results[1], results
    assert len(server.requests) == 1


# -- an allow-listed host: https with a certificate for its name ---------------------------------------------------


@pytest.fixture
def https_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[str]]]:
    """``loras.test`` served over TLS from 127.0.0.1 with a certificate this test's client trusts; yields the
    base URL and the paths asked for."""
    with tls_https_host("loras.test", DATA, tmp_path, monkeypatch) as served:
        yield served


def test_an_allow_listed_https_host_needs_no_sha256(https_host: tuple[str, list[str]], tmp_path: Path) -> None:
    base, asked = https_host
    lookup = resolver(tmp_path, url_hosts=frozenset({"loras.test"}))
    source = resolve(lookup, f"{base}/styles/ink.safetensors?download=1", sha256=None)
    assert source.path.read_bytes() == DATA and source.path.name == f"{DIGEST}.safetensors"
    # The URL is remembered with the hash its file had: the next job makes no request.
    assert resolve(lookup, f"{base}/styles/ink.safetensors?download=1", sha256=None).path == source.path
    assert asked == ["/styles/ink.safetensors?download=1"]
    # Another host of the same server is not on the list.
    with pytest.raises(LoraError, match=r"loras\[0\]\.sha256: required for a LoRA by URL: localhost is not a host"):
        resolve(lookup, "https://localhost/x.safetensors", sha256=None)


def test_allow_listed_hosts_are_parsed_and_checked_by_the_settings() -> None:
    settings = load_settings({"LORA_URL_HOSTS": " HuggingFace.co, civitai.com ,"})
    assert LoraSettings.from_settings(settings).url_hosts == frozenset({"huggingface.co", "civitai.com"})
    with pytest.raises(Exception, match=r"LORA_URL_HOSTS='https://civitai.com' is invalid: .* host names only"):
        load_settings({"LORA_URL_HOSTS": "https://civitai.com"})


# -- the download function on its own (the checkpoint's path, which test_mb_fetch covers end to end) --------------


def test_a_416_answer_starts_the_download_over(server: FileServer, tmp_path: Path) -> None:
    partial = tmp_path / "x.partial"
    partial.write_bytes(DATA + b"extra")  # longer than the file: no range of it exists
    policy = UrlPolicy(allow_private=True, timeout_s=10, max_bytes=1 << 20)
    done = download_file(server.url("/lora.safetensors"), partial, policy, field="f")
    assert (done.sha256, partial.read_bytes()) == (DIGEST, DATA)
    assert [request.range for request in server.requests] == [f"bytes={len(DATA) + 5}-", None]


def test_a_consumer_error_is_not_taken_for_a_network_error(server: FileServer, tmp_path: Path) -> None:
    def refuse(name: str) -> None:
        raise PermissionError(f"no {name}")

    policy = UrlPolicy(allow_private=True, timeout_s=10, max_bytes=1 << 20)
    with pytest.raises(PermissionError, match=r"no lora\.safetensors"):
        download_file(server.url("/lora.safetensors"), tmp_path / "p", policy, field="f", before_body=refuse)
    with pytest.raises(UrlFetchError, match=r"f: .*answered HTTP 404"):
        download_file(server.url("/absent"), tmp_path / "p", policy, field="f")
