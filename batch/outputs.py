"""The output folder of a batch run: where every file goes, and the rules that make it resumable.

::

    <out>/images/<id>-<k>.<ext>        image k of item <id>
    <out>/<id>.json                    the item's sidecar: full metadata; its presence means "done"
    <out>/errors/line-<n>.json         why line n failed (invalid line, or the engine refused it)
    <out>/metadata.jsonl               Hugging Face imagefolder metadata of the whole run (``merge``)
    <out>/_batch/run.json              the run's layout (input file, number of shards)
    <out>/_batch/shards/metadata-<I>-of-<N>.jsonl   per-shard imagefolder metadata, appended as items finish
    <out>/_batch/shards/summary-<I>-of-<N>.json     the last run's summary for that shard
    <out>/_batch/claims/, tmp/, quarantine/         claims, temporary files, damaged sidecars set aside

Images are written first, the sidecar last, each atomically (see :mod:`batch.atomic`), so a
sidecar never names a missing or partial image. The sidecar is created exclusively: when two
processes finish the same item, one commit wins and only the winner appends its metadata rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from batch.atomic import create_exclusive, fsync_dir, write_atomic
from batch.jobs import ID_PATTERN, InvalidLine, Job, Shard

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "sdxl-batch-item/1"
ERROR_FORMAT = "sdxl-batch-error/1"
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
INTERNAL = "_batch"
# Columns of every imagefolder row, always all present (datasets wants one schema for all rows).
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


def json_bytes(value: Any, indent: int | None = 2) -> bytes:
    return (json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def image_name(item_id: str, index: int, output_format: str) -> str:
    """The image's path relative to the output folder (the imagefolder ``file_name``)."""
    return f"images/{item_id}-{index}.{EXTENSIONS[output_format]}"


def image_rows(sidecar: dict[str, Any]) -> list[dict[str, Any]]:
    """The imagefolder rows (one per image) of a done item; deterministic, no timings."""
    request = sidecar["request"]
    model = sidecar.get("metadata", {}).get("model", {})
    loras = ", ".join(f"{lora['name']}:{lora['scale']:g}" for lora in request.get("loras", []))
    rows = []
    for index, image in enumerate(sidecar["images"]):
        row = {
            "file_name": image["file_name"],
            "id": sidecar["id"],
            "image_index": index,
            "line": sidecar["line"],
            "seed": image["seed"],
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


@dataclass
class CommitResult:
    committed: bool  # False: another process committed this item first (its files are the same)
    sidecar: dict[str, Any]


class OutputDir:
    """One batch output folder (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.errors = self.root / "errors"
        self.internal = self.root / INTERNAL
        self.claims = self.internal / "claims"
        self.tmp = self.internal / "tmp"
        self.shards = self.internal / "shards"
        self.quarantine = self.internal / "quarantine"
        self.run_config = self.internal / "run.json"

    def create(self) -> OutputDir:
        for folder in (self.images, self.errors, self.claims, self.tmp, self.shards, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    # -- names --------------------------------------------------------------------------------------

    def sidecar_path(self, item_id: str) -> Path:
        return self.root / f"{item_id}.json"

    def error_path(self, line: int) -> Path:
        return self.errors / f"line-{line:08d}.json"

    def shard_metadata_path(self, shard: Shard) -> Path:
        return self.shards / f"metadata-{shard.name}.jsonl"

    def shard_summary_path(self, shard: Shard) -> Path:
        return self.shards / f"summary-{shard.name}.json"

    def sidecar_paths(self) -> list[Path]:
        """Every item sidecar (ids start with a letter or digit; nothing else at the top level matches)."""
        return sorted(
            path for path in self.root.glob("*.json") if path.is_file() and ID_PATTERN.fullmatch(path.stem) is not None
        )

    # -- done markers ---------------------------------------------------------------------------------

    def read_done(self, item_id: str, repair: bool = True) -> dict[str, Any] | None:
        """The item's sidecar when the item is completely done, else None.

        Done means: the sidecar parses, says ``done``, and every image it lists exists with the
        recorded size. A damaged sidecar (a disk that lost data, a hand edit) is moved to
        ``_batch/quarantine`` when ``repair`` is set, so the item is made again instead of being
        taken for done.
        """
        path = self.sidecar_path(item_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        problem = None
        try:
            sidecar = json.loads(data)
            if not isinstance(sidecar, dict) or sidecar.get("status") != "done" or sidecar.get("id") != item_id:
                problem = "not a done sidecar of this item"
            else:
                for image in sidecar["images"]:
                    size = (self.root / image["file_name"]).stat().st_size
                    if size != image["size"]:
                        problem = f"{image['file_name']} has {size} bytes, the sidecar says {image['size']}"
                        break
        except FileNotFoundError as error:
            problem = f"image missing: {error.filename}"
        except (ValueError, KeyError, TypeError) as error:
            problem = f"unreadable sidecar ({type(error).__name__}: {error})"
        if problem is None:
            return sidecar
        if repair:
            self._quarantine(path, problem)
        return None

    def _quarantine(self, path: Path, problem: str) -> None:
        target = self.quarantine / f"{path.name}.{int(time.time())}.{os.getpid()}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return  # another process set it aside already
        log.warning("%s is damaged (%s); moved to %s and the item will be made again", path.name, problem, target)

    # -- commit -------------------------------------------------------------------------------------

    def commit(self, item_id: str, images: list[tuple[str, bytes]], sidecar: dict[str, Any]) -> CommitResult:
        """Write the images, then the sidecar (exclusively). ``images``: (file_name, bytes) pairs."""
        for file_name, data in images:
            write_atomic(self.root / file_name, data, self.tmp, durable=True, sync_folder=False)
        if images:
            fsync_dir(self.images)  # the images' names are durable before the sidecar that lists them appears
        created = create_exclusive(self.sidecar_path(item_id), json_bytes(sidecar), self.tmp)
        if created:
            return CommitResult(True, sidecar)
        existing = self.read_done(item_id, repair=False)
        return CommitResult(False, existing if existing is not None else sidecar)

    # -- errors -------------------------------------------------------------------------------------

    def write_error(self, record: dict[str, Any]) -> None:
        write_atomic(self.error_path(record["line"]), json_bytes({"format": ERROR_FORMAT, **record}), self.tmp)

    def write_invalid_line(self, invalid: InvalidLine, source: Path) -> None:
        self.write_error(
            {
                "line": invalid.line,
                "id": invalid.id,
                "kind": invalid.kind,
                "error": invalid.message,
                "retriable": False,
                "input": str(source),
            }
        )

    def clear_error(self, line: int) -> None:
        path = self.error_path(line)
        if path.exists():
            path.unlink(missing_ok=True)
            fsync_dir(self.errors)

    def read_error(self, line: int) -> dict[str, Any] | None:
        try:
            value = json.loads(self.error_path(line).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    # -- run layout ---------------------------------------------------------------------------------

    def record_layout(self, source: Path, shard: Shard) -> None:
        """Remember the input and the shard count, for ``status``; a different count is allowed but noted."""
        layout = {"input": str(Path(source).resolve()), "num_shards": shard.count}
        if create_exclusive(self.run_config, json_bytes(layout), self.tmp):
            return
        current = self.read_layout() or {}
        if current != layout:
            log.warning(
                "%s was made with %s; now %s. Items are keyed by id, so nothing is lost or made twice, "
                "but `status` reports shards of the latest layout",
                self.root,
                current,
                layout,
            )
            write_atomic(self.run_config, json_bytes(layout), self.tmp)

    def pin_model(self, model: dict[str, Any], allow_change: bool = False) -> str | None:
        """Record the model of the first local run; returns a message when this run's model differs."""
        path = self.internal / "model.json"
        if create_exclusive(path, json_bytes(model), self.tmp):
            return None
        try:
            pinned = json.loads(path.read_bytes())
        except (OSError, ValueError):
            pinned = None
        if pinned == model:
            return None
        if allow_change:
            write_atomic(path, json_bytes(model), self.tmp)
            return None
        return (
            f"{self.root} holds images of model {pinned}, this run loads {model}; "
            "use another --out, or pass --allow-model-change to mix them"
        )

    def read_layout(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.run_config.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None


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

    def reconcile(self, done: Iterable[dict[str, Any]]) -> int:
        """Add the rows of ``done`` items the file lacks, drop torn lines, duplicates and rows of items no longer
        done (a quarantined sidecar); returns how many rows were added.

        Rows of items finished by another process after ``done`` was read are kept: an item is judged by its
        sidecar at the moment of the check, under the file's lock, so a concurrent runner's appends survive.
        """
        wanted: dict[str, dict[str, Any]] = {}
        for sidecar in done:
            for row in image_rows(sidecar):
                wanted[row["file_name"]] = row
        with self.lock:
            rows, damaged = read_jsonl_tolerant(self.path)
            kept, seen, verdicts = [], set(), {}
            for row in rows:
                name, item_id = row.get("file_name"), row.get("id")
                if name in seen or not isinstance(item_id, str):
                    continue
                if name not in wanted and item_id not in verdicts:
                    verdicts[item_id] = self.outputs.read_done(item_id, repair=False) is not None
                if name in wanted or verdicts.get(item_id):
                    kept.append(wanted.get(name, row))
                    seen.add(name)
            added = [row for name, row in wanted.items() if name not in seen]
            if damaged or added or len(kept) != len(rows):
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


def job_error_record(job: Job, kind: str, message: str, retriable: bool) -> dict[str, Any]:
    return {"line": job.line, "id": job.id, "kind": kind, "error": message, "retriable": retriable}


# Metadata keys that differ from run to run (timings, cache state): kept in the sidecar's ``generation``
# section, so ``request``, ``images`` and ``metadata`` are identical whichever process or run made the item.
VOLATILE_METADATA_KEYS = ("timings", "returned_as")


def build_sidecar(
    job: Job, images: list[dict[str, Any]], metadata: dict[str, Any], generation: dict[str, Any]
) -> dict[str, Any]:
    """The sidecar of a done item. ``images``: one {file_name, seed, sha256, size} per image, in order."""
    stable = dict(metadata)
    volatile = {key: stable.pop(key) for key in VOLATILE_METADATA_KEYS if key in stable}
    if isinstance(stable.get("prompt"), dict) and "cache_hit" in stable["prompt"]:
        stable["prompt"] = {key: value for key, value in stable["prompt"].items() if key != "cache_hit"}
    return {
        "format": SIDECAR_FORMAT,
        "id": job.id,
        "line": job.line,
        "status": "done",
        "request": job.request.model_dump(mode="json"),
        "seed": job.request.seed,
        "seed_source": job.seed_source,
        "images": images,
        "metadata": stable,
        "generation": {**generation, **volatile},
    }
