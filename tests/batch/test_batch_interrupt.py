"""Ctrl-C in a real `python -m batch run` (issue 22): once, the call in flight is finished and written, the summary
says how to resume, and no claim is left; twice, it stops at once, cleanly. Then a resume makes the rest."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from batch_testing import SMALL, finish, leftovers, run, spawn, write_jsonl

from batch.exit_codes import EXIT_INTERRUPTED, EXIT_OK

LINES = [
    {"id": f"pier-{n}", "prompt": f"a pier, view {n}", **SMALL, "num_inference_steps": 12, "seed": n} for n in range(6)
]


def made(out: Path) -> int:
    return len(list(out.glob("*.json")))


def start_and_wait_for_an_item(source: Path, out: Path, dev_model_dir: Path):
    """A run that has made one more item than ``out`` held: it is then generating the next call."""
    before = made(out)
    process = spawn("run", source, "--out", out, "--model", dev_model_dir, "--no-progress")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if made(out) > before:
            return process
        time.sleep(0.02)
    raise AssertionError(f"the run made nothing: {process.poll()} {finish(process)[2][-2000:]}")


def test_ctrl_c_once_finishes_the_call_in_flight_then_ctrl_c_twice_stops_at_once(
    dev_model_dir: Path, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "jobs.jsonl", LINES)
    out = tmp_path / "out"

    process = start_and_wait_for_an_item(source, out, dev_model_dir)
    process.send_signal(signal.SIGINT)
    code, summary, stderr = finish(process)
    assert code == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert summary is not None and summary["exit_code"] == EXIT_INTERRUPTED
    assert summary["stopped"].startswith("Ctrl-C: finishing the call in flight") and summary["made"] >= 1
    assert made(out) == summary["made"] < len(LINES) and summary["remaining"] == len(LINES) - summary["made"]
    assert "run the same command again to resume" in stderr
    assert leftovers(out) == []  # the call in flight was written and its claims released
    first = summary["made"]

    process = start_and_wait_for_an_item(source, out, dev_model_dir)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code, summary, stderr = finish(process)
    assert code == EXIT_INTERRUPTED and "Traceback" not in stderr, stderr[-3000:]
    assert summary is not None and summary["stopped"].startswith(("Ctrl-C twice", "Ctrl-C: finishing")), summary
    assert leftovers(out) == []  # even stopped at once: no claim a resume would have to wait out
    assert made(out) >= first

    code, summary, stderr = run("run", source, "--out", out, "--model", dev_model_dir, "--no-progress")
    assert code == EXIT_OK, stderr[-3000:]
    assert made(out) == len(LINES) and summary["already_done"] + summary["made"] == len(LINES)
    assert not any(path.name.startswith(".") for path in out.iterdir() if path.is_file()), os.listdir(out)
