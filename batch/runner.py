"""The local runner: the shard's jobs through one loaded engine, in GPU batches, with a writer thread.

The main thread plans calls (:mod:`batch.planner`) and runs them on the engine; a writer thread
has the images encoded (PNG/JPEG/WebP with their A1111 parameters, exactly as the worker does, in
encoder processes: see :mod:`batch.encoding` for why not in a thread) and commits them while the
GPU runs the next call. The queue between them holds two calls, so memory stays bounded when
writing is slower than generating.

Failures. ``EngineError`` means the engine cannot run a request as asked (clip_skip too deep, a
LoRA it cannot find, a NaN image): the line gets an error sidecar and the run goes on; in a
shared call the guilty request is found by running the call's jobs one by one. Any other exception
(out of memory, a CUDA error) is retriable: the items of that call are recorded as such, never as
done; a CUDA error other than OOM, or three failing calls in a row, stops the run (exit code 1)
because the device is probably unusable.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import traceback
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from batch.encoding import ImageEncoder
from batch.jobs import Job
from batch.planner import Call, Planner, Unit, split_job
from batch.session import ShardSession
from worker.engine import Engine, EngineError, GenerationResult, group_key
from worker.images import a1111_parameters

log = logging.getLogger(__name__)

MAX_FAILED_CALLS_IN_A_ROW = 3
WRITE_QUEUE_CALLS = 2


class RunAborted(Exception):
    """The device or the output folder looks unusable; stop and let the retry (a new pod, a new process) continue."""


def is_fatal_device_error(error: BaseException) -> bool:
    """A CUDA error other than out-of-memory leaves the context unusable: no further call can succeed."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return False
    return isinstance(error, RuntimeError) and ("CUDA error" in str(error) or "cuDNN" in str(error))


@dataclass
class _PendingItem:
    images: dict[int, tuple[bytes, int]]
    metadata: dict[str, Any]
    generation: dict[str, Any]


class ImageWriter:
    """Encodes and commits finished calls on its own thread."""

    def __init__(self, session: ShardSession, engine: Engine, encoder: ImageEncoder) -> None:
        self.session = session
        self.engine = engine
        self.encoder = encoder
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[Call, list[GenerationResult], dict[str, Any]] | None] = queue.Queue(
            maxsize=WRITE_QUEUE_CALLS
        )
        self._pending: dict[str, _PendingItem] = {}
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="batch-writer", daemon=True)
        self._thread.start()

    def submit(self, call: Call, results: list[GenerationResult], generation: dict[str, Any]) -> None:
        if self.error is not None:
            raise RunAborted(f"writing outputs failed: {self.error}") from self.error
        self._queue.put((call, results, generation))

    def drop(self, job_id: str) -> None:
        """Forget a job that failed in another call (its images from earlier calls are discarded)."""
        with self._lock:
            self._dropped.add(job_id)
            self._pending.pop(job_id, None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.encoder.close()
        if self.error is not None:
            raise RunAborted(f"writing outputs failed: {self.error}") from self.error

    def _work(self) -> None:
        while (entry := self._queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the main thread never blocks on a dead writer
            try:
                self._write(*entry)
            except BaseException as error:
                log.error("writer failed:\n%s", traceback.format_exc())
                self.error = error

    def _write(self, call: Call, results: list[GenerationResult], generation: dict[str, Any]) -> None:
        # All images of the call go to the encoder processes at once, then are collected in order.
        submitted = []
        for unit, result in zip(call.units, results, strict=True):
            with self._lock:
                if unit.job.id in self._dropped:
                    continue
            futures = {
                index: (self._encode(unit.job, image, seed, result.metadata), seed)
                for index, image, seed in zip(unit.image_indices, result.images, result.seeds, strict=True)
            }
            submitted.append((unit, result, futures))
        for unit, result, futures in submitted:
            job = unit.job
            encoded = {index: (future.result(), seed) for index, (future, seed) in futures.items()}
            with self._lock:
                if job.id in self._dropped:
                    continue
                item = self._pending.setdefault(job.id, _PendingItem({}, result.metadata, generation))
                item.images.update(encoded)
                complete = len(item.images) == job.request.num_images
                if complete:
                    del self._pending[job.id]
            if complete:
                metadata = dict(item.metadata)
                metadata["seeds"] = [item.images[k][1] for k in range(job.request.num_images)]
                metadata["output_format"] = job.request.output_format
                images = [item.images[k] for k in range(job.request.num_images)]
                self.session.finish_item(job, images, metadata, item.generation)

    def _encode(self, job: Job, image: Any, seed: int, metadata: dict[str, Any]) -> Future[bytes]:
        request = job.request
        parameters = a1111_parameters(request, seed, self.engine.model_name, self.engine.model_hash, metadata["loras"])
        return self.encoder.submit(image, request.output_format, request.quality, parameters)


class LocalRunner:
    """Runs a session's jobs on ``engine`` in calls of ``batch_size`` images."""

    def __init__(
        self,
        session: ShardSession,
        engine: Engine,
        batch_size: int = 1,
        deterministic: bool = True,
        encode_workers: int | None = None,
    ) -> None:
        self.session = session
        self.engine = engine
        self.encode_workers = encode_workers
        self.batch_size = batch_size
        self.deterministic = deterministic
        self.planner = Planner(batch_size, pad=deterministic, key_of=self._key)
        self.failed_calls_in_a_row = 0

    def _key(self, unit: Unit) -> Hashable:
        return group_key(unit.request, self.engine.encode(unit.request))

    def run(self) -> None:
        writer = ImageWriter(self.session, self.engine, ImageEncoder(self.encode_workers))
        self.writer = writer
        try:
            for job in self.session.first_pass():
                self._plan(job)
            self._flush()
            for jobs in self.session.deferred_rounds():
                for job in jobs:
                    self._plan(job)
                self._flush()
        except BaseException:
            with contextlib.suppress(RunAborted):
                writer.close()  # write what was made; the first error is the one to report
            raise
        writer.close()

    def _plan(self, job: Job) -> None:
        units = split_job(job)
        try:
            self.engine.check_request(job.request)
            keys = [None if job.per_call_noise else self._key(unit) for unit in units]
        except EngineError as error:
            self.session.fail_item(job, "engine_error", str(error), retriable=False)
            return
        for unit, key in zip(units, keys, strict=True):
            for call in self.planner.add(unit, key):
                self._execute(call)

    def _flush(self) -> None:
        if self.session.stopping.is_set():
            return  # SIGTERM: finish what is in flight, start nothing new
        for call in self.planner.flush():
            self._execute(call)

    def _execute(self, call: Call) -> None:
        failed = self.session.counters.failed_ids
        units = [unit for unit in call.units if unit.job.id not in failed]
        if not units or self.session.stopping.is_set():
            return
        if len(units) != len(call.units):
            call = self.planner.make_call(units)  # same padded shape as any other call
        try:
            results = self.engine.generate_group(call.requests)
        except EngineError as error:
            self._isolate(call, error)
            return
        except Exception as error:
            self._call_failed(call, error)
            return
        self.failed_calls_in_a_row = 0
        padded = sum(request.num_images for request in call.padding)
        self.session.count_call(call.num_images, padded)
        generation = {"batch": {"images_in_call": call.num_images, "padding_images": padded}}
        self.writer.submit(call, results[: len(call.units)], generation)

    def _isolate(self, call: Call, error: EngineError) -> None:
        """A shared call was refused: run each job's units alone (same padded shape) to find the guilty ones."""
        jobs = {unit.job.id: unit.job for unit in call.units}
        if len(jobs) == 1:
            self._fail_job(next(iter(jobs.values())), "engine_error", str(error), retriable=False)
            return
        for job_id in jobs:
            self._execute(self.planner.make_call([unit for unit in call.units if unit.job.id == job_id]))

    def _call_failed(self, call: Call, error: Exception) -> None:
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log.error("a pipeline call of %d image(s) failed:\n%s", call.num_images, traceback.format_exc())
        hint = "; lower --batch-size" if "memory" in message.lower() else ""
        for job in {unit.job.id: unit.job for unit in call.units}.values():
            self._fail_job(job, "retriable_error", message + hint, retriable=True)
        self.failed_calls_in_a_row += 1
        if is_fatal_device_error(error) or self.failed_calls_in_a_row >= MAX_FAILED_CALLS_IN_A_ROW:
            raise RunAborted(message) from error
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    def _fail_job(self, job: Job, kind: str, message: str, retriable: bool) -> None:
        self.planner.drop_job(job.id)
        self.writer.drop(job.id)
        self.session.fail_item(job, kind, message, retriable)
