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

The files' contents are typed in :mod:`batch.records`; the imagefolder metadata is :mod:`batch.imagefolder`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from batch.atomic import create_exclusive, fsync_dir, temporary_path, write_atomic, write_fully
from batch.jobs import ID_PATTERN, InvalidKind, InvalidLine, Job, Shard
from batch.records import ErrorRecord, RunLayout, Sidecar, json_bytes, why_unreadable
from core.errors import ConfigurationError
from core.results import EXTENSIONS

log = logging.getLogger(__name__)

INTERNAL = "_batch"
COMMIT_LOCK_STRIPES = 64  # a few lock files for any number of items; two items rarely wait on one another
INVALID_KINDS = frozenset(typing.get_args(InvalidKind))


def image_name(item_id: str, index: int, output_format: str) -> str:
    """The image's path relative to the output folder (the imagefolder ``file_name``)."""
    return f"images/{item_id}-{index}.{EXTENSIONS[output_format]}"


@dataclass
class CommitResult:
    committed: bool  # False: another process committed this item first (its files were kept, ours discarded)
    sidecar: Sidecar


@dataclass(frozen=True)
class ItemState:
    """An item of the current input as the output folder has it."""

    sidecar: Sidecar | None  # the done sidecar, made from this very request
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

    def read_done(self, item_id: str, repair: bool = True) -> Sidecar | None:
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
            sidecar = Sidecar.from_json(data)
            if sidecar.status != "done" or sidecar.id != item_id:
                problem = "not a done sidecar of this item"
            else:
                for image in sidecar.images:
                    size = (self.root / image.file_name).stat().st_size
                    if size != image.size:
                        problem = f"{image.file_name} has {size} bytes, the sidecar says {image.size}"
                        break
        except FileNotFoundError as error:
            problem = f"image missing: {error.filename}"
        except ValueError as error:
            problem = f"unreadable sidecar ({why_unreadable(error)})"
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
        return ItemState(sidecar, changed=sidecar.request != job.request.model_dump(mode="json"))

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

    def commit(self, item_id: str, images: list[tuple[str, bytes]], sidecar: Sidecar) -> CommitResult:
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
                if create_exclusive(self.sidecar_path(item_id), sidecar.to_json(), self.tmp):
                    return CommitResult(True, sidecar)
                raise RuntimeError(f"{self.sidecar_path(item_id)} appeared while its commit lock was held")
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)

    # -- errors -------------------------------------------------------------------------------------

    def write_error(self, record: ErrorRecord) -> None:
        write_atomic(self.error_path(record.line), record.to_json(), self.tmp)

    def write_invalid_line(self, invalid: InvalidLine, source: Path) -> None:
        self.write_error(ErrorRecord.invalid(invalid, str(source)))

    def error_lines(self) -> list[int]:
        """The line numbers that have an error file."""
        lines = []
        for path in self.errors.glob("line-*.json"):
            number = path.stem.removeprefix("line-")
            if number.isdigit():
                lines.append(int(number))
        return sorted(lines)

    def current_failure(self, job: Job) -> ErrorRecord | None:
        """The error record of ``job``'s line when it is about this very item (same id) failing to generate.

        An error file left by an earlier version of the line (another id, or an invalid-line kind of a
        line that is valid now) says nothing about the current item.
        """
        record = self.read_error(job.line)
        if record is None or record.id != job.id or record.kind in INVALID_KINDS:
            return None
        return record

    def clear_error(self, line: int) -> None:
        path = self.error_path(line)
        if path.exists():
            path.unlink(missing_ok=True)
            fsync_dir(self.errors)

    def read_error(self, line: int) -> ErrorRecord | None:
        """The line's error record; None when there is none, or it is unreadable (it is written again)."""
        try:
            return ErrorRecord.from_json(self.error_path(line).read_bytes())
        except (OSError, ValueError):
            return None

    # -- run layout ---------------------------------------------------------------------------------

    def record_layout(self, source: Path, shard: Shard) -> None:
        """Remember the input and the shard count, for ``status``; a different count is allowed but noted."""
        layout = RunLayout(input=str(Path(source).resolve()), num_shards=shard.count)
        if create_exclusive(self.run_config, layout.to_json(), self.tmp):
            return
        current = self.read_layout()
        if current != layout:
            log.warning(
                "%s was made with %s; now %s. Items are keyed by id, so nothing is lost or made twice, "
                "but `status` reports shards of the latest layout",
                self.root,
                current.to_dict() if current else None,
                layout.to_dict(),
            )
            write_atomic(self.run_config, layout.to_json(), self.tmp)

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

    def read_layout(self) -> RunLayout | None:
        try:
            return RunLayout.from_json(self.run_config.read_bytes())
        except (OSError, ValueError):
            return None


def prepare_output_folder(out: Path, min_free_mb: float) -> OutputDir:
    """The output folder, created and proven writable with room to spare; else a ConfigurationError naming it.

    Checked before any work, so a folder that cannot take a single image (read-only, a file, a full
    disk) fails the run as a configuration error that no retry can fix, not as a crash that
    Kubernetes retries.
    """
    outputs = OutputDir(out)
    if outputs.root.exists() and not outputs.root.is_dir():
        raise ConfigurationError(f"--out {out}: is a file, not a folder; give a folder (it is created if missing)")
    try:
        outputs.create()
        # Every folder a run writes into, the top one (sidecars) included: a folder made read-only by itself
        # (chmod, an immutable attribute) leaves the ones below it writable.
        for folder in outputs.written_folders():
            probe = temporary_path(folder, "write-probe")
            write_fully(probe, b"probe", durable=False)
            probe.unlink()
    except OSError as error:
        raise ConfigurationError(
            f"--out {out}: cannot write there ({error.strerror or error}: {error.filename or out}); "
            "give a writable folder"
        ) from None
    free_mb = shutil.disk_usage(outputs.root).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigurationError(
            f"--out {out}: only {free_mb:.0f} MiB free, the run needs at least {min_free_mb:g} MiB "
            "(--min-free-mb); free some space or use another volume"
        )
    return outputs
