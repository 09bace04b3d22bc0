"""``python -m batch``: usage and configuration errors exit with code 2 and a message, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch.cli import main
from batch.exit_codes import EXIT_OK, EXIT_USAGE


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": "a pier", "height": 256, "width": 256}) + "\n")
    return path


def test_usage_errors_exit_2(
    jobs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    out = str(tmp_path / "out")
    assert main(["run", str(jobs), "--out", out, "--num-shards", "4"]) == EXIT_USAGE
    assert "JOB_COMPLETION_INDEX" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.jsonl"), "--out", out]) == EXIT_USAGE
    assert "not found" in capsys.readouterr().err
    assert main(["run", str(jobs), "--out", out, "--shard", "4/4"]) == EXIT_USAGE
    assert main(["run", str(jobs), "--out", out, "--endpoint", "http://x", "--model", "m"]) == EXIT_USAGE
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(jobs)])  # argparse: --out is required
    assert exit_info.value.code == EXIT_USAGE
    assert main(["status", str(tmp_path / "nowhere")]) == EXIT_USAGE

    # No model: a clear message, the error-free lines stay remaining, nothing is marked failed.
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))
    assert main(["run", str(jobs), "--out", out, "--no-progress"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "no model" in captured.err and "Traceback" not in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["remaining"] == 1 and summary["failed"] == 0
    assert not list((tmp_path / "out" / "errors").iterdir())


def test_nothing_to_do_loads_no_model(jobs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every line invalid: the run finishes without looking for a model at all.
    jobs.write_text('{"prompt": ""}\n')
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))
    assert main(["run", str(jobs), "--out", str(tmp_path / "out"), "--no-progress"]) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["run", str(empty), "--out", str(tmp_path / "out2"), "--no-progress"]) == EXIT_OK
