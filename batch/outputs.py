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
    <out>/_batch/locks/commit-<nn>.lock            commit locks (an item's commit holds one of 64)

An item is committed under its commit lock: its images are written to temporary files first, then,
only if no done sidecar exists yet, renamed into place and the sidecar created last (exclusively),
so a sidecar never names a missing or partial image, and the files of a committed item never change:
when two processes finish the same item (a claim taken over from a process that stalled for longer
than the claim TTL, two pods of one index), the second finds the first's sidecar under the lock and
discards its own files. Only the winner appends its metadata rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from batch.atomic import create_exclusive, fsync_dir, temporary_path, write_atomic, write_fully
from batch.jobs import ID_PATTERN, InvalidKind, InvalidLine, Job, Shard
from core.errors import WorkerError
from core.results import EXTENSIONS, GenerationMetadata

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "sdxl-batch-item/1"
ERROR_FORMAT = "sdxl-batch-error/1"
INTERNAL = "_batch"
COMMIT_LOCK_STRIPES = 64  # a few lock files for any number of items; two items rarely wait on one another
INVALID_KINDS = frozenset(typing.get_args(InvalidKind))
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


def image_rows(sidecar: dict[str, Any], line: int | None = None) -> list[dict[str, Any]]:
    """The imagefolder rows (one per image) of a done item; deterministic, no timings.

    ``line``: the item's line in the current input (lines move when the file is edited; the
    sidecar keeps the line it was made from).
    """
    request = sidecar["request"]
    model = sidecar.get("metadata", {}).get("model", {})
    loras = ", ".join(f"{lora['name']}:{lora['scale']:g}" for lora in request.get("loras", []))
    rows = []
    for index, image in enumerate(sidecar["images"]):
        row = {
            "file_name": image["file_name"],
            "id": sidecar["id"],
            "image_index": index,
            "line": sidecar["line"] if line is None else line,
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
    committed: bool  # False: another process committed this item first (its files were kept, ours discarded)
    sidecar: dict[str, Any]


@dataclass(frozen=True)
class ItemState:
    """An item of the current input as the output folder has it."""

    sidecar: dict[str, Any] | None  # the done sidecar, made from this very request
    changed: bool = False  # a done sidecar exists under this id, but made from another request (the line was edited)

    @property
    def done(self) -> bool:
        return self.sidecar is not None and not self.changed


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
        self.locks = self.internal / "locks"
        self.run_config = self.internal / "run.json"

    def written_folders(self) -> tuple[Path, ...]:
        """Every folder a run creates files in."""
        folders = (self.images, self.errors, self.claims, self.tmp, self.shards, self.quarantine, self.locks)
        return (self.root, self.internal, *folders)

    def create(self) -> OutputDir:
        for folder in self.written_folders():
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
            with self._commit_lock(item_id):
                # Judged again under the lock: another process may have committed a good sidecar meanwhile.
                if self.read_done(item_id, repair=False) is None:
                    self._quarantine(path, problem)
        return None

    def item_state(self, job: Job, repair: bool = True) -> ItemState:
        """Whether ``job`` is done, judged against the current line (an edited line under a used id is not)."""
        sidecar = self.read_done(job.id, repair=repair)
        if sidecar is None:
            return ItemState(None)
        return ItemState(sidecar, changed=sidecar.get("request") != job.request.model_dump(mode="json"))

    def _quarantine(self, path: Path, problem: str) -> None:
        target = self.quarantine / f"{path.name}.{int(time.time())}.{os.getpid()}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return  # another process set it aside already
        log.warning("%s is damaged (%s); moved to %s and the item will be made again", path.name, problem, target)

    @contextlib.contextmanager
    def _commit_lock(self, item_id: str) -> Iterator[None]:
        stripe = int(hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:8], 16) % COMMIT_LOCK_STRIPES
        self.locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"commit-{stripe:02d}.lock")):
            yield

    # -- commit -------------------------------------------------------------------------------------

    def commit(self, item_id: str, images: list[tuple[str, bytes]], sidecar: dict[str, Any]) -> CommitResult:
        """Commit an item: its images, then its sidecar, unless it is done already. ``images``: (file_name, bytes).

        The slow part (writing and fsyncing the image bytes) happens before the lock; under it, the
        check for a done sidecar and the renames, so a done item's files are never replaced.
        """
        staged: list[tuple[Path, Path]] = []
        try:
            for file_name, data in images:
                final = self.root / file_name
                staged.append((temporary_path(self.tmp, final.name), final))
                write_fully(staged[-1][0], data, durable=True)
            with self._commit_lock(item_id):
                existing = self.read_done(item_id, repair=False)
                if existing is not None:
                    return CommitResult(False, existing)
                if self.sidecar_path(item_id).exists():
                    self._quarantine(self.sidecar_path(item_id), "a sidecar whose images are missing or damaged")
                for tmp, final in staged:
                    os.replace(tmp, final)  # only files of an item not done: leftovers of an attempt that died
                if staged:
                    fsync_dir(self.images)  # the images' names are durable before the sidecar that lists them
                if create_exclusive(self.sidecar_path(item_id), json_bytes(sidecar), self.tmp):
                    return CommitResult(True, sidecar)
                raise RuntimeError(f"{self.sidecar_path(item_id)} appeared while its commit lock was held")
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)

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

    def error_lines(self) -> list[int]:
        """The line numbers that have an error file."""
        lines = []
        for path in self.errors.glob("line-*.json"):
            number = path.stem.removeprefix("line-")
            if number.isdigit():
                lines.append(int(number))
        return sorted(lines)

    def current_failure(self, job: Job) -> dict[str, Any] | None:
        """The error record of ``job``'s line when it is about this very item (same id) failing to generate.

        An error file left by an earlier version of the line (another id, or an invalid-line kind of a
        line that is valid now) says nothing about the current item.
        """
        record = self.read_error(job.line)
        if record is None or record.get("id") != job.id or record.get("kind") in INVALID_KINDS:
            return None
        return record

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

    def reconcile(self, done: Mapping[str, dict[str, Any]], lines: Mapping[str, int]) -> int:
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


def job_error_record(job: Job, error: WorkerError, mode: str) -> dict[str, Any]:
    """The error file of a line that failed to generate. ``kind``: ``retriable_error``, else who refused it."""
    kind = "retriable_error" if error.retriable else ("remote_error" if mode == "remote" else "engine_error")
    return {
        "line": job.line,
        "id": job.id,
        "kind": kind,
        "code": error.code,
        "error": str(error),
        "retriable": error.retriable,
    }


def build_sidecar(
    job: Job, images: list[dict[str, Any]], metadata: GenerationMetadata, generation: dict[str, Any]
) -> dict[str, Any]:
    """The sidecar of a done item. ``images``: one {file_name, seed, sha256, size} per image, in order.

    ``metadata`` keeps only the stable part (what follows from the request and the model), so it is
    identical whichever process, machine or run made the item; timings and the volatile part (device,
    cache hits) go to ``generation`` with the other facts of this particular run.
    """
    return {
        "format": SIDECAR_FORMAT,
        "id": job.id,
        "line": job.line,
        "status": "done",
        "request": job.request.model_dump(mode="json"),
        "seed": job.request.seed,
        "seed_source": job.seed_source,
        "images": images,
        "metadata": metadata.stable,
        "generation": {**generation, **metadata.volatile, "timings": metadata.timings.to_dict()},
    }
