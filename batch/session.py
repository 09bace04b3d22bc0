"""One process working on one shard: what the local and the remote runner share.

It reads the shard's lines, records invalid ones, skips done items, hands out jobs under claims
(deferring those another live process holds, and waiting for them at the end, so a successful
exit means the whole shard is finished), commits finished items, records failures, shows progress
and writes the summary. How images are made is the runner's business.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from batch.atomic import HOST, clean_temporary_files, temporary_path, write_atomic, write_fully
from batch.claims import ClaimBook
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_OK, EXIT_RETRIABLE, EXIT_STOPPED
from batch.jobs import InvalidLine, Job, load_shard
from batch.options import RunOptions
from batch.outputs import (
    OutputDir,
    ShardMetadata,
    build_sidecar,
    image_name,
    image_rows,
    job_error_record,
    json_bytes,
)
from core.errors import ConfigurationError, RetriesExhausted, WorkerError
from core.results import EncodedImage, GenerationMetadata

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 60.0
MAX_ITEM_ATTEMPTS = 3  # runs in which one line may fail with a retriable error before it counts as refused


@dataclass
class Counters:
    already_done: int = 0
    made: int = 0
    images: int = 0
    done_by_other: int = 0  # finished by another process while this one ran (claims, or a lost commit race)
    commits_lost: int = 0  # made here too, but another process committed the item first (its files were kept)
    failed_engine: int = 0  # non-retriable: the engine or endpoint refused the request
    failed_retriable: int = 0
    pipeline_calls: int = 0
    padded_images: int = 0
    failed_ids: set[str] = field(default_factory=set)


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


class ShardSession:
    """One process's pass over one shard. Use it as a context manager: ``with ShardSession(...) as session``.

    Entering starts the claims' heartbeat; leaving releases every claim and writes the summary
    (``session.summary``, with ``exit_code``), whatever happened in between.
    """

    def __init__(self, options: RunOptions, mode: str, settings: dict[str, Any] | None = None) -> None:
        self.options = options
        self.mode = mode
        self.settings = dict(settings or {})
        self.shard = options.shard
        self.created = self.started = time.perf_counter()
        self.stopping = threading.Event()
        self.abort_code: int | None = None
        self.abort_reason: str | None = None
        self.counters = Counters()
        self.summary: dict[str, Any] | None = None
        self._lock = threading.Lock()

        self.outputs = prepare_output_folder(options.out, options.min_free_mb)
        clean_temporary_files(self.outputs.tmp)
        self.outputs.record_layout(options.source, self.shard)
        try:
            self.input = load_shard(options.source, self.shard)
        except OSError as error:
            reason = error.strerror or error
            raise ConfigurationError(f"input file {options.source}: cannot read it ({reason})") from None
        done: dict[str, dict[str, Any]] = {}
        self.jobs: list[Job] = []
        for job in self.input.jobs:
            state = self.outputs.item_state(job)
            if state.changed:
                # An explicit id reused for another request: keeping the old images would be wrong, silently
                # replacing them would break "a done item never changes". The user decides.
                self.input.invalid.append(
                    InvalidLine(
                        job.line,
                        "changed_line",
                        f"id {job.id!r} was already made from a different request (see {job.id}.json); give the "
                        "changed line a new id, or delete that sidecar to make it again",
                        job.id,
                    )
                )
                continue
            self.jobs.append(job)
            if state.sidecar is not None:
                done[job.id] = state.sidecar
        self._clear_stale_errors(set(done))
        for invalid in self.input.invalid:
            self.outputs.write_invalid_line(invalid, options.source)
        self.counters.already_done = len(done)
        self._done_ids = set(done)
        self.metadata = ShardMetadata(self.outputs, self.shard)
        self.metadata.reconcile(done, {job.id: job.line for job in self.jobs})
        self.claims = ClaimBook(self.outputs.claims, self.outputs.tmp, options.claim_ttl_s)
        self._deferred: list[Job] = []
        self.progress: tqdm | None = None  # started by the first pass, after the runner's set-up (model load)
        self._timer: threading.Timer | None = None
        self._last_log = time.perf_counter()

    def __enter__(self) -> ShardSession:
        self.claims.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.claims.__exit__(*exc)
        self.summary = self._write_summary()

    def _clear_stale_errors(self, done: set[str]) -> None:
        """Remove this shard's error files that no longer describe a line of the input.

        Kept: a failure of the very item on that line now (same id, not done: it is tried again and
        its file replaced or removed then). Invalid lines are written again below. Everything else
        (a line since fixed, made, edited into another request, or removed by a shorter file) goes,
        so ``errors/`` and ``status`` describe the current input.
        """
        jobs = {job.line: job for job in self.jobs}
        invalid = {line.line for line in self.input.invalid}
        for line in self.outputs.error_lines():
            if not self.shard.owns(line) or line in invalid:
                continue
            job = jobs.get(line)
            if job is None or job.id in done or self.outputs.current_failure(job) is None:
                self.outputs.clear_error(line)

    # -- handing out jobs -----------------------------------------------------------------------

    @property
    def unfinished(self) -> int:
        """Jobs of the shard not done (by anyone) as far as this process knows."""
        with self._lock:
            return sum(1 for job in self.jobs if job.id not in self._done_ids)

    def begin(self) -> None:
        """Start the clock and the progress bar (items/s and ETA count from here, not from the model load)."""
        if self.progress is not None:
            return
        self.started = time.perf_counter()
        if self.options.max_seconds is not None:
            reason = f"--max-seconds {self.options.max_seconds:g} reached; run again to resume"
            self._timer = threading.Timer(self.options.max_seconds, self.abort, (EXIT_STOPPED, reason))
            self._timer.daemon = True
            self._timer.start()
        self.progress = tqdm(
            total=len(self.jobs),
            initial=len(self._done_ids),
            unit="item",
            desc=f"shard {self.shard}",
            disable=not self.options.progress,
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
        )

    def _advance(self) -> None:
        if self.progress is None:
            return
        self.progress.update(1)
        now = time.perf_counter()
        if self.progress.disable and now - self._last_log >= PROGRESS_LOG_S:
            # No bar (a pod's log, --no-progress): one line a minute with the same figures.
            self._last_log = now
            with self._lock:
                finished = len(self._done_ids) + len(self.counters.failed_ids)
                made = self.counters.made
            rate = made / (now - self.started) if now > self.started else 0.0
            left = len(self.jobs) - finished
            eta = f"{left / rate / 60:.1f} min" if rate > 0 else "unknown"
            log.info("shard %s: %d/%d items, %.3f items/s, ETA %s", self.shard, finished, len(self.jobs), rate, eta)

    def first_pass(self) -> Iterator[Job]:
        """The shard's unfinished jobs in line order, each claimed; those held by a live process are deferred."""
        self.begin()
        for job in self.jobs:
            if self.stopping.is_set():
                return
            if job.id in self._done_ids:
                continue
            if self.outputs.read_done(job.id) is not None:
                self._finished_elsewhere(job)
            elif self.claims.try_claim(job.id):
                yield job
            else:
                self._deferred.append(job)

    def deferred_rounds(self) -> Iterator[list[Job]]:
        """Jobs another process held, as they become claimable (its claim went stale or was released undone).

        Returns once each is done by someone; the caller must finish everything it holds before
        asking for the next round, or two runners would wait on each other's claims.
        """
        announced = False
        while self._deferred and not self.stopping.is_set():
            ready, waiting = [], []
            for job in self._deferred:
                if self.outputs.read_done(job.id) is not None:
                    self._finished_elsewhere(job)
                elif self.claims.try_claim(job.id):
                    ready.append(job)
                else:
                    waiting.append(job)
            self._deferred = waiting
            if ready:
                yield ready
            elif waiting:
                if not announced:
                    log.info("waiting for %d item(s) another process is making", len(waiting))
                    announced = True
                self.stopping.wait(self.options.poll_s)

    def _finished_elsewhere(self, job: Job) -> None:
        with self._lock:
            self._done_ids.add(job.id)
            self.counters.done_by_other += 1
        self._advance()

    # -- results ----------------------------------------------------------------------------------

    def finish_item(
        self, job: Job, images: list[EncodedImage], metadata: GenerationMetadata, generation: dict[str, Any]
    ) -> bool:
        """Commit a job's encoded images and its sidecar; True if this process's commit won."""
        records, files = [], []
        for index, image in enumerate(images):
            name = image_name(job.id, index, image.format)
            files.append((name, image.data))
            digest = hashlib.sha256(image.data).hexdigest()
            records.append({"file_name": name, "seed": image.seed, "sha256": digest, "size": len(image.data)})
        generation = {
            "mode": self.mode,
            "host": HOST,
            "pid": os.getpid(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **generation,
        }
        sidecar = build_sidecar(job, records, metadata, generation)
        result = self.outputs.commit(job.id, files, sidecar)
        if result.committed:
            self.metadata.append(image_rows(sidecar, job.line))
        self.outputs.clear_error(job.line)
        self.claims.release(job.id)
        self.claims.note_progress()
        with self._lock:
            self._done_ids.add(job.id)
            if result.committed:
                self.counters.made += 1
                self.counters.images += len(images)
            else:
                self.counters.done_by_other += 1
                self.counters.commits_lost += 1
        self._advance()
        return result.committed

    def fail_item(self, job: Job, error: WorkerError) -> None:
        """Record why ``job`` failed (``errors/line-<n>.json``); it stays not-done and is tried again next run.

        The error's kind decides whether it counts as retriable (exit code 1 once the shard is through)
        or as refused (exit code 3). The error file counts the item's failed attempts over runs: a retriable
        failure on the :data:`MAX_ITEM_ATTEMPTS`-th attempt is recorded as :class:`RetriesExhausted` (refused),
        so a line that fails the same way every time cannot keep a Kubernetes index retrying forever.
        """
        previous = self.outputs.current_failure(job)
        attempts = int((previous or {}).get("attempts", 1)) + 1 if previous else 1
        if error.retriable and attempts >= MAX_ITEM_ATTEMPTS:
            error = RetriesExhausted(
                f"line {job.line} failed on {attempts} attempts, the last with {error}; it is no longer retried "
                "automatically (exit code 3); fix the cause and run again to try it once more"
            )
        with self._lock:
            if job.id in self.counters.failed_ids:
                return
            self.counters.failed_ids.add(job.id)
            if error.retriable:
                self.counters.failed_retriable += 1
            else:
                self.counters.failed_engine += 1
        log.warning("line %d (%s) failed: %s", job.line, job.id, error)
        self.outputs.write_error({**job_error_record(job, error, self.mode), "attempts": attempts})
        self.claims.release(job.id)
        self.claims.note_progress()
        self._advance()

    def count_call(self, images: int, padded: int) -> None:
        self.claims.note_progress()
        with self._lock:
            self.counters.pipeline_calls += 1
            self.counters.padded_images += padded

    def abort(self, exit_code: int, reason: str) -> None:
        """Stop handing out work (SIGTERM, a dead endpoint, a refused API key); the first reason's code wins."""
        if self.abort_code is None:
            self.abort_code, self.abort_reason = exit_code, reason
            log.error("stopping: %s", reason)
        self.stopping.set()

    # -- the end ----------------------------------------------------------------------------------

    def _write_summary(self) -> dict[str, Any]:
        """Stop the clock and the progress bar, write the summary; returns it (with ``exit_code``)."""
        if self._timer is not None:
            self._timer.cancel()
        if self.progress is not None:
            self.progress.close()
        now = time.perf_counter()
        seconds = now - self.started
        counters = self.counters
        remaining = [job for job in self.jobs if job.id not in self._done_ids and job.id not in counters.failed_ids]
        if counters.failed_retriable or remaining:
            exit_code = self.abort_code if self.abort_code is not None else EXIT_RETRIABLE
        elif counters.failed_engine or self.input.invalid:
            exit_code = EXIT_INVALID_LINES
        else:
            exit_code = EXIT_OK
        summary = {
            "shard": str(self.shard),
            "mode": self.mode,
            "input": str(self.options.source),
            "lines": len(range(self.shard.index, self.input.total_lines, self.shard.count)),
            "items": len(self.jobs),
            "invalid_lines": len(self.input.invalid),
            "already_done": counters.already_done,
            "made": counters.made,
            "done_by_other": counters.done_by_other,
            "failed": counters.failed_engine,
            "failed_retriable": counters.failed_retriable,
            "remaining": len(remaining),
            "images": counters.images,
            "pipeline_calls": counters.pipeline_calls,
            "padded_images": counters.padded_images,
            "claims_taken_over": self.claims.taken_over,
            "commits_lost": counters.commits_lost,
            "seconds": round(seconds, 3),  # from the first job on (set-up such as the model load excluded)
            "setup_seconds": round(self.started - self.created, 3) if self.progress is not None else None,
            "items_per_s": round(counters.made / seconds, 4) if seconds > 0 else None,
            "images_per_s": round(counters.images / seconds, 4) if seconds > 0 else None,
            "exit_code": exit_code,
            "stopped": self.abort_reason,
            **self.settings,
        }
        write_atomic(self.outputs.shard_summary_path(self.shard), json_bytes(summary), self.outputs.tmp)
        return summary


def describe_summary(summary: dict[str, Any]) -> str:
    """A few human lines for the end of a run."""
    failed = summary["failed"] + summary["failed_retriable"] + summary["invalid_lines"]
    lines = [
        f"shard {summary['shard']}: {summary['made']} made, {summary['already_done']} already done, "
        f"{summary['done_by_other']} by another process, {failed} failed "
        f"({summary['invalid_lines']} invalid lines, {summary['failed']} refused, "
        f"{summary['failed_retriable']} retriable), {summary['remaining']} remaining",
        f"{summary['images']} images in {summary['seconds']:.1f} s ({summary['images_per_s'] or 0:.3f} images/s, "
        f"{summary['pipeline_calls']} pipeline calls, {summary['padded_images']} padding images); "
        f"exit code {summary['exit_code']}",
    ]
    if summary.get("stopped"):
        lines.append(f"stopped: {summary['stopped']}")
    if failed:
        lines.append("see errors/line-*.json in the output folder for each failed line")
    if summary["remaining"] or summary["failed_retriable"]:
        lines.append("run the same command again to resume: done items are kept, the rest is made")
    return "\n".join(lines)
