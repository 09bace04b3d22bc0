"""Embeddings by URL (the request's ``embeddings`` entries): through the handler and the batch runner on the dev model,
and the download rules on their own.

The reference for an entry's image is the same file put under EMBEDDINGS_DIR and named in the prompt (that path is
compared with diffusers' own loader in test_embeddings.py): a word given by URL must make the image, byte for byte,
that the file of the same vectors makes from the folder. The files are served by a real HTTP server on 127.0.0.1
(ALLOW_PRIVATE_URLS=1 lets the worker reach it; the default's refusal is tested below), and an allow-listed host by
a TLS server whose certificate the test's client trusts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from core.errors import EmbeddingFailed, InvalidRequest
from core.settings import load_settings
from model_build.dev_embedding import model_widths, write_dev_embedding
from tests.support.file_server import FileServer, Served
from tests.support.tls import https_host
from worker.adapters.embeddings.urls import download_requested, embedding_downloads
from worker.request.embeddings import EmbeddingUrl
from worker.request.schema import parse_request

JOB = {"prompt": "a lighthouse at dawn", "height": 128, "width": 128, "num_inference_steps": 2, "seed": 7}


def pixels(out: dict[str, Any]) -> bytes:
    assert "error" not in out, out
    png = base64.b64decode(out["images"][0].split(",", 1)[1])
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


@pytest.fixture(scope="module")
def setup(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from worker.generation.engine import Engine
    from worker.handler import Worker

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the same rounding in every job compared byte for byte
    root = tmp_path_factory.mktemp("embedding-urls")
    widths = model_widths(dev_model_dir)
    folder = root / "embeddings"
    style = write_dev_embedding(folder / "dev-style.safetensors", widths, vectors=4, seed=1)
    one = write_dev_embedding(folder / "OneVec.safetensors", widths, vectors=1, seed=2)
    sd15 = write_dev_embedding(root / "elsewhere" / "sd15.safetensors", sd15=True)
    settings = load_settings(
        {
            "EMBEDDINGS_DIR": str(folder),
            "ALLOW_LORA_DOWNLOAD": "1",
            "ALLOW_PRIVATE_URLS": "1",
            "LORA_DOWNLOAD_DIR": str(root / "downloads"),
        }
    )
    engine = Engine(dev_model_dir, settings=settings)
    worker = Worker(settings)
    worker.engine, worker.startup_error = engine, None
    server = FileServer()
    state = SimpleNamespace(root=root, engine=engine, handle=worker.handle, server=server, files={})
    state.fresh = pixels(state.handle({"id": "fresh", "input": JOB}))
    for key, path in (("style", style), ("one", one), ("sd15", sd15)):
        data = path.read_bytes()
        server.files[f"/files/{key}.safetensors"] = Served(data)
        state.files[key] = SimpleNamespace(
            data=data, sha256=hashlib.sha256(data).hexdigest(), url=server.url(f"/files/{key}.safetensors?token=SECRET")
        )
    yield state
    server.close()
    torch.set_num_threads(previous)


def job(setup: SimpleNamespace, prompt: str, **entries: str) -> dict[str, Any]:
    """A job whose ``entries`` give words by URL (word -> served file key), pinned by sha256."""
    given = [
        {"name": word, "url": setup.files[key].url, "sha256": setup.files[key].sha256} for word, key in entries.items()
    ]
    return {**JOB, "prompt": prompt, "embeddings": given}


def test_a_word_by_url_gives_the_folder_files_image_byte_for_byte(setup: SimpleNamespace) -> None:
    local = pixels(setup.handle({"id": "local", "input": {**JOB, "prompt": "a lighthouse at dawn, dev-style"}}))
    assert local != setup.fresh
    out = setup.handle({"id": "url", "input": job(setup, "a lighthouse at dawn, (remote)", remote="style")})
    assert pixels(out) == pixels(
        setup.handle({"id": "w", "input": {**JOB, "prompt": "a lighthouse at dawn, (dev-style)"}})
    )
    (entry,) = out["metadata"]["embeddings"]
    style = setup.files["style"]
    cached = setup.root / "downloads" / "sha256" / f"{style.sha256}.safetensors"
    assert entry == {
        "name": "remote",
        "path": str(cached),
        "sha256": style.sha256,
        "vectors": 4,
        "url": setup.server.url("/files/style.safetensors?..."),
    }
    assert cached.read_bytes() == style.data and "SECRET" not in json.dumps(out["metadata"])
    # Another URL of the same file, under another word: from the cache, no request; and embedding:word works.
    requests = len(setup.server.requests)
    other = {"name": "again", "url": setup.server.url("/mirror.safetensors", host="localhost"), "sha256": style.sha256}
    again = setup.handle(
        {"id": "again", "input": {**JOB, "prompt": "a lighthouse at dawn, embedding:again", "embeddings": [other]}}
    )
    assert pixels(again) == local and len(setup.server.requests) == requests
    assert pixels(setup.handle({"id": "plain", "input": JOB})) == setup.fresh


def test_a_word_means_this_requests_file_and_takes_precedence_over_the_folders(setup: SimpleNamespace) -> None:
    one_local = pixels(setup.handle({"id": "one", "input": {**JOB, "prompt": "a lighthouse at dawn, onevec"}}))
    style_local = pixels(setup.handle({"id": "style", "input": {**JOB, "prompt": "a lighthouse at dawn, dev-style"}}))
    # The same text, three meanings: the prompt cache must not hand one request's encoding to another.
    by_url = pixels(
        setup.handle({"id": "swap", "input": job(setup, "a lighthouse at dawn, dev-style", **{"dev-style": "one"})})
    )
    assert by_url == one_local
    assert (
        pixels(setup.handle({"id": "style-again", "input": {**JOB, "prompt": "a lighthouse at dawn, dev-style"}}))
        == style_local
    )
    word = pixels(setup.handle({"id": "word-one", "input": job(setup, "a lighthouse at dawn, word", word="one")}))
    assert word == one_local
    assert (
        pixels(setup.handle({"id": "word-style", "input": job(setup, "a lighthouse at dawn, word", word="style")}))
        == style_local
    )


def test_refusals_name_the_field_and_the_next_job_is_a_fresh_workers(setup: SimpleNamespace) -> None:
    def error(prompt: str, entry: dict[str, Any]) -> str:
        out = setup.handle({"id": "bad", "input": {**JOB, "prompt": prompt, "embeddings": [entry]}})
        assert set(out) == {"error"}, out
        return out["error"]

    style = setup.files["style"]
    unpinned = error("a word", {"name": "word", "url": setup.server.url("/files/style.safetensors")})
    assert unpinned.startswith("embedding: embeddings[0].sha256: required for an embedding by URL: 127.0.0.1 is not")
    assert "LORA_URL_HOSTS" in unpinned
    wrong = "0" * 64
    mismatch = error(
        "a word", {"name": "word", "url": setup.server.url("/files/style.safetensors?v=2"), "sha256": wrong}
    )
    assert mismatch.startswith("embedding: embeddings[0].sha256: the file at ")
    assert f"has sha256 {style.sha256}, not {wrong}" in mismatch
    sd15 = setup.files["sd15"]
    old = error("a word", {"name": "word", "url": sd15.url, "sha256": sd15.sha256})
    assert old.startswith(f"embedding: embeddings[0].url ({setup.server.url('/files/sd15.safetensors?...')}): 'word'")
    assert "an SD 1.x embedding" in old and "clip_l and clip_g" in old
    requests = len(setup.server.requests)
    never = {"name": "word", "url": setup.server.url("/files/never.safetensors"), "sha256": "1" * 64}
    unused = error("a wordy lighthouse", never)  # checked before downloading: no request
    assert unused.startswith("embedding: embeddings[0].name: no prompt of this job names 'word' as a word of its own")
    assert len(setup.server.requests) == requests
    assert pixels(setup.handle({"id": "after", "input": JOB})) == setup.fresh


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{"name": "(x)", "url": "https://e.test/x.safetensors"}], "embeddings.0.name: the word prompts use"),
        ([{"name": "x", "url": "ftp://e.test/x.safetensors"}], "embeddings.0.url: an http(s) URL"),
        ([{"name": "x", "url": "https://e.test/x", "sha256": "abc"}], "embeddings.0.sha256: 'abc' is not a sha256"),
        ([{"name": "x", "url": "https://e.test/x", "scale": 1}], "embeddings.0.scale: unknown field"),
        ([{"name": "X", "url": "https://e.test/1"}, {"name": "x", "url": "https://e.test/2"}], "given more than once"),
    ],
)
def test_the_schema_refuses_malformed_entries(entries: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "x", "embeddings": entries})
    assert expected in str(caught.value), str(caught.value)


def test_the_batch_runner_makes_the_same_images(setup: SimpleNamespace, tmp_path: Path) -> None:
    from batch.execute import run_shard
    from batch.options import LocalEngineOptions, RunOptions

    lines = [
        {"id": "by-url", **job(setup, "a lighthouse at dawn, remote", remote="style")},
        {"id": "by-name", **JOB, "prompt": "a lighthouse at dawn, dev-style"},
        {"id": "plain", **JOB},
    ]
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    summary = run_shard(
        RunOptions(source, out, progress=False), LocalEngineOptions(encode_workers=0, engine=setup.engine)
    )
    assert (summary.made, summary.failed) == (3, 0), summary
    made = {}
    for item in ("by-url", "by-name", "plain"):
        sidecar = json.loads((out / f"{item}.json").read_bytes())
        made[item] = Image.open(out / sidecar["images"][0]["file_name"]).convert("RGB").tobytes()
        if item == "by-url":
            assert [entry["name"] for entry in sidecar["metadata"]["embeddings"]] == ["remote"]
    assert made["by-url"] == made["by-name"] != made["plain"]
    assert made["plain"] == setup.fresh


# -- the download rules, without a model -------------------------------------------------------------------------


def downloads(tmp_path: Path, **env: str):
    return embedding_downloads(load_settings({"LORA_DOWNLOAD_DIR": str(tmp_path / "downloads"), **env}))


def entry(url: str, sha256: str | None = None) -> EmbeddingUrl:
    return EmbeddingUrl(name="word", url=url, sha256=sha256)


def test_downloads_are_off_unless_the_endpoint_allows_them(tmp_path: Path) -> None:
    with pytest.raises(
        EmbeddingFailed, match=r"embeddings\[0\]\.url: .*downloading embeddings is off .*ALLOW_LORA_DOWNLOAD=1"
    ):
        download_requested([entry("https://e.test/x.safetensors", "0" * 64)], downloads(tmp_path), "put it there")


def test_the_default_refuses_a_loopback_address(tmp_path: Path) -> None:
    server = FileServer()
    try:
        server.files["/x.safetensors"] = Served(b"x")
        rules = downloads(tmp_path, ALLOW_LORA_DOWNLOAD="1")
        with pytest.raises(EmbeddingFailed, match=r"embeddings\[0\]\.url: .* points to 127\.0\.0\.1, a loopback"):
            download_requested([entry(server.url("/x.safetensors"), hashlib.sha256(b"x").hexdigest())], rules, "")
        assert server.requests == []
    finally:
        server.close()


def test_a_file_larger_than_an_embedding_is_never_downloaded_whole(tmp_path: Path) -> None:
    big = b"\0" * ((16 << 20) + 1)
    server = FileServer()
    try:
        server.files["/big.safetensors"] = Served(big)
        rules = downloads(tmp_path, ALLOW_LORA_DOWNLOAD="1", ALLOW_PRIVATE_URLS="1")
        with pytest.raises(EmbeddingFailed, match=r"embeddings\[0\]\.url: .*larger than the 16\.8 MB limit"):
            download_requested([entry(server.url("/big.safetensors"), hashlib.sha256(big).hexdigest())], rules, "")
    finally:
        server.close()


def test_an_allow_listed_https_host_needs_no_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"stands for an embedding: the download never reads it"
    rules = downloads(tmp_path, ALLOW_LORA_DOWNLOAD="1", LORA_URL_HOSTS="embeddings.test", ALLOW_PRIVATE_URLS="1")
    with https_host("embeddings.test", data, tmp_path, monkeypatch) as (base, asked):
        (found,) = download_requested([entry(f"{base}/neg/xl.safetensors?download=1")], rules, "")
        assert found.path.read_bytes() == data
        assert found.path.name == f"{hashlib.sha256(data).hexdigest()}.safetensors" and found.key == "word"
        assert asked == ["/neg/xl.safetensors?download=1"]
        with pytest.raises(
            EmbeddingFailed, match=r"embeddings\[0\]\.sha256: required for .*without a sha256 only https"
        ):
            download_requested([entry(base.replace("https", "http") + "/neg/xl.safetensors")], rules, "")
