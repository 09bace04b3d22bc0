"""``python -m worker``: the RunPod serverless worker.

Locally, as the RunPod SDK defines: ``--test_input '{"input": {...}}'`` (or ./test_input.json) runs one
job and exits, ``--rp_serve_api --rp_api_port 8000`` serves /runsync, /run and /status on loopback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigurationError
from core.quiet_logs import drop_unactionable_warnings
from core.settings import WORKER, Settings, load_settings
from worker.model.location import apply_volume_caches, resolve_model_dir, resolve_refiner_dir
from worker.model.prefetch import start_prefetch

if TYPE_CHECKING:
    from worker.handler import Worker

log = logging.getLogger("worker")
_IMPORTED_AT = time.perf_counter()


def model_folders(settings: Settings) -> list[Path | None]:
    """The folders this start will load, as far as the settings tell without converting anything."""
    try:
        return [resolve_model_dir(settings), resolve_refiner_dir(settings)]
    except ConfigurationError:
        return []  # the worker's start reports it; there is nothing to prefetch


def start_worker(settings: Settings) -> Worker:
    """Start reading the weights, import the engine meanwhile, load it: the worker, ready or with its error."""
    prefetch = start_prefetch(model_folders(settings)) if settings.prefetch_weights else None
    # Imported here, not at the top: torch, diffusers and transformers take seconds to import, which the
    # prefetch thread spends reading the weights.
    from worker.handler import Worker

    # The one start-up phase the engine's own report cannot see (bench/cold_start.py reads this line).
    log.info("libraries imported %.2f s after the process started", seconds_since_process_start())
    worker = Worker(settings)
    worker.start()
    if prefetch is not None and prefetch.files:
        report = worker.prefetch = prefetch.stop()
        log.info(
            "prefetched %d of %d weight files (%.2f GB) in %.1f s while importing%s",
            report.files,
            len(prefetch.files),
            report.bytes / 1e9,
            report.seconds,
            f"; stopped by {report.error}" if report.error else "",
        )
    return worker


def seconds_since_process_start() -> float:
    """Seconds since the OS started this process, the interpreter's own start-up included: from the kernel's
    clock-tick counts since boot (psutil's create_time adds a boot time rounded to the second, so it can be
    off by up to a second); where /proc cannot tell, since this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as uptime:
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


def refuse_impossible_compile(settings: Settings) -> None:
    """COMPILE in an image without a C compiler: exit 2 at once, instead of a worker that serves eagerly."""
    if settings.compile == "aot" or (settings.compile == "off" and not settings.compile_vae):
        # Nothing to refuse: COMPILE=aot (its VAE decoder too, with COMPILE_VAE=1) loads packages without a
        # compiler, and names what is missing only when it must build one (worker.generation.aot_unet). Probing
        # here would run two test builds and import torch on the main thread at every start, before the prefetch
        # below begins to overlap that import.
        return
    from worker.generation.compile_prerequisites import check_compile_prerequisites

    try:
        check_compile_prerequisites(settings)
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def main() -> None:
    drop_unactionable_warnings()
    try:
        settings = load_settings(command=WORKER)
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level or "INFO", format="%(asctime)s %(levelname)s %(message)s")
    refuse_impossible_compile(settings)
    apply_volume_caches()  # compile (and later Hub) caches on the network volume when one is mounted
    # The RunPod SDK (aiohttp, boto3, paramiko...: 1.2 s of a cold start on the H200) is imported while the engine
    # loads; an import that fails there is simply done again below, where its error is the one to see.
    sdk = threading.Thread(target=_import_quietly, args=("runpod",), name="import-runpod", daemon=True)
    sdk.start()
    worker = start_worker(settings)
    sdk.join()
    import runpod

    shorten_images_in_runpod_logs()
    runpod.serverless.start({"handler": worker.handle})


def _import_quietly(name: str) -> None:
    with contextlib.suppress(BaseException):  # a failed or deadlocked import is retried, and reported, by main()
        importlib.import_module(name)


_DATA_URI = re.compile(r"(data:[\w.+-]+/[\w.+-]+;base64,)[A-Za-z0-9+/=]{80,}")


def shorten_images_in_runpod_logs() -> None:
    """RunPod's logger prints whole job outputs (every image as base64: tens of kB to MB a job), at DEBUG (its
    default level) for each job and at INFO as --test_input's result. Keep its level at INFO (``--rp_log_level
    DEBUG`` still asks for more) and print each data URI as its header and length instead of its bytes."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    if getattr(RunPodLogger.log, "shortens_images", False):
        return
    original = RunPodLogger.log

    def log(self: RunPodLogger, message: object, message_level: str = "INFO", job_id: str | None = None) -> None:
        shown = _DATA_URI.sub(lambda m: f"{m[1]}<{len(m[0]) - len(m[1]):,} characters>", str(message))
        original(self, shown, message_level, job_id)

    log.shortens_images = True  # type: ignore[attr-defined]
    RunPodLogger.log = log  # type: ignore[method-assign]
    RunPodLogger.level = "INFO"


if __name__ == "__main__":
    main()
