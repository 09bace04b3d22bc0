"""``status`` and ``merge``: read-only views of an output folder (plus the merged ``metadata.jsonl``).

Both trust only what a crash cannot fake: a done item is a sidecar that parses and whose images
exist with their recorded sizes; a failed line has an error sidecar and no done item; anything
else is remaining (or running, while a live claim is on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batch.atomic import write_atomic
from batch.claims import ClaimBook
from batch.jobs import Job, Shard, load_shard, shard_of
from batch.outputs import OutputDir, image_rows, json_bytes


@dataclass
class ShardStatus:
    shard: str
    lines: int = 0  # non-blank lines
    done: int = 0
    failed: int = 0
    running: int = 0
    remaining: int = 0  # not done and not failed (running ones included)


def run_status(out: Path, source: Path | None = None, num_shards: int | None = None) -> dict[str, Any]:
    """Done / failed / remaining per shard, from the input file and the output folder."""
    outputs = OutputDir(out)
    if not outputs.root.is_dir():
        raise FileNotFoundError(f"{out} is not a batch output folder")
    layout = outputs.read_layout() or {}
    source = Path(source) if source is not None else Path(layout["input"]) if "input" in layout else None
    num_shards = num_shards or int(layout.get("num_shards", 1))
    if source is None or not source.is_file():
        raise FileNotFoundError(
            f"input file {source} not found; pass --input (the run recorded {layout.get('input', 'nothing')})"
        )
    everything = load_shard(source, Shard(0, 1))  # one pass over the file, then split by line number
    claims = ClaimBook(outputs.claims, outputs.tmp)
    shards = [ShardStatus(str(Shard(index, num_shards))) for index in range(num_shards)]
    entries: list[Job | Any] = [*everything.jobs, *everything.invalid]
    for entry in entries:
        status = shards[shard_of(entry.line, num_shards)]
        status.lines += 1
        if isinstance(entry, Job) and outputs.read_done(entry.id, repair=False) is not None:
            status.done += 1
        elif outputs.error_path(entry.line).exists() or not isinstance(entry, Job):
            status.failed += 1
        else:
            status.remaining += 1
            if claims.holder(entry.id) is not None:
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


def merge(out: Path) -> dict[str, Any]:
    """Write ``<out>/metadata.jsonl`` (Hugging Face imagefolder) for every done item of the run, in line order."""
    outputs = OutputDir(out)
    if not outputs.root.is_dir():
        raise FileNotFoundError(f"{out} is not a batch output folder")
    outputs.tmp.mkdir(parents=True, exist_ok=True)
    rows, items, skipped = [], 0, []
    for path in outputs.sidecar_paths():
        sidecar = outputs.read_done(path.stem, repair=False)
        if sidecar is None:
            skipped.append(path.name)
            continue
        items += 1
        rows.extend(image_rows(sidecar))
    rows.sort(key=lambda row: (row["line"], row["id"], row["image_index"]))
    target = outputs.root / "metadata.jsonl"
    write_atomic(target, b"".join(json_bytes(row, indent=None) for row in rows), outputs.tmp)
    return {"metadata": str(target), "items": items, "images": len(rows), "skipped_damaged": skipped}
