"""``python -m batch``: usage and configuration errors exit with code 2 and a message, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from batch_testing import read_only

from batch.cli import main
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_OK, EXIT_USAGE


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
    assert main(["status", str(tmp_path)]) == EXIT_USAGE  # a folder no run wrote to
    assert "run.json is missing" in capsys.readouterr().err
    assert main(["--log-level", "chatty", "status", str(tmp_path)]) == EXIT_USAGE
    assert "LOG_LEVEL 'chatty'" in capsys.readouterr().err

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
    jobs.write_text('{"prompt": "x", "height": 100}\n')  # 100 is no multiple of 8
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))
    assert main(["run", str(jobs), "--out", str(tmp_path / "out"), "--no-progress"]) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["run", str(empty), "--out", str(tmp_path / "out2"), "--no-progress"]) == EXIT_OK


def error_lines(captured: str) -> list[str]:
    return [line for line in captured.splitlines() if line.startswith("error:")]


def test_output_folder_problems_are_configuration_errors(
    jobs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each is one clear line and exit code 2 (FailJob: no retry can fix it), never a traceback and exit 1."""
    # A file where the output folder should be.
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    assert main(["run", str(jobs), "--out", str(a_file), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"error: --out {a_file}: is a file, not a folder; give a folder (it is created if missing)"
    ]
    assert "Traceback" not in err

    # Under a file: no folder can be made there.
    assert main(["run", str(jobs), "--out", str(a_file / "out"), "--no-progress"]) == EXIT_USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert "cannot write there" in line and str(a_file) in line

    # A read-only folder, new or already holding a run's layout.
    for name, prepare in (("fresh", False), ("used", True)):
        folder = tmp_path / name
        folder.mkdir()
        if prepare:
            (folder / "_batch" / "tmp").mkdir(parents=True)
            (folder / "images").mkdir()
        with read_only(folder):
            assert main(["run", str(jobs), "--out", str(folder), "--no-progress"]) == EXIT_USAGE
        captured = capsys.readouterr()
        (line,) = error_lines(captured.err)
        assert "cannot write there" in line and "writable folder" in line, line
        assert "Traceback" not in captured.err and not captured.out  # no summary: nothing could be written

    # A claim that is stale the moment it is made.
    assert main(["run", str(jobs), "--out", str(tmp_path / "out"), "--claim-ttl", "0"]) == EXIT_USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: --claim-ttl 0: a claim needs a positive lifetime")

    # Not enough free space at the start (the real free space of this disk, asked for more than it has).
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    args = ["run", str(jobs), "--out", str(tmp_path / "full"), "--min-free-mb", str(free_mb * 2 + 1)]
    assert main(args) == EXIT_USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert "MiB free, the run needs at least" in line and "--min-free-mb" in line


def test_merge_and_status_on_a_read_only_folder(
    jobs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    jobs.write_text('{"prompt": "x", "height": 100}\n')  # invalid (100 is no multiple of 8): no model is loaded
    out = tmp_path / "out"
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))
    assert main(["run", str(jobs), "--out", str(out), "--no-progress"]) == EXIT_INVALID_LINES
    capsys.readouterr()
    with read_only(out):
        assert main(["status", str(out)]) == EXIT_OK  # reading needs no write access
        assert main(["merge", str(out)]) == EXIT_USAGE
        captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith(f"error: cannot write {out / 'metadata.jsonl'}") and "writable" in line
    assert "Traceback" not in captured.err
    assert main(["merge", str(out)]) == EXIT_OK  # writable again
    assert (out / "metadata.jsonl").read_text() == ""
