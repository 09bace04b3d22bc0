"""Two real runners on one shard with a claim TTL shorter than one pipeline call, so claims are taken over while
their owner is still generating and both processes make the same items (issue 13, item 3). A committed item's files
must never change afterwards: the second process to finish discards its own files."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from batch_testing import SMALL, finish, leftovers, read_json, sidecars, spawn, write_jsonl

from batch.exit_codes import EXIT_OK

ITEMS = 4
# A claim is refreshed while its owner made progress (a denoising step) within the last TTL and is stale one TTL
# after its last refresh. A step of a 512x512 image takes longer than twice 0.05 s (0.1-0.5 s on the dev model with
# one thread, measured), so in the middle of every step the item one runner is generating looks abandoned to the
# other.
SIZE = {"height": 512, "width": 512, "guidance_scale": 1.0}
STEPS = 4
CLAIM_TTL_S = 0.05


def file_facts(path: Path) -> tuple[int, int, str]:
    """(inode, modification time, sha256): a file replaced by a rename gets another inode."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_committed_item_never_changes_when_two_runners_make_it(dev_model_dir: Path, tmp_path: Path) -> None:
    lines = [
        {"id": f"item-{n}", "prompt": f"a dock crane, view {n}", **SIZE, "num_inference_steps": STEPS, "seed": n}
        for n in range(ITEMS)
    ]
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    args = ("run", source, "--out", out, "--batch-size", 1, "--model", dev_model_dir, "--no-progress")
    runners = [spawn(*args, "--claim-ttl", CLAIM_TTL_S) for _ in range(2)]

    # Watch the folder: the moment a sidecar appears, note its images' files; they must never change after.
    committed: dict[str, dict[str, tuple[int, int, str]]] = {}
    while any(runner.poll() is None for runner in runners):
        for path in out.glob("item-*.json"):
            if path.stem not in committed:
                sidecar = json.loads(path.read_bytes())  # sidecars appear complete (hard link of a whole file)
                committed[path.stem] = {
                    image["file_name"]: file_facts(out / image["file_name"]) for image in sidecar["images"]
                }
        time.sleep(0.02)
    results = [finish(runner) for runner in runners]

    for code, summary, stderr in results:
        assert code == EXIT_OK, stderr[-3000:]
        assert summary["remaining"] == summary["failed"] == 0
    summaries = [summary for _, summary, _ in results]
    # The race really ran: claims were taken over from a live, generating owner, and some items were made twice.
    assert sum(summary["claims_taken_over"] for summary in summaries) >= 1, summaries
    assert sum(summary["commits_lost"] for summary in summaries) >= 1, summaries
    assert sum(summary["made"] for summary in summaries) == ITEMS  # each item committed exactly once

    assert set(committed) == set(sidecars(out)) == {f"item-{n}" for n in range(ITEMS)}
    for item_id, files in committed.items():
        sidecar = read_json(out / f"{item_id}.json")
        for image in sidecar["images"]:
            facts = file_facts(out / image["file_name"])
            assert facts == files[image["file_name"]], f"{image['file_name']} changed after its sidecar was written"
            assert facts[2] == image["sha256"]
    assert sorted(path.name for path in (out / "images").iterdir()) == sorted(
        f"item-{n}-0.png" for n in range(ITEMS)
    )  # the losers' files were discarded, not left as orphans
    assert leftovers(out) == []


def test_a_slow_call_keeps_its_claims(dev_model_dir: Path, tmp_path: Path) -> None:
    """Each denoising step counts as progress: a call longer than the TTL (24 steps of 256x256, 1.45-1.65 s on 2
    idle cores) keeps its claims, so the other runner waits instead of making the same item. Without the per-step
    report the claims went stale 2 TTL (2 s) after they were taken and were taken over (the old behaviour). With
    12 steps a call took 0.85-3 s: once the PNG encoders beside it got faster, it could end inside the TTL."""
    lines = [
        {"id": f"item-{n}", "prompt": f"a slipway, view {n}", **SMALL, "num_inference_steps": 24, "seed": n}
        for n in range(3)
    ]
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    args = ("run", source, "--out", out, "--batch-size", 1, "--model", dev_model_dir, "--no-progress")
    results = [finish(runner) for runner in [spawn(*args, "--claim-ttl", 1.0) for _ in range(2)]]
    for code, _, stderr in results:
        assert code == EXIT_OK, stderr[-3000:]
    summaries = [summary for _, summary, _ in results]
    assert [summary["claims_taken_over"] for summary in summaries] == [0, 0], summaries
    assert [summary["commits_lost"] for summary in summaries] == [0, 0], summaries
    assert sum(summary["made"] for summary in summaries) == 3
    calls = [item["generation"]["timings"] for item in sidecars(out).values()]
    assert max(timing["denoising_s"] for timing in calls) > 1.0  # the calls really outlasted the TTL
