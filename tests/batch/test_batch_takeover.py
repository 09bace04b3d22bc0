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

ITEMS = 6
# A claim is refreshed for one TTL after its owner's last progress and is stale one TTL after that, 0.4 s after it
# was taken; each call here runs 12 denoising steps (2-3 s on the dev model with one thread, both runners on 2
# cores: 0.2 s per step plus 0.4 s of VAE decode, measured), so every item one runner is generating looks abandoned
# to the other.
STEPS = 12
CLAIM_TTL_S = 0.2


def file_facts(path: Path) -> tuple[int, int, str]:
    """(inode, modification time, sha256): a file replaced by a rename gets another inode."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_committed_item_never_changes_when_two_runners_make_it(dev_model_dir: Path, tmp_path: Path) -> None:
    lines = [
        {"id": f"item-{n}", "prompt": f"a dock crane, view {n}", **SMALL, "num_inference_steps": STEPS, "seed": n}
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
