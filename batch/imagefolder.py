"""The run's Hugging Face imagefolder metadata: one row per image of each done item.

``<out>/_batch/shards/metadata-<I>-of-<N>.jsonl`` is appended as items finish (:class:`ShardMetadata`);
``merge`` writes ``<out>/metadata.jsonl`` from the sidecars alone. Every row has every column
(:data:`ROW_COLUMNS`), so ``datasets`` loads the folder with one schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from batch.atomic import write_atomic
from batch.jobs import Shard
from batch.outputs import OutputDir
from batch.records import Sidecar, json_bytes

ROW_COLUMNS = (
    "file_name",
    "id",
    "image_index",
    "line",
    "prompt",
    "negative_prompt",
    "prompt_2",
    "negative_prompt_2",
    "seed",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "clip_skip",
    "loras",
    "model",
    "model_hash",
)


def image_rows(sidecar: Sidecar, line: int | None = None) -> list[dict[str, Any]]:
    """The imagefolder rows (one per image) of a done item; deterministic, no timings.

    ``line``: the item's line in the current input (lines move when the file is edited; the
    sidecar keeps the line it was made from).
    """
    request = sidecar.request
    model = sidecar.model
    loras = ", ".join(f"{lora['name']}:{lora['scale']:g}" for lora in request.get("loras", []))
    rows = []
    for index, image in enumerate(sidecar.images):
        row = {
            "file_name": image.file_name,
            "id": sidecar.id,
            "image_index": index,
            "line": sidecar.line if line is None else line,
            "seed": image.seed,
            "loras": loras,
            "model": model.get("name"),
            "model_hash": model.get("manifest_hash"),
        }
        row.update({key: request.get(key) for key in ROW_COLUMNS if key not in row})
        rows.append({key: row[key] for key in ROW_COLUMNS})
    return rows


def read_jsonl_tolerant(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The complete JSON-object lines of ``path``, and whether it needs repair (a torn or broken line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    rows, damaged = [], bool(data) and not data.endswith(b"\n")
    for text in data.split(b"\n"):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError:
            damaged = True
            continue
        if isinstance(value, dict):
            rows.append(value)
        else:
            damaged = True
    return rows, damaged


class ShardMetadata:
    """The per-shard imagefolder ``metadata.jsonl``: one row per image of each done item, appended under a lock.

    The sidecars are the source of truth; this file is rebuilt from them at the start of each
    run (dropping a torn last line left by a crash, adding rows a crash kept from being
    appended), and ``merge`` builds the whole-run file from the sidecars alone.
    """

    def __init__(self, outputs: OutputDir, shard: Shard) -> None:
        self.outputs = outputs
        self.path = outputs.shard_metadata_path(shard)
        self.lock = FileLock(str(self.path) + ".lock")

    def reconcile(self, done: Mapping[str, Sidecar], lines: Mapping[str, int]) -> int:
        """Make the file describe the shard's current input: add the rows of ``done`` items it lacks, drop torn
        lines, duplicates, rows of items no longer done (a quarantined sidecar) and rows of ids that are no longer
        in the input (``lines``: id -> current line number); returns how many rows were added.

        Rows of items finished by another process after ``done`` was read are kept: an item is judged by its
        sidecar at the moment of the check, under the file's lock, so a concurrent runner's appends survive.
        """
        wanted: dict[str, dict[str, Any]] = {}
        for item_id, sidecar in done.items():
            for row in image_rows(sidecar, lines[item_id]):
                wanted[row["file_name"]] = row
        with self.lock:
            rows, damaged = read_jsonl_tolerant(self.path)
            kept, seen, verdicts = [], set(), {}
            for row in rows:
                name, item_id = row.get("file_name"), row.get("id")
                if name in seen or not isinstance(item_id, str) or item_id not in lines:
                    continue
                if name not in wanted and item_id not in verdicts:
                    verdicts[item_id] = self.outputs.read_done(item_id, repair=False) is not None
                if name in wanted or verdicts.get(item_id):
                    kept.append(wanted.get(name, row))
                    seen.add(name)
            added = [row for name, row in wanted.items() if name not in seen]
            if damaged or added or kept != rows:
                data = b"".join(json_bytes(row, indent=None) for row in kept + added)
                write_atomic(self.path, data, self.outputs.tmp)
        return len(added)

    def append(self, rows: list[dict[str, Any]]) -> None:
        data = b"".join(json_bytes(row, indent=None) for row in rows)
        with self.lock, open(self.path, "ab+") as handle:
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    data = b"\n" + data  # a writer died mid-line: keep its torn line apart from ours
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
