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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch.atomic import HOST, clean_temporary_files, write_atomic
from batch.claims import ClaimBook
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_OK, EXIT_RETRIABLE, EXIT_STOPPED
from batch.imagefolder import ShardMetadata, image_rows
from batch.jobs import InvalidLine, Job, Shard, ShardInput, load_shard
from batch.options import RunOptions
from batch.outputs import OutputDir, image_name, prepare_output_folder
from batch.progress import ShardProgress
from batch.records import ErrorRecord, ImageRecord, ShardSummary, Sidecar, changed_line_message
from core.errors import ConfigurationError, RetriesExhausted, WorkerError
from core.results import EncodedImage, GenerationMetadata

log = logging.getLogger(__name__)

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


def open_shard(outputs: OutputDir, source: Path, shard: Shard) -> tuple[ShardInput, list[Job], dict[str, Sidecar]]:
    """The shard's input as the output folder has it: the input (with a changed line counted invalid), the jobs to
    judge, and those done already (id -> sidecar). Error files that no longer describe a line are removed, and
    the invalid lines' files written."""
    try:
        shard_input = load_shard(source, shard)
    except OSError as error:
        raise ConfigurationError(f"input file {source}: cannot read it ({error.strerror or error})") from None
    done: dict[str, Sidecar] = {}
    jobs: list[Job] = []
    for job in shard_input.jobs:
        state = outputs.item_state(job)
        if state.changed:
            # An explicit id reused for another request: keeping the old images would be wrong, silently
            # replacing them would break "a done item never changes". The user decides.
            shard_input.invalid.append(InvalidLine(job.line, "changed_line", changed_line_message(job.id), job.id))
            continue
        jobs.append(job)
        if state.sidecar is not None:
            done[job.id] = state.sidecar
    _clear_stale_errors(outputs, shard, shard_input, jobs, set(done))
    for invalid in shard_input.invalid:
        outputs.write_invalid_line(invalid, source)
    return shard_input, jobs, done


def _clear_stale_errors(
    outputs: OutputDir, shard: Shard, shard_input: ShardInput, jobs: list[Job], done: set[str]
) -> None:
    """Remove this shard's error files that no longer describe a line of the input.

    Kept: a failure of the very item on that line now (same id, not done: it is tried again and
    its file replaced or removed then). Invalid lines are written again after this. Everything else
    (a line since fixed, made, edited into another request, or removed by a shorter file) goes,
    so ``errors/`` and ``status`` describe the current input.
    """
    by_line = {job.line: job for job in jobs}
    invalid = {line.line for line in shard_input.invalid}
    for line in outputs.error_lines():
        if not shard.owns(line) or line in invalid:
            continue
        job = by_line.get(line)
        if job is None or job.id in done or outputs.current_failure(job) is None:
            outputs.clear_error(line)


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
        self.summary: ShardSummary | None = None
        self._lock = threading.Lock()

        self.outputs = prepare_output_folder(options.out, options.min_free_mb)
        clean_temporary_files(self.outputs.tmp)
        self.outputs.record_layout(options.source, self.shard)
        self.input, self.jobs, done = open_shard(self.outputs, options.source, self.shard)
        self.counters.already_done = len(done)
        self._done_ids = set(done)
        self.metadata = ShardMetadata(self.outputs, self.shard)
        self.metadata.reconcile(done, {job.id: job.line for job in self.jobs})
        self.claims = ClaimBook(self.outputs.claims, self.outputs.tmp, options.claim_ttl_s)
        self._deferred: list[Job] = []
        self.progress: ShardProgress | None = None  # started by the first pass, after the runner's set-up
        self._timer: threading.Timer | None = None

    def __enter__(self) -> ShardSession:
        self.claims.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.claims.__exit__(*exc)
        self.summary = self._write_summary()

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
        self.progress = ShardProgress(str(self.shard), len(self.jobs), len(self._done_ids), self.options.progress)

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self._figures)

    def _figures(self) -> tuple[int, int]:
        with self._lock:
            return len(self._done_ids) + len(self.counters.failed_ids), self.counters.made

    def first_pass(self, order: Callable[[list[Job]], list[Job]] | None = None) -> Iterator[Job]:
        """The shard's unfinished jobs in line order (or as ``order`` arranges them), each claimed when it is handed
        out; those held by a live process are deferred."""
        self.begin()
        for job in self.jobs if order is None else order(self.jobs):
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
            records.append(ImageRecord(file_name=name, seed=image.seed, sha256=digest, size=len(image.data)))
        generation = {
            "mode": self.mode,
            "host": HOST,
            "pid": os.getpid(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **generation,
        }
        sidecar = Sidecar.build(job, records, metadata, generation)
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
        attempts = (previous.attempts or 1) + 1 if previous else 1
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
        self.outputs.write_error(ErrorRecord.failure(job, error, self.mode, attempts))
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

    def _write_summary(self) -> ShardSummary:
        """Stop the clock and the progress bar, write the summary; returns it."""
        if self._timer is not None:
            self._timer.cancel()
        if self.progress is not None:
            self.progress.close()
        seconds = time.perf_counter() - self.started
        counters = self.counters
        remaining = [job for job in self.jobs if job.id not in self._done_ids and job.id not in counters.failed_ids]
        if counters.failed_retriable or remaining:
            exit_code = self.abort_code if self.abort_code is not None else EXIT_RETRIABLE
        elif counters.failed_engine or self.input.invalid:
            exit_code = EXIT_INVALID_LINES
        else:
            exit_code = EXIT_OK
        summary = ShardSummary(
            shard=str(self.shard),
            mode=self.mode,
            input=str(self.options.source),
            lines=len(range(self.shard.index, self.input.total_lines, self.shard.count)),
            items=len(self.jobs),
            invalid_lines=len(self.input.invalid),
            already_done=counters.already_done,
            made=counters.made,
            done_by_other=counters.done_by_other,
            failed=counters.failed_engine,
            failed_retriable=counters.failed_retriable,
            remaining=len(remaining),
            images=counters.images,
            pipeline_calls=counters.pipeline_calls,
            padded_images=counters.padded_images,
            claims_taken_over=self.claims.taken_over,
            commits_lost=counters.commits_lost,
            seconds=round(seconds, 3),
            setup_seconds=round(self.started - self.created, 3) if self.progress is not None else None,
            items_per_s=round(counters.made / seconds, 4) if seconds > 0 else None,
            images_per_s=round(counters.images / seconds, 4) if seconds > 0 else None,
            exit_code=exit_code,
            stopped=self.abort_reason,
            **self.settings,
        )
        write_atomic(self.outputs.shard_summary_path(self.shard), summary.to_json(), self.outputs.tmp)
        return summary
