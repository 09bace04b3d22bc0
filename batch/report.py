"""``status`` and ``merge``: read-only views of an output folder (plus the merged ``metadata.jsonl``).

Both describe the input file as it is now (``--input``, else the one the run recorded), not every
file the folder ever received. Both trust only what a crash cannot fake: a done item is a sidecar
that parses, whose images exist with their recorded sizes and whose request is the current line's;
a failed line is invalid, or has an error file about this very item; anything else is remaining (or
running, while a live claim is on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batch.atomic import write_atomic
from batch.claims import ClaimBook
from batch.imagefolder import image_rows
from batch.jobs import Shard, load_shard, shard_of
from batch.outputs import OutputDir
from batch.records import json_bytes
from core.errors import ConfigurationError


@dataclass
class ShardStatus:
    shard: str
    lines: int = 0  # non-blank lines
    done: int = 0
    failed: int = 0
    running: int = 0
    remaining: int = 0  # not done and not failed (running ones included)


def _input_of(outputs: OutputDir, source: Path | None) -> Path:
    """``--input``, else the input the run recorded; a ConfigurationError when neither is a file."""
    if not outputs.root.is_dir():
        raise ConfigurationError(f"{outputs.root} is not a batch output folder")
    layout = outputs.read_layout()
    source = Path(source) if source is not None else Path(layout.input) if layout is not None else None
    if source is None:
        raise ConfigurationError(
            f"{outputs.run_config} is missing (no run wrote to {outputs.root} yet?); pass --input JOBS.jsonl"
        )
    if not source.is_file():
        raise ConfigurationError(
            f"input file {source} not found; pass --input (the run recorded {layout.input if layout else 'nothing'})"
        )
    return source


def run_status(out: Path, source: Path | None = None, num_shards: int | None = None) -> dict[str, Any]:
    """Done / failed / remaining per shard of the current input file, from the output folder.

    Only the lines of the file as it is now count: an item made from a line since edited (a reused
    id) is failed, as the next run reports it; an error file left by a line since removed, fixed or
    changed counts for nothing.
    """
    outputs = OutputDir(out)
    source = _input_of(outputs, source)
    layout = outputs.read_layout()
    num_shards = num_shards or (layout.num_shards if layout is not None else 1)
    if num_shards < 1:
        raise ConfigurationError(f"--num-shards {num_shards}: must be at least 1")
    everything = load_shard(source, Shard(0, 1))  # one pass over the file, then split by line number
    claims = ClaimBook(outputs.claims, outputs.tmp)
    shards = [ShardStatus(str(Shard(index, num_shards))) for index in range(num_shards)]
    for entry in everything.invalid:
        status = shards[shard_of(entry.line, num_shards)]
        status.lines += 1
        status.failed += 1
    for job in everything.jobs:
        status = shards[shard_of(job.line, num_shards)]
        status.lines += 1
        state = outputs.item_state(job, repair=False)
        if state.done:
            status.done += 1
        elif state.changed or outputs.current_failure(job) is not None:
            status.failed += 1
        else:
            status.remaining += 1
            if claims.holder(job.id) is not None:
                status.running += 1
    total = ShardStatus("total")
    for status in shards:
        for key in ("lines", "done", "failed", "running", "remaining"):
            setattr(total, key, getattr(total, key) + getattr(status, key))
    return {
        "input": str(source),
        "num_shards": num_shards,
        "shards": [asdict(status) for status in shards],
        "total": asdict(total),
    }


def format_status(report: dict[str, Any]) -> str:
    columns = ("shard", "lines", "done", "failed", "running", "remaining")
    rows = [*report["shards"], report["total"]]
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in columns}
    lines = ["  ".join(key.rjust(widths[key]) for key in columns)]
    lines += ["  ".join(str(row[key]).rjust(widths[key]) for key in columns) for row in rows]
    return "\n".join(lines)


def merge(out: Path, source: Path | None = None) -> dict[str, Any]:
    """Write ``<out>/metadata.jsonl`` (Hugging Face imagefolder) for the done items of the current input, in line
    order, with their current line numbers. Items made from lines since removed or changed are left out (counted)."""
    outputs = OutputDir(out)
    source = _input_of(outputs, source)
    current = load_shard(source, Shard(0, 1)).jobs
    rows, items, skipped, changed = [], 0, [], 0
    for job in current:
        state = outputs.item_state(job, repair=False)
        if state.done:
            items += 1
            rows.extend(image_rows(state.sidecar, job.line))
        elif state.changed:
            changed += 1
        elif outputs.sidecar_path(job.id).exists():
            skipped.append(outputs.sidecar_path(job.id).name)
    current_ids = {job.id for job in current}
    not_in_input = changed + sum(1 for path in outputs.sidecar_paths() if path.stem not in current_ids)
    rows.sort(key=lambda row: (row["line"], row["id"], row["image_index"]))
    target = outputs.root / "metadata.jsonl"
    try:
        outputs.tmp.mkdir(parents=True, exist_ok=True)
        write_atomic(target, b"".join(json_bytes(row, indent=None) for row in rows), outputs.tmp)
    except OSError as error:
        raise ConfigurationError(
            f"cannot write {target} ({error.strerror or error}); run merge where the output folder is writable"
        ) from None
    return {
        "metadata": str(target),
        "input": str(source),
        "items": items,
        "images": len(rows),
        "skipped_damaged": skipped,
        "not_in_input": not_in_input,  # items made from lines since removed or changed
    }
