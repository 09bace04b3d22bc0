"""The RunPod handler: job input -> validated request -> engine -> encoded images -> output.

Every failure becomes one :class:`core.errors.WorkerError` kind, returned as a string in ``error``
(RunPod's convention), never a traceback; kinds that leave the CUDA context unusable also set
``refresh_worker`` so RunPod replaces the worker after the job.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.errors import ModelLoadFailed, ModelMissing, WorkerError, first_line, from_exception
from core.results import EncodedImage
from core.settings import Settings
from worker.generation.engine import Engine, GenerationResult
from worker.model.prefetch import PrefetchReport
from worker.output.delivery import deliver
from worker.output.images import a1111_parameters, encode_image
from worker.request.schema import parse_request

log = logging.getLogger(__name__)

PROGRESS_EVERY_STEPS = 5


def _startup_error(error: BaseException) -> WorkerError:
    from model_build.errors import ConversionError

    # Checked first: a converter error is a WorkerError of its own kind, but to a job it means "no model".
    if isinstance(error, ConversionError | FileNotFoundError):
        return ModelMissing(first_line(error))
    if isinstance(error, WorkerError):
        return error
    return ModelLoadFailed(f"{type(error).__name__}: {first_line(error)}")


class Worker:
    """One worker process: its settings, its engine (or why it has none), and the job handler."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()  # defaults: commands read the environment
        self.engine: Engine | None = None
        self.startup_error: WorkerError | None = ModelMissing("the model has not been loaded yet")
        self.prefetch: PrefetchReport | None = None  # what worker.__main__'s weight prefetch read, if it ran

    def start(self, model_dir: Path | str | None = None, refiner_dir: Path | str | None = None) -> None:
        """Load the engine once; on failure remember the error for every job (logged once)."""
        from worker.model.location import prepare_model_dir, resolve_refiner_dir

        try:
            if model_dir is None:
                model_dir = prepare_model_dir(self.settings)
                refiner_dir = refiner_dir if refiner_dir is not None else resolve_refiner_dir(self.settings)
            self.engine = Engine(model_dir, settings=self.settings, refiner_dir=refiner_dir)
            self.startup_error = None
        except Exception as error:  # still answer every job, with the reason
            self.engine, self.startup_error = None, _startup_error(error)
            log.error("%s", self.startup_error)
            if isinstance(self.startup_error, ModelLoadFailed):
                log.error("%s", traceback.format_exc())

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """RunPod's handler: a job in, an output (or ``{"error": ...}``) out."""
        job_id = str(job.get("id", "local"))
        started = time.perf_counter()
        try:
            request = parse_request(job.get("input"), max_job_pixels=self.settings.max_job_pixels)
            if self.engine is None:
                raise self.startup_error or ModelMissing("set MODEL_DIR to a converted folder")
            result = self.engine.generate(request, progress=self._progress_reporter(job))
            output = self.render(job_id, result)
        except Exception as error:
            failure = from_exception(error)
            if not isinstance(error, WorkerError):
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            if failure.refresh_worker:
                self._release_gpu_memory()
            return failure.to_output()
        output["metadata"]["timings"]["total_s"] = round(time.perf_counter() - started, 4)
        return output

    def render(self, job_id: str, result: GenerationResult) -> dict[str, Any]:
        """Encode the images and build the output: ``images``, ``image_url``, ``seed``, ``metadata``."""
        engine, request = self.engine, result.request
        assert engine is not None
        started = time.perf_counter()
        loras, embeddings = result.metadata.stable["loras"], result.metadata.stable.get("embeddings", [])

        def encode(image_and_seed: tuple[Any, int]) -> EncodedImage:
            image, seed = image_and_seed
            parameters = a1111_parameters(request, seed, engine.model_name, engine.model_hash, loras, embeddings)
            return encode_image(image, request.output_format, request.quality, seed, parameters)

        pairs = list(zip(result.images, result.seeds, strict=True))
        # One thread per image: Pillow's WebP encoder releases the GIL (4 noise 1024² images: 1.15 s -> 0.68 s on
        # 2 cores); PNG's strips share every core anyway (worker.output.png) and these threads only wait on them.
        if len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=min(len(pairs), os.cpu_count() or 1)) as pool:
                encoded = list(pool.map(encode, pairs))
        else:
            encoded = [encode(pair) for pair in pairs]
        images, returned_as = deliver(job_id, encoded, request.return_type, self.settings)
        metadata = result.metadata.with_timings(image_encoding_s=time.perf_counter() - started).with_volatile(
            returned_as=returned_as
        )
        return {"images": images, "image_url": images[0], "seed": result.seeds[0], "metadata": metadata.to_dict()}

    def _progress_reporter(self, job: dict[str, Any]) -> Any:
        """Steps to RunPod's progress updates on RunPod; elsewhere (run_job, --test_input, the local server) to the
        log, about every quarter of the job, so a slow job on a CPU shows it is moving."""
        job_id = str(job.get("id", "local"))
        if self.settings.on_runpod:
            from runpod.serverless import progress_update

            def report(step: int, total: int) -> None:
                if step % PROGRESS_EVERY_STEPS == 0 or step == total:
                    progress_update(job, {"step": step, "total_steps": total})

            return report

        started = time.perf_counter()

        def log_steps(step: int, total: int) -> None:
            if step == total or step % max(1, total // 4) == 0:
                log.info("job %s: step %d/%d (%.1f s)", job_id, step, total, time.perf_counter() - started)

        return log_steps

    @staticmethod
    def _release_gpu_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
