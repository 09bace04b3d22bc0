"""Real ``python -m batch run`` processes on the dev model: a 50-line sharded run, SIGKILL and resume, two runners
on one shard, bad and torn lines. No mocks: real processes, real files, the real engine."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from batch_testing import (
    fifty_lines,
    finish,
    image_files,
    jsonl_rows,
    leftovers,
    one_torch_thread,
    read_json,
    run,
    sidecars,
    spawn,
    stable,
    write_jsonl,
)

from batch.cli import main
from batch.execute import run_shard
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_OK, EXIT_STOPPED
from batch.options import LocalEngineOptions, RunOptions
from worker.output.images import read_parameters

BATCH_SIZE = 4


@dataclass
class Reference:
    lines: list[dict[str, Any]]
    out: Path
    sidecars: dict[str, dict[str, Any]]
    images: dict[str, bytes]
    results: list[tuple[int, dict[str, Any] | None, str]]


@pytest.fixture(scope="module")
def reference(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run: 50 lines as 2 shards of an Indexed Job, both shards at once."""
    folder = tmp_path_factory.mktemp("batch-reference")
    lines = fifty_lines()
    source = write_jsonl(folder / "jobs.jsonl", lines)
    out = folder / "out"
    args = ("run", source, "--out", out, "--num-shards", 2, "--batch-size", BATCH_SIZE, "--model", dev_model_dir)
    processes = [spawn(*args, env={"JOB_COMPLETION_INDEX": str(index)}) for index in (0, 1)]
    results = [finish(process) for process in processes]
    return Reference(lines, out, sidecars(out), image_files(out), results)


def expected_ids(reference: Reference, lines: Collection[int]) -> set[str]:
    return {sidecar["id"] for sidecar in reference.sidecars.values() if sidecar["line"] in lines}


def assert_matches_reference(out: Path, reference: Reference, ids: set[str]) -> None:
    """Exactly the items ``ids``, each sidecar and image byte-identical to the uninterrupted run."""
    made = sidecars(out)
    assert set(made) == ids
    for item_id in ids:
        assert stable(made[item_id]) == stable(reference.sidecars[item_id]), item_id
    names = {image["file_name"] for item_id in ids for image in reference.sidecars[item_id]["images"]}
    images = image_files(out)
    assert set(images) == names  # no orphan or duplicate image
    for name in names:
        assert images[name] == reference.images[name], name


def test_fifty_line_run_in_two_shards(reference: Reference, capsys: pytest.CaptureFixture) -> None:
    for code, summary, stderr in reference.results:
        assert code == EXIT_OK, stderr[-3000:]
        assert summary["failed"] == summary["invalid_lines"] == summary["remaining"] == 0
        assert "images/s" in stderr  # the closing summary for people
    summaries = [summary for _, summary, _ in reference.results]
    assert sum(summary["made"] for summary in summaries) == 50
    assert {summary["shard"] for summary in summaries} == {"0/2", "1/2"}
    # Same-shaped requests shared calls: far fewer calls than images.
    images = sum(line.get("num_images", 1) for line in reference.lines)
    assert sum(summary["images"] for summary in summaries) == images
    assert sum(summary["pipeline_calls"] for summary in summaries) < images / 2

    out = reference.out
    assert len(reference.sidecars) == 50 and len(reference.images) == images
    assert leftovers(out) == []
    for sidecar in reference.sidecars.values():
        line = reference.lines[sidecar["line"] - 1]
        assert sidecar["request"]["prompt"] == line["prompt"]
        assert sidecar["id"] == line.get("id", sidecar["id"])
        assert sidecar["seed"] == line.get("seed", sidecar["seed"])
        assert sidecar["seed_source"] == ("line" if "seed" in line else "derived from id")
        assert [image["seed"] for image in sidecar["images"]] == [
            sidecar["seed"] + k for k in range(line.get("num_images", 1))
        ]
        for image in sidecar["images"]:
            data = reference.images[image["file_name"]]
            assert image["size"] == len(data)
            assert f"Seed: {image['seed']}" in read_parameters(data)  # A1111 parameters, as the worker writes

    # Per-shard imagefolder metadata: one row per image of that shard.
    for index in (0, 1):
        rows = jsonl_rows(out / "_batch" / "shards" / f"metadata-{index:05d}-of-00002.jsonl")
        assert len(rows) == len({row["file_name"] for row in rows})
        assert {(row["line"] - 1) % 2 for row in rows} == {index}

    assert main(["status", str(out)]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["total"] == {"shard": "total", "lines": 50, "done": 50, "failed": 0, "running": 0, "remaining": 0}
    assert [shard["done"] for shard in status["shards"]] == [25, 25]

    assert main(["merge", str(out)]) == 0
    rows = jsonl_rows(out / "metadata.jsonl")
    order = [(row["line"], row["id"], row["image_index"]) for row in rows]
    assert order == sorted(order)  # the whole run, in line order
    assert {row["file_name"] for row in rows} == set(reference.images)
    assert len(rows) == images and len({tuple(sorted(row)) for row in rows}) == 1  # one schema
    assert all((out / row["file_name"]).is_file() for row in rows)


def count_outputs(out: Path) -> int:
    images = out / "images"
    return (len(os.listdir(images)) if images.is_dir() else 0) + len(list(out.glob("*.json")))


def test_sigkill_at_random_points_then_resume(reference: Reference, dev_model_dir: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("BATCH_KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    lines = reference.lines[:16]
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    args = ("run", source, "--out", out, "--batch-size", BATCH_SIZE, "--model", dev_model_dir, "--no-progress")
    kills = []
    # SIGKILL during start-up or the first writes; SIGTERM (a pod deleted: graceful); SIGKILL mid-run.
    for cycle, kill in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)):
        process = spawn(*args)
        before = count_outputs(out)
        if cycle == 0:
            time.sleep(rng.uniform(0.5, 3.0))  # anywhere from start-up to the first writes
        else:
            while process.poll() is None and count_outputs(out) <= before:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.8))  # mid-generation or mid-write
        if process.poll() is not None:
            break
        process.send_signal(kill)
        _, stderr = process.communicate()
        if kill == signal.SIGTERM:
            # The call in flight is finished and written, then the claims are released: exit 143, retriable.
            assert process.returncode in (EXIT_STOPPED, EXIT_OK), f"seed {seed}\n{stderr[-3000:]}"
            assert leftovers(out) == []
        kills.append(count_outputs(out))
    assert kills, f"the runs finished before any kill (seed {seed})"

    # Damage that a crash on a lossy filesystem could leave: a truncated image and a torn sidecar of done items.
    done = sorted(out.glob("*.json"))
    if len(done) >= 2:
        first = read_json(done[0])
        (out / first["images"][0]["file_name"]).write_bytes(b"\x89PNG truncated")
        done[1].write_bytes(done[1].read_bytes()[:50])

    code, summary, stderr = run(*args)
    assert code == EXIT_OK, f"seed {seed}\n{stderr[-3000:]}"
    assert summary["remaining"] == summary["failed"] == 0
    assert_matches_reference(out, reference, expected_ids(reference, range(1, 17)))
    rows = jsonl_rows(out / "_batch" / "shards" / "metadata-00000-of-00001.jsonl")
    names = [row["file_name"] for row in rows]
    assert (
        sorted(names)
        == sorted(set(names))
        == sorted(image["file_name"] for item in sidecars(out).values() for image in item["images"])
    )
    assert leftovers(out) == []


def test_two_runners_on_one_shard_make_each_item_once(
    reference: Reference, dev_model_dir: Path, tmp_path: Path
) -> None:
    # Blank lines keep the numbering, so these are lines 17..28 of the reference, with their line numbers.
    source = write_jsonl(tmp_path / "jobs.jsonl", [None] * 16 + reference.lines[16:28])
    out = tmp_path / "out"
    args = ("run", source, "--out", out, "--shard", "0/1", "--batch-size", BATCH_SIZE, "--model", dev_model_dir)
    first, second = spawn(*args), spawn(*args)
    results = [finish(first), finish(second)]
    for code, summary, stderr in results:
        assert code == EXIT_OK, stderr[-3000:]
        assert summary["remaining"] == summary["failed"] == 0
    # Each item was generated by exactly one of the two processes.
    assert sum(summary["made"] for _, summary, _ in results) == 12
    assert_matches_reference(out, reference, expected_ids(reference, range(17, 29)))
    rows = jsonl_rows(out / "_batch" / "shards" / "metadata-00000-of-00001.jsonl")
    assert (
        len(rows)
        == len({row["file_name"] for row in rows})
        == sum(len(item["images"]) for item in sidecars(out).values())
    )
    assert leftovers(out) == []


@pytest.fixture(scope="module")
def engine(dev_model_dir: Path):
    from worker.generation.engine import Engine

    return Engine(dev_model_dir)


def test_bad_lines_get_error_sidecars_and_the_run_goes_on(reference: Reference, engine, tmp_path: Path) -> None:
    lines: list[Any] = [None] * 12
    for number in (1, 9, 11):  # reference lines at their own line numbers, in other batch company here
        lines[number - 1] = reference.lines[number - 1]
    lines[1] = "{not json\n"
    lines[2] = {"prompt": "too small", "height": 100, "width": 256}
    lines[3] = {"prompt": "old key", "steps": 20}
    lines[4] = {"prompt": "bad id", "id": "../../etc/passwd"}
    lines[5] = reference.lines[0]  # the same line twice: the copy is a duplicate
    lines[6] = {"prompt": "deeper than the dev model", "clip_skip": 5, "height": 256, "width": 256}
    lines[7] = "[1, 2, 3]\n"
    lines[9] = b'{"prompt": "caf\xe9"}\n'
    complete_last = {"prompt": "the last line", "height": 256, "width": 256, "num_inference_steps": 1, "seed": 3}
    torn = write_jsonl(tmp_path / "jobs.jsonl", [*lines[:11], json.dumps(complete_last).encode()[:30]])
    out = tmp_path / "out"
    options = RunOptions(torn, out, progress=False)
    local = LocalEngineOptions(batch_size=BATCH_SIZE, engine=engine)

    with one_torch_thread():  # in process, on the engine loaded here; the thread count of the reference run
        summary = run_shard(options, local)
    assert summary.exit_code == EXIT_INVALID_LINES
    assert summary.made == 3 and summary.invalid_lines == 8 and summary.failed == 1
    errors = {path.name: read_json(path) for path in (out / "errors").iterdir()}
    kinds = {int(name[5:13]): error["kind"] for name, error in errors.items()}
    assert kinds == {
        2: "invalid_json",
        3: "invalid_request",
        4: "invalid_request",
        5: "invalid_id",
        6: "duplicate_id",
        7: "engine_error",
        8: "invalid_json",
        10: "invalid_json",
        12: "torn_line",
    }
    assert all(error["retriable"] is False and error["error"] for error in errors.values())
    assert "clip_skip" in errors["line-00000007.json"]["error"]
    assert "multiple of 8" in errors["line-00000003.json"]["error"]
    # The valid lines were made exactly as in the 50-line run (other batch mates, same bytes).
    assert_matches_reference(out, reference, expected_ids(reference, {1, 9, 11}))

    # The writer finishes the last line: a rerun makes it, forgets its error, and redoes nothing else.
    torn.write_bytes(torn.read_bytes()[:-30] + (json.dumps(complete_last) + "\n").encode())
    with one_torch_thread():
        summary = run_shard(options, local)
    assert summary.exit_code == EXIT_INVALID_LINES  # the other invalid lines are still there
    assert summary.made == 1 and summary.already_done == 3
    assert not (out / "errors" / "line-00000012.json").exists()
    assert len(sidecars(out)) == 4 and leftovers(out) == []


def test_a_changed_line_under_a_used_id_is_refused_not_overwritten(engine, tmp_path: Path) -> None:
    line = {"id": "cover", "prompt": "a harbour", "height": 256, "width": 256, "num_inference_steps": 1, "seed": 2}
    source = write_jsonl(tmp_path / "jobs.jsonl", [line])
    options = RunOptions(source, tmp_path / "out", progress=False)
    with one_torch_thread():
        assert run_shard(options, LocalEngineOptions(engine=engine)).exit_code == EXIT_OK
    before = (tmp_path / "out" / "cover.json").read_bytes()
    write_jsonl(source, [{**line, "prompt": "a harbour at night"}])
    summary = run_shard(options, LocalEngineOptions(engine=engine))
    assert summary.exit_code == EXIT_INVALID_LINES and summary.made == 0
    error = read_json(tmp_path / "out" / "errors" / "line-00000001.json")
    assert error["kind"] == "changed_line" and "new id" in error["error"]
    assert (tmp_path / "out" / "cover.json").read_bytes() == before


def test_the_engine_warms_up_the_runs_own_batch_size(dev_model_dir: Path) -> None:
    """Every call of a run has --batch-size images: the shape to warm up (and compile), not the worker's 1."""
    from batch.runner import load_engine
    from core.settings import load_settings

    settings = load_settings({"WARMUP_BATCH_SIZES": "1,2"})
    engine = load_engine(LocalEngineOptions(model_dir=dev_model_dir, batch_size=3, settings=settings))
    assert engine.settings.warmup_batch_sizes == (3,)
    assert engine.accelerator.options.warmup_batch_sizes == (3,)
