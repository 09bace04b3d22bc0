"""SIGKILL during conversion leaves no output folder or a complete one; two workers convert once.

One driver subprocess imports torch and diffusers once (the imports cost far more than converting
the dev model) and forks a fresh process per scenario. Each forked converter is killed with a
real SIGKILL: either by itself at a named stage of the conversion (``model_build.convert._stage``
is replaced in the fork), or by the driver after a delay. The driver then records what is on disk
(``verify --full`` for a folder that exists) and the tests assert on that record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = r"""
import json, os, signal, sys, time

import torch

torch.set_num_threads(1)
import model_build.convert as mc
from model_build.architectures import expected_checkpoint
from model_build.manifest import ModelFolderError, verify
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401 (for the forks)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

expected_checkpoint("dev_tiny")
spec = json.loads(sys.argv[1])
checkpoint, results_dir = spec["checkpoint"], spec["results_dir"]


def fork(run):
    pid = os.fork()
    if pid == 0:
        try:
            run()
        except BaseException as error:
            print(f"child error: {error!r}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    return pid


def outcome(status):
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"


def disk_state(output):
    parent = os.path.dirname(output)
    leftovers = sorted(name for name in os.listdir(parent) if name.startswith("."))
    if not os.path.exists(output):
        return {"output": "absent", "leftovers": leftovers}
    try:
        verify(output, full=True)
        return {"output": "complete", "leftovers": leftovers}
    except ModelFolderError as error:
        return {"output": f"broken: {error}", "leftovers": leftovers}


def convert(output, force=False, stage=None):
    if stage is not None:
        def at(name):
            if name == stage:
                os.kill(os.getpid(), signal.SIGKILL)
        mc._stage = at
    mc.convert(checkpoint, output, dtype="fp32", force=force)


def race(name, output, index):
    result = mc.ensure_converted(checkpoint, output, dtype="fp32", lock_timeout=300)
    with open(os.path.join(results_dir, f"{name}-{index}.json"), "w") as handle:
        json.dump({"converted": result.converted, "waited": result.lock_wait_seconds}, handle)


results = {}
for step in spec["steps"]:
    name, output, kind = step["name"], step["output"], step["kind"]
    os.makedirs(os.path.dirname(output), exist_ok=True)
    if kind == "kill_after":
        pid = fork(lambda: convert(output, step.get("force", False)))
        time.sleep(step["seconds"])
        os.kill(pid, signal.SIGKILL)
        statuses = [os.waitpid(pid, 0)[1]]
    elif kind == "race":
        pids = [fork(lambda index=index: race(name, output, index)) for index in range(2)]
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    else:
        pid = fork(lambda: convert(output, step.get("force", False), step.get("stage")))
        statuses = [os.waitpid(pid, 0)[1]]
    results[name] = {"outcome": [outcome(status) for status in statuses], **disk_state(output)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def crashes(dev_checkpoint: Path, dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("crashes")
    (base / "results").mkdir()
    shutil.copytree(dev_model_dir, base / "d" / "model")  # an existing conversion for --force to replace

    def out(name: str) -> str:
        return str(base / name / "model")

    steps = [
        {"name": "mid-save", "kind": "kill_at", "stage": "saved unet", "output": out("a")},
        {"name": "before-rename", "kind": "kill_at", "stage": "manifest written", "output": out("c")},
        {"name": "between-renames", "kind": "kill_at", "stage": "previous output moved aside", "output": out("d"),
         "force": True},
        {"name": "recover-between-renames", "kind": "convert", "output": out("d")},
        {"name": "after-rename", "kind": "kill_at", "stage": "renamed into place", "output": out("e")},
        {"name": "no-op-after-rename", "kind": "convert", "output": out("e")},
        {"name": "timed-kill", "kind": "kill_after", "seconds": 1.2, "output": out("f")},
        {"name": "race", "kind": "race", "output": out("g")},
    ]  # fmt: skip
    spec = {"checkpoint": str(dev_checkpoint), "results_dir": str(base / "results"), "steps": steps}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=480
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    results["racers"] = [json.loads((base / "results" / f"race-{i}.json").read_text()) for i in range(2)]
    return results


@pytest.mark.parametrize("name", ["mid-save", "before-rename"])
def test_killed_before_the_rename_leaves_no_output_folder(crashes: dict, name: str) -> None:
    record = crashes[name]
    assert record["outcome"] == ["signal 9"]
    assert record["output"] == "absent"
    assert [leftover.startswith(".model.converting-") for leftover in record["leftovers"]] == [True]


def test_killed_between_the_renames_of_force_leaves_no_folder_and_recovers(crashes: dict) -> None:
    killed = crashes["between-renames"]
    assert killed["outcome"] == ["signal 9"] and killed["output"] == "absent"
    recovered = crashes["recover-between-renames"]
    assert recovered == {"outcome": ["exit 0"], "output": "complete", "leftovers": []}  # leftovers removed


def test_killed_after_the_rename_leaves_a_complete_folder(crashes: dict) -> None:
    killed = crashes["after-rename"]
    assert killed["outcome"] == ["signal 9"] and killed["output"] == "complete"
    assert len(killed["leftovers"]) == 1  # its work folder; the next run, a no-op, removes it
    assert crashes["no-op-after-rename"] == {"outcome": ["exit 0"], "output": "complete", "leftovers": []}


def test_killed_at_an_arbitrary_moment_leaves_nothing_or_a_complete_folder(crashes: dict) -> None:
    record = crashes["timed-kill"]
    assert record["output"] in ("absent", "complete")
    assert record["outcome"] == ["signal 9"] or record["output"] == "complete"


def test_two_workers_starting_at_once_convert_once(crashes: dict) -> None:
    assert crashes["race"]["outcome"] == ["exit 0", "exit 0"]
    assert crashes["race"]["output"] == "complete" and crashes["race"]["leftovers"] == []
    converted = sorted(racer["converted"] for racer in crashes["racers"])
    assert converted == [False, True]
    waiter = next(racer for racer in crashes["racers"] if not racer["converted"])
    assert waiter["waited"] > 0.1  # it really waited for the other one's lock, then found the folder done
