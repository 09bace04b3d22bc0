"""The input side of a batch: JSONL lines -> validated jobs with stable ids, seeds and shards.

A line is a worker request (the same object as a RunPod job's ``input``) plus an optional ``id``.
Everything here is a pure function of the input file, so every process that reads the same file
(another shard, a second pod for the same index, a resume after a crash) sees the same jobs with
the same ids, seeds and shard assignment.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from worker.request.schema import GenerationRequest

# worker.request.schema (pydantic) is imported where lines are parsed, not here: the output-folder code needs none
# of it.

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
HASH_ID_LENGTH = 16

InvalidKind = Literal["invalid_json", "invalid_id", "invalid_request", "duplicate_id", "torn_line", "changed_line"]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: line n (1-based) belongs to shard (n - 1) % count."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count and count >= 1")

    def owns(self, line_number: int) -> bool:
        return shard_of(line_number, self.count) == self.index

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(line_number: int, num_shards: int) -> int:
    """Round-robin by line number: balanced, and every line lands in exactly one shard."""
    return (line_number - 1) % num_shards


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> Shard(I, N)."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    return Shard(int(index), int(count))


@dataclass(frozen=True)
class RawLine:
    number: int  # 1-based, as editors show it
    text: bytes
    terminated: bool  # ended with a newline; the file's last line may not


@dataclass(frozen=True)
class Job:
    """A valid line: what to generate and under which name."""

    line: int
    id: str
    request: GenerationRequest  # seed always resolved
    seed_source: Literal["line", "derived from id"]
    payload: dict[str, Any] = field(compare=False)  # the line as given (without id), seed added: what remote mode sends
    id_given: bool = True  # False: the id is a hash of the line

    @property
    def per_call_noise(self) -> bool:
        from worker.request.hires import hires_sampling  # pydantic: only where requests exist

        request = self.request
        return request.sampling.per_call_noise or (request.enable_hr and hires_sampling(request).per_call_noise)


@dataclass(frozen=True)
class InvalidLine:
    line: int
    kind: InvalidKind
    message: str
    id: str | None = None
    id_given: bool = True


def read_raw_lines(path: Path) -> Iterator[RawLine]:
    """Every line of ``path`` with its number; bytes, so a bad encoding is one bad line, not a crash."""
    with open(path, "rb") as handle:
        for number, text in enumerate(handle, start=1):
            terminated = text.endswith(b"\n")
            yield RawLine(number, text.rstrip(b"\r\n") if terminated else text, terminated)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hash_id(line_object: dict[str, Any]) -> str:
    """The id of a line without one: a hash of its canonical JSON, so the same line has the same id everywhere."""
    return hashlib.sha256(canonical_json(line_object).encode("utf-8")).hexdigest()[:HASH_ID_LENGTH]


def derive_seed(item_id: str) -> int:
    """A seed from the id, for lines without a seed: random-looking, yet the same on every run and shard.

    Below 2^32 like the worker's random seeds, so JavaScript tools reading the sidecars keep it exact.
    """
    from worker.request.fields import MAX_RANDOM_SEED

    digest = hashlib.sha256(b"sdxl-batch seed\0" + item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_RANDOM_SEED + 1)


def parse_line(raw: RawLine, is_last: bool) -> Job | InvalidLine | None:
    """One line -> a Job, an InvalidLine with a message naming the problem, or None for a blank line."""
    from core.errors import InvalidRequest
    from worker.request.schema import parse_request

    if not raw.text.strip():
        return None
    try:
        value = json.loads(raw.text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        if is_last and not raw.terminated:
            return InvalidLine(
                raw.number,
                "torn_line",
                "the last line has no newline and is not complete JSON: the file looks truncated "
                f"(written while copying, or cut off); complete it and run again ({error})",
            )
        return InvalidLine(raw.number, "invalid_json", f"not valid JSON: {error}")
    if not isinstance(value, dict):
        return InvalidLine(raw.number, "invalid_json", f"a line must be a JSON object, got {type(value).__name__}")
    payload = dict(value)
    explicit_id = payload.pop("id", None)
    if "id" in value:
        if not isinstance(explicit_id, str) or not ID_PATTERN.fullmatch(explicit_id):
            shown = repr(explicit_id) if len(repr(explicit_id)) <= 80 else repr(explicit_id)[:77] + "..."
            return InvalidLine(raw.number, "invalid_id", f"id: {shown} is not a valid id; use {ID_RULE}")
        item_id = explicit_id
    else:
        item_id = hash_id(payload)
    try:
        request = parse_request(payload)
    except InvalidRequest as error:
        return InvalidLine(raw.number, "invalid_request", str(error), item_id, "id" in value)
    if request.seed is None:
        seed, source = derive_seed(item_id), "derived from id"
        request = request.model_copy(update={"seed": seed})
        payload["seed"] = seed
    else:
        source = "line"
    return Job(raw.number, item_id, request, source, payload, "id" in value)


@dataclass
class ShardInput:
    """The jobs and invalid lines of one shard, and the size of the whole input."""

    shard: Shard
    jobs: list[Job]
    invalid: list[InvalidLine]
    total_lines: int  # every line of the file, blank ones included


def load_shard(path: Path, shard: Shard) -> ShardInput:
    """Read the whole file (ids must be unique across all shards) and keep the lines of ``shard``.

    A later line whose id was already used is invalid, whichever shard it is in: two lines
    writing the same files would be a silent loss, and identical lines without an id or seed
    would make identical images (add distinct ids or seeds to get different ones).
    """
    raw_lines = list(read_raw_lines(path))
    first_line_of: dict[str, int] = {}
    jobs: list[Job] = []
    invalid: list[InvalidLine] = []
    for position, raw in enumerate(raw_lines):
        parsed = parse_line(raw, is_last=position == len(raw_lines) - 1)
        if parsed is None:
            continue
        item_id = parsed.id
        duplicate_of = first_line_of.get(item_id) if item_id is not None else None
        if item_id is not None and duplicate_of is None:
            first_line_of[item_id] = raw.number
        if not shard.owns(raw.number):
            continue
        if duplicate_of is not None:
            if parsed.id_given:
                message = f"id: {item_id!r} is already used by line {duplicate_of}; give each line a distinct id"
            else:
                message = (
                    f"this line is identical to line {duplicate_of} (same hash id {item_id!r}) and would make the "
                    "same images; add a distinct id or seed to each, or remove the copy"
                )
            invalid.append(InvalidLine(raw.number, "duplicate_id", message, item_id, parsed.id_given))
        elif isinstance(parsed, Job):
            jobs.append(parsed)
        else:
            invalid.append(parsed)
    return ShardInput(shard, jobs, invalid, len(raw_lines))
