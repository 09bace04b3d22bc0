"""The output folder's building blocks: atomic writes, claims, done markers, metadata files, call planning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from batch.atomic import clean_temporary_files, create_exclusive, write_atomic
from batch.claims import ClaimBook
from batch.imagefolder import ShardMetadata, image_rows, read_jsonl_tolerant
from batch.jobs import InvalidLine, Shard, load_shard
from batch.outputs import OutputDir
from batch.planner import Planner, group_of, order_jobs, split_job
from batch.records import ErrorRecord, ImageRecord, Sidecar
from core.results import GenerationMetadata, Timings

ROOT = Path(__file__).resolve().parents[2]
EMPTY = GenerationMetadata({})


def jobs_from(tmp_path: Path, lines: list[dict]) -> list:
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return load_shard(source, Shard(0, 1)).jobs


def python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_exclusive_create_has_one_winner_among_processes(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "item.json"
    code = (
        "import sys; from pathlib import Path; from batch.atomic import create_exclusive; "
        "print(create_exclusive(Path(sys.argv[1]), sys.argv[2].encode() * 10000, Path(sys.argv[3])))"
    )
    racers = [python(code, str(target), f"writer{n}", str(tmp)) for n in range(6)]
    results = [racer.communicate()[0].strip() for racer in racers]
    assert sorted(results) == ["False"] * 5 + ["True"]
    winner = results.index("True")
    assert target.read_bytes() == f"writer{winner}".encode() * 10000
    assert list(tmp.iterdir()) == []  # no temporary file left behind


def test_write_atomic_replaces_and_cleanup_spares_live_writers(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    write_atomic(tmp_path / "a.bin", b"one", tmp)
    write_atomic(tmp_path / "a.bin", b"two", tmp)
    assert (tmp_path / "a.bin").read_bytes() == b"two"
    assert not create_exclusive(tmp_path / "a.bin", b"three", tmp)

    dead = python("import os; print(os.getpid())")
    dead_pid = int(dead.communicate()[0])
    from batch.atomic import HOST_TAG

    leftover = tmp / f".{HOST_TAG}.{dead_pid}.abcd.x.png.tmp"
    mine = tmp / f".{HOST_TAG}.{os.getpid()}.abcd.y.png.tmp"
    foreign_fresh = tmp / ".other-host.12.abcd.z.png.tmp"
    foreign_old = tmp / ".other-host.13.abcd.w.png.tmp"
    for path in (leftover, mine, foreign_fresh, foreign_old):
        path.write_bytes(b"partial")
    os.utime(foreign_old, (time.time() - 7200, time.time() - 7200))
    assert clean_temporary_files(tmp) == 2
    assert sorted(p.name for p in tmp.iterdir()) == sorted([mine.name, foreign_fresh.name])


def test_claims_exclude_live_owners_and_expire_with_their_owner(tmp_path: Path) -> None:
    folder, tmp = tmp_path / "claims", tmp_path / "tmp"
    folder.mkdir()
    tmp.mkdir()
    holder_code = (
        "import sys, time; from pathlib import Path; from batch.claims import ClaimBook; "
        "book = ClaimBook(Path(sys.argv[1]), Path(sys.argv[2]), ttl_s=60); "
        "print(book.try_claim('item-a'), flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(folder), str(tmp)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        book = ClaimBook(folder, tmp, ttl_s=60)
        assert not book.try_claim("item-a")  # a live process on this host holds it
        assert book.holder("item-a")["pid"] == holder.pid
        assert book.try_claim("item-b")
        assert book.try_claim("item-b")  # re-entrant for its owner
    finally:
        holder.kill()
        holder.wait()
    assert book.holder("item-a") is None  # its owner is gone: stale at once, no TTL wait
    assert book.try_claim("item-a") and book.taken_over == 1
    book.release_all()
    assert sorted(folder.iterdir()) == []

    # A claim from another host is stale only after the TTL without a heartbeat.
    foreign = folder / "item-c.claim"
    foreign.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0.0, "token": "t"}))
    short = ClaimBook(folder, tmp, ttl_s=5)
    assert not short.try_claim("item-c")
    os.utime(foreign, (time.time() - 10, time.time() - 10))
    assert short.try_claim("item-c")


def test_done_means_complete_sidecar_and_images(tmp_path: Path) -> None:
    outputs = OutputDir(tmp_path / "out").create()
    (job,) = jobs_from(tmp_path, [{"prompt": "a boat", "height": 256, "width": 256, "num_images": 2, "seed": 4}])
    images = [ImageRecord(file_name=f"images/{job.id}-{k}.png", seed=4 + k, sha256="x", size=5) for k in range(2)]
    metadata = GenerationMetadata({"prompt": {"num_chunks": 1}}, Timings(denoising_s=1.0), {"cache": {"prompt": True}})
    sidecar = Sidecar.build(job, images, metadata, {})
    # Only the stable part is the item's metadata; timings and cache hits describe this run.
    assert sidecar.metadata == {"prompt": {"num_chunks": 1}}
    assert sidecar.generation["timings"]["denoising_s"] == 1.0 and sidecar.generation["cache"]["prompt"]
    result = outputs.commit(job.id, [(image.file_name, b"12345") for image in images], sidecar)
    assert result.committed and outputs.read_done(job.id) == sidecar
    assert not outputs.commit(job.id, [], sidecar).committed  # a second commit of the same item loses

    # A truncated image: not done, and the sidecar is set aside so the item is made again.
    (outputs.root / images[1].file_name).write_bytes(b"123")
    assert outputs.read_done(job.id) is None
    assert not outputs.sidecar_path(job.id).exists() and len(list(outputs.quarantine.iterdir())) == 1

    # A torn sidecar (a filesystem that lost data): never taken for done.
    outputs.sidecar_path(job.id).write_bytes(sidecar.to_json()[:40])
    assert outputs.read_done(job.id) is None and not outputs.sidecar_path(job.id).exists()


def test_shard_metadata_is_rebuilt_from_sidecars_after_a_crash(tmp_path: Path) -> None:
    outputs = OutputDir(tmp_path / "out").create()
    jobs = jobs_from(tmp_path, [{"prompt": f"p{n}", "height": 256, "width": 256, "seed": n} for n in range(3)])
    sidecars = [
        Sidecar.build(job, [ImageRecord(file_name=f"images/{job.id}-0.png", seed=job.request.seed)], EMPTY, {})
        for job in jobs
    ]
    metadata = ShardMetadata(outputs, Shard(0, 1))
    lines = {job.id: job.line for job in jobs}
    metadata.append(image_rows(sidecars[0]))
    # A writer died mid-append (torn last line), and sidecar 1 was committed without its row.
    with open(metadata.path, "ab") as handle:
        handle.write(json.dumps(image_rows(sidecars[2])[0]).encode()[:30])
    rows, damaged = read_jsonl_tolerant(metadata.path)
    assert damaged and [row["id"] for row in rows] == [jobs[0].id]
    assert metadata.reconcile({job.id: sidecar for job, sidecar in zip(jobs[:2], sidecars, strict=False)}, lines) == 1
    rows, damaged = read_jsonl_tolerant(metadata.path)
    assert not damaged and [row["id"] for row in rows] == [jobs[0].id, jobs[1].id]
    # Appending after a torn line keeps the new row whole.
    with open(metadata.path, "ab") as handle:
        handle.write(b'{"file_name": "torn')
    metadata.append(image_rows(sidecars[2]))
    rows, _ = read_jsonl_tolerant(metadata.path)
    assert [row["id"] for row in rows] == [job.id for job in jobs]
    assert set(rows[0]) == set(rows[2])  # one schema for every row (imagefolder)

    # Another runner committed item 2 after this one listed the done items: its row survives a reconcile;
    # item 1's sidecar is gone (quarantined), so its row goes.
    image = sidecars[2].images[0].model_copy(update={"size": 3})
    outputs.commit(jobs[2].id, [(image.file_name, b"png")], sidecars[2].model_copy(update={"images": (image,)}))
    assert metadata.reconcile({jobs[0].id: sidecars[0]}, lines) == 0
    assert [row["id"] for row in read_jsonl_tolerant(metadata.path)[0]] == [jobs[0].id, jobs[2].id]


def test_planner_groups_same_shapes_pads_and_never_groups_sde(tmp_path: Path) -> None:
    base = {"height": 256, "width": 256, "num_inference_steps": 2}
    lines = [{"prompt": f"p{n}", **base} for n in range(5)]
    lines.append({"prompt": "big", **base, "num_images": 3})
    lines.append({"prompt": "tall", **base, "height": 512})
    lines.append({"prompt": "sde", **base, "scheduler": "DPM++ SDE", "num_images": 2})
    jobs = jobs_from(tmp_path, lines)
    planner = Planner(4, pad=True, key_of=lambda unit: (unit.request.width, unit.request.height))
    calls = []
    for job in jobs:
        units = split_job(job)
        if job.request.scheduler == "DPM++ SDE":
            assert len(units) == 1 and units[0].index is None and units[0].request.num_images == 2
        else:
            seeds = [job.request.seed + k for k in range(job.request.num_images)]
            assert [unit.request.seed for unit in units] == seeds
        for unit in units:
            calls += planner.add(unit)
    calls += planner.flush()
    shapes = sorted((len(call.units), len(call.padding), call.num_images) for call in calls)
    # 8 square images: two full calls; the tall one alone, padded to 4; the SDE request alone, unpadded.
    assert shapes == [(1, 0, 2), (1, 3, 4), (4, 0, 4), (4, 0, 4)]
    assert all(call.num_images == 4 for call in calls if not call.units[0].job.per_call_noise)
    made = sorted((unit.job.line, k) for call in calls for unit in call.units for k in unit.image_indices)
    assert made == sorted((job.line, k) for job in jobs for k in range(job.request.num_images))

    unpadded = Planner(4, pad=False, key_of=lambda unit: unit.request.height, window=2)
    calls = [call for job in jobs[:3] for unit in split_job(job) for call in unpadded.add(unit)]
    assert [len(call.units) for call in calls] == [3] and not calls[0].padding  # the window pushed a call out


def test_lines_taken_group_by_group_are_padded_once_per_key(tmp_path: Path) -> None:
    """The runner's order (issue 23): lines of 3 shapes, interleaved, come group by group, and each shape's last partial
    call is emitted when the next group starts; in line order the waiting window pushed partial calls out instead."""
    sizes = [(256, 256), (320, 256), (256, 320)]
    lines = [{"prompt": f"p{n}", "width": sizes[n % 3][0], "height": sizes[n % 3][1]} for n in range(15)]
    jobs = jobs_from(tmp_path, lines)
    ordered = order_jobs(jobs)
    assert [job.line for job in ordered] == [1, 4, 7, 10, 13, 2, 5, 8, 11, 14, 3, 6, 9, 12, 15]

    def size(unit) -> tuple[int, int]:
        return unit.request.width, unit.request.height

    def plan(jobs: list, grouped: bool) -> list:
        planner = Planner(3, pad=True, key_of=size, window=4)  # many keys for its window, as in a large file
        calls = []
        for job in jobs:
            if grouped:
                calls += planner.start_group(group_of(job))
            calls += [call for unit in split_job(job) for call in planner.add(unit)]
        return calls + planner.flush()

    calls = plan(ordered, grouped=True)
    # 5 images of each size at batch 3: a full call, then two images padded by 1, before the next size's first call.
    assert [(size(call.units[0]), len(call.units), len(call.padding)) for call in calls] == [
        (shape, units, padding) for shape in sizes for units, padding in ((3, 0), (2, 1))
    ]
    in_line_order = plan(jobs, grouped=False)
    assert sum(len(call.padding) for call in in_line_order) == 6 > sum(len(call.padding) for call in calls) == 3


def test_the_padding_benchmark_finds_the_grouped_planner_at_the_floor(capsys) -> None:
    """bench/batch_padding.py: the runner's order pads exactly what strict identity needs (each key's images rounded
    up to whole calls, counted without the planner), and less than line order on a file of many keys."""
    from bench.batch_padding import main

    main(["--lines", "150", "--scenarios", "sizes+loras", "--batch-sizes", "4"])
    rows = {row["order"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["grouped"]["images_computed"] == rows["floor"]["images_computed"]
    assert rows["grouped"]["padding_images"] < rows["line"]["padding_images"]
    assert rows["line"]["images_requested"] == rows["grouped"]["images_requested"] == rows["floor"]["images_requested"]


def test_an_output_folder_keeps_to_one_model(tmp_path: Path) -> None:
    outputs = OutputDir(tmp_path / "out").create()
    first, other = {"name": "a", "manifest_hash": "1"}, {"name": "b", "manifest_hash": "2"}
    assert outputs.pin_model(first) is None
    assert outputs.pin_model(first) is None
    assert "--allow-model-change" in outputs.pin_model(other)
    assert outputs.pin_model(other, allow_change=True) is None
    assert outputs.pin_model(other) is None


def test_the_records_read_and_write_the_files_of_earlier_runs_byte_for_byte(tmp_path: Path) -> None:
    """The on-disk contract: files as the runner has written them since format /1 (keys sorted, two-space indent,
    UTF-8) read back into records and are written again unchanged, keys this version does not know included; a
    fresh record has exactly those keys."""
    (job,) = jobs_from(tmp_path, [{"prompt": "a ö boat", "height": 256, "width": 256, "seed": 9, "id": "boat"}])
    image = {"file_name": "images/boat-0.png", "seed": 9, "sha256": "ab" * 32, "size": 5}
    earlier_sidecar = {
        "format": "sdxl-batch-item/1",
        "id": "boat",
        "line": 1,
        "status": "done",
        "request": job.request.model_dump(mode="json"),
        "seed": 9,
        "seed_source": "line",
        "images": [image],
        "metadata": {"model": {"name": "dev", "manifest_hash": "h"}, "prompt": {"num_chunks": 1}},
        "generation": {"mode": "local", "timings": Timings(denoising_s=0.25).to_dict()},
        "written_by_a_later_version": [1, 2.5],
    }
    earlier_errors = [
        {"format": "sdxl-batch-error/1", "line": 4, "id": None, "kind": "invalid_json", "error": "not JSON"}
        | {"retriable": False, "input": "/in/jobs.jsonl"},
        {"format": "sdxl-batch-error/1", "line": 1, "id": "boat", "kind": "retriable_error"}
        | {"code": "out of GPU memory", "error": "out of GPU memory: x", "retriable": True, "attempts": 2},
    ]
    for record_type, earlier in [(Sidecar, earlier_sidecar), *((ErrorRecord, error) for error in earlier_errors)]:
        data = (json.dumps(earlier, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        assert record_type.from_json(data).to_json() == data

    metadata = GenerationMetadata(earlier_sidecar["metadata"], Timings(denoising_s=0.25))
    fresh = json.loads(Sidecar.build(job, [ImageRecord(**image)], metadata, {"mode": "local"}).to_json())
    assert fresh == {key: value for key, value in earlier_sidecar.items() if key != "written_by_a_later_version"}
    from core.errors import OutOfMemory

    failure = ErrorRecord.failure(job, OutOfMemory("x"), "local", attempts=2).to_dict()
    assert failure == earlier_errors[1]
    invalid = InvalidLine(4, "invalid_json", "not JSON")
    assert ErrorRecord.invalid(invalid, "/in/jobs.jsonl").to_dict() == earlier_errors[0] | {"id": None}

    # A done sidecar of an earlier run resumes as done; a sidecar that is not one is set aside.
    outputs = OutputDir(tmp_path / "out").create()
    (outputs.root / image["file_name"]).write_bytes(b"12345")
    outputs.sidecar_path("boat").write_bytes(json.dumps(earlier_sidecar).encode())
    assert outputs.item_state(job).done
    outputs.sidecar_path("boat").write_bytes(json.dumps({**earlier_sidecar, "images": [{"size": 5}]}).encode())
    assert outputs.read_done("boat") is None and len(list(outputs.quarantine.iterdir())) == 1


def test_the_end_of_a_run_says_when_padding_was_most_of_the_work() -> None:
    """A new user's 5-image file at --batch-size 8 computed 24 images: the summary says why and what to change."""
    from batch.records import ShardSummary

    counts = dict.fromkeys(("lines", "items", "invalid_lines", "already_done", "made", "done_by_other", "failed"), 0)
    counts.update(dict.fromkeys(("failed_retriable", "remaining", "claims_taken_over", "commits_lost", "exit_code"), 0))
    common = {"shard": "0/1", "mode": "local", "input": "jobs.jsonl", **counts, "seconds": 1.0, "setup_seconds": None}
    common.update(items_per_s=None, images_per_s=None, stopped=None, pipeline_calls=3, batch_size=8)
    wasteful = ShardSummary(**common, images=5, padded_images=19, deterministic=True)
    assert "19 of the 24 images computed were padding" in wasteful.describe()
    assert "--no-deterministic" in wasteful.describe()
    for quiet in (
        ShardSummary(**common, images=60, padded_images=4, deterministic=True),  # 6 %: the price of identity
        ShardSummary(**common, images=5, padded_images=0, deterministic=False),
    ):
        assert "padding:" not in quiet.describe() and "were padding" not in quiet.describe()
