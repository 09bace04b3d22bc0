"""The local runner: the shard's jobs through one loaded engine, in GPU batches, with a writer thread.

The main thread plans calls (:mod:`batch.planner`) and runs them on the engine; a writer thread
has the images encoded (PNG/JPEG/WebP with their A1111 parameters, exactly as the worker does, in
encoder processes: see :mod:`batch.encoding` for why not in a thread) and commits them while the
GPU runs the next call. The queue between them holds two calls, so memory stays bounded when
writing is slower than generating.

Failures are judged by their kind (:func:`core.errors.from_exception`), never by their text:

- out of memory: the items of that call are recorded as retriable failures (never as done) and the
  run goes on; three such calls in a row stop it (exit code 1): the device is probably unusable;
- a CUDA error other than out-of-memory leaves the CUDA context unusable: the call's items are
  recorded and the run stops at once (exit code 1; a retry gets a fresh process, maybe a fresh node);
- anything else is the item's own failure (clip_skip too deep, a LoRA it cannot use, a NaN image,
  an image that cannot be encoded, a bug hit by one request): the line gets an error file and the run
  goes on. In a shared call the guilty request is found by running the call's jobs one by one.

Writing the outputs failing (a full or broken disk) stops the run (exit code 1): no later item could
be written either.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import traceback
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from batch.encoding import ImageEncoder
from batch.exit_codes import EXIT_RETRIABLE
from batch.jobs import Job
from batch.options import LocalEngineOptions
from batch.planner import Call, Planner, Unit, group_of, order_jobs, split_job
from batch.session import ShardSession
from core.errors import (
    ConfigurationError,
    CudaFailed,
    InvalidRequest,
    ModelFolderError,
    OutOfMemory,
    WorkerError,
    from_exception,
)
from core.results import EncodedImage, GenerationMetadata
from core.settings import Settings
from worker.generation.engine import Engine, GenerationResult
from worker.output.images import a1111_parameters

log = logging.getLogger(__name__)

MAX_FAILED_CALLS_IN_A_ROW = 3
WRITE_QUEUE_CALLS = 2


class RunAborted(Exception):
    """The device or the output folder looks unusable; stop and let the retry (a new pod, a new process) continue."""


def run_local(session: ShardSession, options: LocalEngineOptions) -> None:
    """Run the session's jobs on ``options.engine``, or on the model it names, loaded here."""
    try:
        engine = options.engine if options.engine is not None else load_engine(options)
        model = {"name": engine.model_name, "manifest_hash": engine.model_hash}
        session.settings["model"] = model
        conflict = session.outputs.pin_model(model, options.allow_model_change)
        if conflict:
            raise ConfigurationError(conflict)
        LocalRunner(session, engine, options.batch_size, options.deterministic, options.encode_workers).run()
    except RunAborted as error:
        session.abort(EXIT_RETRIABLE, str(error))


def load_engine(options: LocalEngineOptions) -> Engine:
    """The engine on ``options.model_dir``, else on the worker's folder (``MODEL_DIR``, or the volume/baked default).

    A folder that is missing or not a converted model is a configuration error (exit code 2); a
    failure another attempt may not repeat (a checkpoint download that failed, an error while
    loading) stops the run as retriable (exit code 1).
    """
    from worker.model.location import prepare_model_dir, resolve_refiner_dir

    settings = options.settings if options.settings is not None else Settings()
    if settings.warmup_batch_sizes != (options.batch_size,):
        # The run's calls all have --batch-size images (padded so): warm up (and compile) that shape, not the
        # worker's default of 1, else every call would run eagerly and a batch-1 compile would be wasted.
        log.info("warming up for this run's --batch-size %d (WARMUP_BATCH_SIZES is for the worker)", options.batch_size)
        settings = replace(settings, warmup_batch_sizes=(options.batch_size,))
    try:
        folder = options.model_dir if options.model_dir is not None else prepare_model_dir(settings)
        refiner = options.refiner_dir if options.refiner_dir is not None else resolve_refiner_dir(settings)
        return Engine(folder, offload=options.offload, settings=settings, refiner_dir=refiner)
    except ConfigurationError:
        raise
    except (ModelFolderError, ValueError, OSError) as error:
        # The folder is this run's own (--model or MODEL_DIR): to a job a broken folder is retriable on another
        # worker, to this run it is configuration.
        reason = error.message if isinstance(error, WorkerError) else error
        raise ConfigurationError(f"no model: {reason} (pass --model DIR or set MODEL_DIR)") from None
    except Exception as error:
        failure = from_exception(error)
        if not isinstance(error, WorkerError):
            log.error("loading the model failed:\n%s", traceback.format_exc())
        if not failure.retriable:
            raise ConfigurationError(f"no model: {failure}") from None
        raise RunAborted(f"the model could not be loaded: {failure}") from error


@dataclass
class _PendingItem:
    images: dict[int, EncodedImage]
    metadata: GenerationMetadata  # of the item's first call (the stable part is the same in each)
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
                index: self._encode(unit.job, image, seed, result.metadata)
                for index, image, seed in zip(unit.image_indices, result.images, result.seeds, strict=True)
            }
            submitted.append((unit, result, futures))
        for unit, result, futures in submitted:
            job = unit.job
            try:
                encoded = {index: future.result() for index, future in futures.items()}
            except Exception as error:  # this item's images cannot be encoded: its failure, not the run's
                self.drop(job.id)
                self.session.fail_item(job, from_exception(error))
                continue
            with self._lock:
                if job.id in self._dropped:
                    continue
                item = self._pending.setdefault(job.id, _PendingItem({}, result.metadata, generation))
                item.images.update(encoded)
                complete = len(item.images) == job.request.num_images
                if complete:
                    del self._pending[job.id]
            if complete:
                images = [item.images[k] for k in range(job.request.num_images)]
                # A request split over several calls: its metadata lists all of its images' seeds.
                metadata = item.metadata.with_stable(seeds=[image.seed for image in images])
                self.session.finish_item(job, images, metadata, item.generation)

    def _encode(self, job: Job, image: Any, seed: int, metadata: GenerationMetadata) -> Future[EncodedImage]:
        request, engine = job.request, self.engine
        loras, embeddings = metadata.stable["loras"], metadata.stable.get("embeddings", [])
        parameters = a1111_parameters(request, seed, engine.model_name, engine.model_hash, loras, embeddings)
        return self.encoder.submit(image, request.output_format, request.quality, seed, parameters)


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
        return self.engine.group_key(unit.request)

    def run(self) -> None:
        writer = ImageWriter(self.session, self.engine, ImageEncoder(self.encode_workers))
        self.writer = writer
        try:
            for job in self.session.first_pass(order_jobs):
                self._plan(job)
            self._flush()
            for jobs in self.session.deferred_rounds():
                for job in order_jobs(jobs):
                    self._plan(job)
                self._flush()
        except BaseException:
            with contextlib.suppress(RunAborted):
                writer.close()  # write what was made; the first error is the one to report
            raise
        writer.close()

    def _plan(self, job: Job) -> None:
        # Jobs come group by group (order_jobs): a new group ends the last one, whose partial calls go now.
        for call in self.planner.start_group(group_of(job)):
            self._execute(call)
        units = split_job(job)
        try:
            self.engine.check_request(job.request)
            keys = [None if job.per_call_noise else self._key(unit) for unit in units]
        except Exception as error:  # the prompt encoding runs here: a CUDA error can surface too
            failure = from_exception(error)
            self._fail_job(job, failure)
            if isinstance(failure, CudaFailed):
                raise RunAborted(f"the device looks unusable ({failure})") from error
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
            # Each denoising step keeps this process's claims alive: a slow call is not a hung process.
            results = self.engine.generate_group(call.requests, progress=self._note_step)
        except Exception as error:
            self._call_failed(call, from_exception(error), error)
            return
        self.failed_calls_in_a_row = 0
        padded = sum(request.num_images for request in call.padding)
        self.session.count_call(call.num_images, padded)
        generation = {"batch": {"images_in_call": call.num_images, "padding_images": padded}}
        self.writer.submit(call, results[: len(call.units)], generation)

    def _note_step(self, step: int, total: int) -> None:
        self.session.claims.note_progress()

    def _call_failed(self, call: Call, failure: WorkerError, error: Exception) -> None:
        jobs = {unit.job.id: unit.job for unit in call.units}
        if isinstance(failure, OutOfMemory | CudaFailed):
            log.error("a pipeline call of %d image(s) failed: %s", call.num_images, failure)
            if isinstance(failure, OutOfMemory):
                failure = OutOfMemory(f"{failure.message}; lower --batch-size")
            for job in jobs.values():
                self._fail_job(job, failure)
            self.failed_calls_in_a_row += 1
            if isinstance(failure, CudaFailed):
                raise RunAborted(f"the device looks unusable ({failure})") from error
            if self.failed_calls_in_a_row >= MAX_FAILED_CALLS_IN_A_ROW:
                raise RunAborted(f"{self.failed_calls_in_a_row} calls in a row ran out of memory ({failure})")
            self._release_cached_memory()
            return
        if len(jobs) == 1:
            if not isinstance(failure, InvalidRequest):  # a refusal is routine; anything else deserves its traceback
                log.error("line %d failed:\n%s", call.units[0].job.line, traceback.format_exc())
            self._fail_job(next(iter(jobs.values())), failure)
            return
        # A shared call failed for a reason of its own items: run each job's units alone (same padded shape)
        # to find the guilty ones.
        for job_id in jobs:
            self._execute(self.planner.make_call([unit for unit in call.units if unit.job.id == job_id]))

    @staticmethod
    def _release_cached_memory() -> None:
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _fail_job(self, job: Job, failure: WorkerError) -> None:
        self.planner.drop_job(job.id)
        self.writer.drop(job.id)
        self.session.fail_item(job, failure)
