"""Reading JSONL lines: ids, seeds, invalid lines, torn last lines, and shard coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch.cli import resolve_shard
from batch.jobs import (
    Job,
    Shard,
    derive_seed,
    hash_id,
    load_shard,
    parse_shard,
    shard_of,
)
from core.errors import ConfigurationError
from core.settings import load_settings

VALID = {"prompt": "a lighthouse at dusk", "height": 256, "width": 256}


def write_lines(path: Path, lines: list[str | bytes], final_newline: bool = True) -> Path:
    data = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines)
    path.write_bytes(data + (b"\n" if final_newline and lines else b""))
    return path


def test_hash_id_is_canonical_and_seed_is_derived_from_it(tmp_path: Path) -> None:
    reordered = '{"width": 256, "height": 256, "prompt": "a lighthouse at dusk"}'
    source = write_lines(tmp_path / "jobs.jsonl", [json.dumps(VALID), reordered, json.dumps({**VALID, "seed": 7})])
    result = load_shard(source, Shard(0, 1))
    # The reordered copy is the same line (same hash id): it is a duplicate, not a second item.
    assert [job.line for job in result.jobs] == [1, 3]
    assert [(bad.line, bad.kind) for bad in result.invalid] == [(2, "duplicate_id")]
    assert "identical to line 1" in result.invalid[0].message
    first, seeded = result.jobs
    assert first.id == hash_id(VALID) and len(first.id) == 16
    assert first.seed_source == "derived from id" and first.request.seed == derive_seed(first.id)
    assert first.payload["seed"] == first.request.seed  # remote mode sends the resolved seed
    assert 0 <= first.request.seed < 2**63
    assert seeded.seed_source == "line" and seeded.request.seed == 7


def test_explicit_ids_and_invalid_lines_get_messages(tmp_path: Path) -> None:
    lines: list[str | bytes] = [
        json.dumps({**VALID, "id": "cover-01"}),
        json.dumps({**VALID, "id": "../etc/passwd"}),
        json.dumps({**VALID, "id": 12}),
        json.dumps({**VALID, "id": "cover-01", "seed": 3}),
        "{not json",
        "[1, 2]",
        json.dumps({**VALID, "height": 100}),
        json.dumps({**VALID, "steps": 20}),
        b'{"prompt": "caf\xe9"}',
        "",
        "   ",
        json.dumps({**VALID, "id": "x" * 129}),
    ]
    result = load_shard(write_lines(tmp_path / "jobs.jsonl", lines), Shard(0, 1))
    assert [job.id for job in result.jobs] == ["cover-01"]
    kinds = {bad.line: bad.kind for bad in result.invalid}
    assert kinds == {
        2: "invalid_id",
        3: "invalid_id",
        4: "duplicate_id",
        5: "invalid_json",
        6: "invalid_json",
        7: "invalid_request",
        8: "invalid_request",
        9: "invalid_json",
        12: "invalid_id",
    }
    messages = {bad.line: bad.message for bad in result.invalid}
    assert "already used by line 1" in messages[4]
    assert "height" in messages[7] and "multiple of 8" in messages[7]
    assert "steps" in messages[8]
    assert "A-Z a-z 0-9" in messages[2]
    assert result.total_lines == 12


def test_torn_last_line_is_reported_and_a_complete_one_without_newline_is_fine(tmp_path: Path) -> None:
    complete = write_lines(tmp_path / "a.jsonl", [json.dumps(VALID), json.dumps({**VALID, "seed": 1})], False)
    assert [job.line for job in load_shard(complete, Shard(0, 1)).jobs] == [1, 2]

    torn = write_lines(tmp_path / "b.jsonl", [json.dumps(VALID), json.dumps({**VALID, "seed": 1})[:25]], False)
    result = load_shard(torn, Shard(0, 1))
    assert [job.line for job in result.jobs] == [1]
    assert [(bad.line, bad.kind) for bad in result.invalid] == [(2, "torn_line")]
    assert "truncated" in result.invalid[0].message

    # The same broken text in the middle of the file is plain invalid JSON.
    middle = write_lines(tmp_path / "c.jsonl", [json.dumps(VALID)[:25], json.dumps({**VALID, "seed": 1})])
    assert [bad.kind for bad in load_shard(middle, Shard(0, 1)).invalid] == ["invalid_json"]


def test_shard_parsing_and_job_completion_index() -> None:
    assert parse_shard("2/8") == Shard(2, 8)
    for bad in ("8/8", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)

    def index(raw: str) -> int | None:  # JOB_COMPLETION_INDEX as the batch command reads it
        return load_settings({"JOB_COMPLETION_INDEX": raw}, command="batch").job_completion_index

    assert resolve_shard(None, 4, index("3")) == Shard(3, 4)
    assert resolve_shard("1/2", None, index("3")) == Shard(1, 2)
    assert resolve_shard(None, None, None) == Shard(0, 1)
    with pytest.raises(ConfigurationError, match="JOB_COMPLETION_INDEX"):
        resolve_shard(None, 4, None)
    with pytest.raises(ConfigurationError):
        resolve_shard(None, 4, index("4"))
    with pytest.raises(ConfigurationError, match="JOB_COMPLETION_INDEX='x' is invalid"):
        index("x")


line_strategy = st.one_of(
    st.builds(lambda text, seed: json.dumps({"prompt": text, "seed": seed}), st.text(min_size=1), st.integers(0, 9)),
    st.builds(lambda name: json.dumps({"id": name, "prompt": "p"}), st.sampled_from(["a", "b", "c", "d"])),
    st.sampled_from(["", "{broken", "[]", '{"prompt": ""}', '{"prompt": "x", "extra": 1}']),
)


@given(lines=st.lists(line_strategy, max_size=40), num_shards=st.integers(1, 9), torn=st.booleans())
def test_shards_cover_every_line_exactly_once(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str], num_shards: int, torn: bool
) -> None:
    source = write_lines(tmp_path_factory.mktemp("cover") / "jobs.jsonl", lines, final_newline=not torn)
    everything = load_shard(source, Shard(0, 1))
    all_lines = sorted([job.line for job in everything.jobs] + [bad.line for bad in everything.invalid])
    assert all_lines == [n for n, text in enumerate(lines, start=1) if text.strip()]  # nothing lost, blanks skipped

    seen: list[int] = []
    for index in range(num_shards):
        part = load_shard(source, Shard(index, num_shards))
        shard_lines = [job.line for job in part.jobs] + [bad.line for bad in part.invalid]
        assert all(shard_of(line, num_shards) == index for line in shard_lines)
        seen += shard_lines
        # Each shard sees the same verdict and the same id as the whole-file read (duplicates are global).
        for job in part.jobs:
            assert any(isinstance(other, Job) and other.id == job.id for other in everything.jobs)
        assert {(bad.line, bad.kind) for bad in part.invalid} <= {(bad.line, bad.kind) for bad in everything.invalid}
    assert sorted(seen) == all_lines  # the union is every line, and no line is in two shards
    assert len(seen) == len(set(seen))
