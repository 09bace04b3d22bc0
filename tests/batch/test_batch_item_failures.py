"""One line's failure is that line's: it gets an error file and the shard goes on. And after the JSONL is edited
between runs, errors/, ``status`` and ``merge`` describe the file as it is now. In process, on the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_testing import SMALL, jsonl_rows, one_torch_thread, read_json, sidecars, write_jsonl

import batch.encoding
from batch.cli import main
from batch.execute import run_shard
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_OK, EXIT_RETRIABLE
from batch.options import LocalEngineOptions, RunOptions
from batch.report import merge, run_status


@pytest.fixture(scope="module")
def engine(dev_model_dir: Path):
    from worker.generation.engine import Engine

    return Engine(dev_model_dir)


def fail_encoding(monkeypatch: pytest.MonkeyPatch, marker: str, error: Exception):
    """Encoding raises ``error`` for the images whose embedded parameters contain ``marker``; returns the real
    encoder. Needs encode_workers=0: the fault lives in this process."""
    real_encode = batch.encoding.encode_image

    def encode_image(image, output_format, quality, seed, parameters=None):
        if parameters and marker in parameters:
            raise error
        return real_encode(image, output_format, quality, seed, parameters)

    monkeypatch.setattr(batch.encoding, "encode_image", encode_image)
    return real_encode


def test_an_image_that_cannot_be_encoded_fails_its_line_not_the_shard(
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [{"id": f"item-{n}", "prompt": f"a quay, view {n}", **SMALL, "seed": n} for n in range(5)]
    lines[1]["output_format"] = "jpeg"
    lines[1]["prompt"] = "the line whose image cannot be encoded"
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    options = RunOptions(source, tmp_path / "out", progress=False)
    # encode_workers=0 encodes in this process, where the fault is injected: Pillow's own error for EXIF over
    # 64 KiB, raised for the one image whose embedded parameters name that line (issue 13: it stopped the shard).
    local = LocalEngineOptions(batch_size=2, encode_workers=0, engine=engine)
    real_encode = fail_encoding(monkeypatch, "cannot be encoded", ValueError("EXIF data is too long"))
    with one_torch_thread():
        summary = run_shard(options, local)
    # Every other line was made, after the failing one too; the failure is retriable (exit 1: a retry makes only it).
    assert summary.made == 4 and summary.failed_retriable == 1 and summary.remaining == 0, summary
    assert summary.exit_code == EXIT_RETRIABLE and summary.stopped is None
    assert set(sidecars(tmp_path / "out")) == {"item-0", "item-2", "item-3", "item-4"}
    error = read_json(tmp_path / "out" / "errors" / "line-00000002.json")
    assert error["id"] == "item-1" and error["code"] == "internal error" and error["retriable"] is True
    assert "EXIF data is too long" in error["error"] and "Traceback" not in error["error"]

    monkeypatch.setattr(batch.encoding, "encode_image", real_encode)
    with one_torch_thread():
        summary = run_shard(options, local)
    assert summary.exit_code == EXIT_OK and summary.made == 1 and summary.already_done == 4
    assert not (tmp_path / "out" / "errors" / "line-00000002.json").exists()


def test_a_line_that_fails_every_run_is_given_up_after_three_attempts_not_retried_forever(
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: an internal error in one line is retriable, so a Kubernetes index retried it forever (exit 1)."""
    lines = [{"id": f"item-{n}", "prompt": f"a lock gate, view {n}", **SMALL, "seed": n} for n in range(3)]
    lines[1]["prompt"] = "the line that always breaks"
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    options = RunOptions(source, tmp_path / "out", progress=False)
    local = LocalEngineOptions(batch_size=1, encode_workers=0, engine=engine)
    real_encode = fail_encoding(monkeypatch, "always breaks", RuntimeError("a bug this line hits every time"))
    error_file = tmp_path / "out" / "errors" / "line-00000002.json"
    codes, attempts = [], []
    for _ in range(3):
        with one_torch_thread():
            codes.append(run_shard(options, local).exit_code)
        record = read_json(error_file)
        attempts.append((record["attempts"], record["code"], record["retriable"]))
    assert codes == [EXIT_RETRIABLE, EXIT_RETRIABLE, EXIT_INVALID_LINES]  # 3: final for the index (podFailurePolicy)
    assert attempts == [(1, "internal error", True), (2, "internal error", True), (3, "gave up", False)]
    assert "failed on 3 attempts" in record["error"] and "a bug this line hits every time" in record["error"]

    monkeypatch.setattr(batch.encoding, "encode_image", real_encode)  # the cause fixed: a run tries it once more
    with one_torch_thread():
        summary = run_shard(options, local)
    assert summary.exit_code == EXIT_OK and summary.made == 1 and not error_file.exists()


def test_status_and_merge_describe_the_edited_input(engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 13: a 9-line file shrunk to 6 lines (one changed under its id) left a stale error file, ``status``
    said done 6 / failed 0 while the run exited 3, and ``merge`` emitted 9 items with repeated line numbers."""
    lines: list = [{"id": f"item-{n}", "prompt": f"a mill, view {n}", **SMALL, "seed": n} for n in range(9)]
    lines[7] = {"id": "bad", "prompt": "too small", "height": 100}  # line 8: invalid
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    options = RunOptions(source, out, progress=False)
    local = LocalEngineOptions(batch_size=4, engine=engine)
    with one_torch_thread():
        first = run_shard(options, local)
    assert first.exit_code == EXIT_INVALID_LINES and first.made == 8
    assert (out / "errors" / "line-00000008.json").exists()

    # Edited: lines 8 and 9 removed, line 1 removed (the rest move up one), item-3 changed under its used id.
    edited = [lines[n] for n in (1, 2, 3, 4, 5, 6)]
    edited[2] = {**lines[3], "prompt": "a mill at night"}
    write_jsonl(source, edited)
    with one_torch_thread():
        second = run_shard(options, local)
    assert second.exit_code == EXIT_INVALID_LINES and second.made == 0 and second.invalid_lines == 1
    # The only error file is the changed line's, at its current number; line 8 no longer exists.
    assert sorted(path.name for path in (out / "errors").iterdir()) == ["line-00000003.json"]
    assert read_json(out / "errors" / "line-00000003.json")["kind"] == "changed_line"

    status = run_status(out)
    assert status["total"] == {"shard": "total", "lines": 6, "done": 5, "failed": 1, "running": 0, "remaining": 0}
    assert main(["status", str(out)]) == EXIT_OK
    assert "total" in capsys.readouterr().out

    result = merge(out)
    rows = jsonl_rows(out / "metadata.jsonl")
    assert result["items"] == 5 and result["not_in_input"] == 3  # item-0 and item-8 removed, item-3 changed
    assert [(row["line"], row["id"]) for row in rows] == [
        (1, "item-1"),
        (2, "item-2"),
        (4, "item-4"),
        (5, "item-5"),
        (6, "item-6"),
    ]
    # The shard's own metadata file says the same (current lines, no removed items).
    shard_rows = jsonl_rows(out / "_batch" / "shards" / "metadata-00000-of-00001.jsonl")
    assert sorted((row["line"], row["id"]) for row in shard_rows) == [(row["line"], row["id"]) for row in rows]

    # Fixing the changed line (a new id) makes it; then every current line is done.
    edited[2] = {**edited[2], "id": "item-3-night"}
    write_jsonl(source, edited)
    with one_torch_thread():
        third = run_shard(options, local)
    assert third.exit_code == EXIT_OK and third.made == 1
    assert not list((out / "errors").iterdir())
    assert run_status(out)["total"]["done"] == 6
    assert [row["line"] for row in jsonl_rows(Path(merge(out)["metadata"]))] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "_batch" / "run.json").read_text())["input"] == str(source.resolve())


def test_a_failing_call_is_judged_by_its_kind(engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults injected into the engine's call, by request: a bug hit by one request fails that line only (its batch
    mate is found innocent by running alone); out of memory fails the call's lines as retriable and the shard goes
    on; a CUDA error other than out-of-memory stops the shard (the context is unusable), leaving the rest for a
    retry."""
    import torch

    faults = {
        "poison": ValueError("a bug only this request hits"),
        "too big": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "broken device": RuntimeError("CUDA error: an illegal memory access was encountered"),
    }
    real_generate_group = engine.generate_group
    calls = []

    def generate_group(requests, *args, **kwargs):
        calls.append([request.prompt for request in requests])
        for request in requests:
            for word, fault in faults.items():
                if word in request.prompt:
                    raise fault
        return real_generate_group(requests, *args, **kwargs)

    monkeypatch.setattr(engine, "generate_group", generate_group)

    # Two lines per call: the poisoned line shares its call with a barn; run alone, the barn is made.
    lines = [{"id": f"mate-{n}", "prompt": prompt, **SMALL, "seed": n} for n, prompt in enumerate(["a barn", "poison"])]
    source = write_jsonl(tmp_path / "pair.jsonl", lines)
    with one_torch_thread():
        summary = run_shard(
            RunOptions(source, tmp_path / "pair", progress=False), LocalEngineOptions(batch_size=2, engine=engine)
        )
    # Shared, then each alone (padded to the same shape).
    assert calls == [["a barn", "poison"], ["a barn", "a barn"], ["poison", "poison"]]
    assert set(sidecars(tmp_path / "pair")) == {"mate-0"} and summary.failed_retriable == 1
    assert read_json(tmp_path / "pair" / "errors" / "line-00000002.json")["code"] == "internal error"

    prompts = ["a barn", "poison", "a silo", "too big", "a field", "broken device", "a fence", "a gate"]
    lines = [{"id": f"item-{n}", "prompt": prompt, **SMALL, "seed": n} for n, prompt in enumerate(prompts)]
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    with one_torch_thread():
        summary = run_shard(RunOptions(source, tmp_path / "out", progress=False), LocalEngineOptions(engine=engine))

    errors = {path.name: read_json(path) for path in (tmp_path / "out" / "errors").iterdir()}
    assert {name: (error["code"], error["retriable"]) for name, error in errors.items()} == {
        "line-00000002.json": ("internal error", True),
        "line-00000004.json": ("out of GPU memory", True),
        "line-00000006.json": ("CUDA error", True),
    }
    assert "lower --batch-size" in errors["line-00000004.json"]["error"]
    # Made: the lines before the CUDA error; stopped there.
    assert set(sidecars(tmp_path / "out")) == {"item-0", "item-2", "item-4"}
    assert summary.exit_code == EXIT_RETRIABLE and "device looks unusable" in summary.stopped
    assert summary.remaining == 2 and summary.failed_retriable == 3
