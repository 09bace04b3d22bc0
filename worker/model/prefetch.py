"""Read the files a start will need into the OS page cache on threads while the worker imports torch and diffusers.

A fresh worker spends ~11 s importing torch, diffusers and transformers (H200 cold start, bench/results) before
``from_pretrained`` reads the first of ~7 GB of weights, and on a network volume or a freshly pulled image
those reads are cold. File reads release the GIL, so a thread started before the imports overlaps the two.
It only warms the page cache: loading still goes through ``from_pretrained`` and safetensors, and every check
runs as before. A missing folder (a checkpoint converted on this start) has nothing to read; a read error
stops the prefetch and loading reports the problem as it would have.

The imports themselves read from a cold disk too: ``import torch`` maps ~2 GB of shared libraries (its own and
NVIDIA's) and faults their pages in a few at a time, and Python reads a few thousand bytecode files one by one.
``library_files`` lists those files for the packages the worker imports at start, and a few threads read them
ahead of the import (``PREFETCH_LIBRARIES``), in parallel, because one file at a time leaves a network disk idle.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 16 * 2**20

# What `python -m worker` imports before its first job (bench/cold_start.py --importtime lists the slowest): torch
# and the NVIDIA libraries it loads, the numeric stack under transformers and torch._dynamo, the model libraries.
STARTUP_PACKAGES = (
    "torch",
    "nvidia",
    "triton",
    "numpy",
    "sympy",
    "mpmath",
    "scipy",
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "PIL",
    "peft",
    "runpod",
    "aiohttp",
)
LIBRARY_THREADS = 4


@dataclass
class PrefetchReport:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    finished: bool = False
    error: str | None = None


class FilePrefetch:
    """Daemon threads reading ``files`` once each, in list order (the order a start needs them), into the page cache."""

    def __init__(
        self, files: Sequence[Path] | Callable[[], Sequence[Path]], threads: int = 1, name: str = "prefetch"
    ) -> None:
        # A callable is listed on the first thread, so finding thousands of files does not delay the caller.
        self._list = files if callable(files) else None
        self.files: list[Path] = [] if callable(files) else list(files)
        self.report = PrefetchReport()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._sendfile = hasattr(os, "sendfile")
        self._started = 0.0
        self._threads = [
            threading.Thread(target=self._run, args=(i == 0,), name=f"{name}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        self._running = len(self._threads)

    def start(self) -> FilePrefetch:
        if self._list is None and not self.files:
            return self
        self._started = time.perf_counter()
        if self._list is None:
            self._queue_files()
        for thread in self._threads:
            thread.start()
        return self

    def _queue_files(self) -> None:
        for path in self.files:
            self._pending.put(path)
        for _ in self._threads:
            self._pending.put(None)  # one end marker per thread

    def join(self, timeout: float | None = None) -> PrefetchReport:
        """Wait for the reading to finish (or ``timeout``) and return what was read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.report

    def stop(self, timeout: float = 5.0) -> PrefetchReport:
        """Stop reading (what it was for is loaded: anything left is read by now) and return what was read."""
        self._stop.set()
        return self.join(timeout)

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self, lists: bool) -> None:
        try:
            if lists and self._list is not None:
                try:
                    self.files = list(self._list())
                finally:
                    self._queue_files()
            with open(os.devnull, "wb") as sink:
                while not self._stop.is_set():
                    path = self._pending.get()
                    if path is None:
                        break
                    with open(path, "rb", buffering=0) as stream:
                        if hasattr(os, "posix_fadvise"):  # a hint for larger read-ahead; not everywhere
                            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                        done = self._read(stream, sink)
                    if done:
                        with self._lock:
                            self.report.files += 1
        except OSError as error:  # loading (or the import) meets the same file and reports it properly
            self.report.error = f"{type(error).__name__}: {error}"
            self._stop.set()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.report.seconds = round(time.perf_counter() - self._started, 3)
                    self.report.finished = self.report.files == len(self.files) and not self._stop.is_set()

    def _read(self, stream: BinaryIO, sink: BinaryIO) -> bool:
        """Read ``stream`` to its end into the page cache; False when stopped first.

        ``sendfile`` to /dev/null moves the pages inside the kernel: the cache fills without copying 7 GB into
        this process, which on a 2-core machine took CPU from the imports it overlaps (bench/cold_read.py).
        Where the kernel or file system does not support it, plain reads do the same with a copy.
        """
        offset = 0
        while self._sendfile and not self._stop.is_set():
            try:
                count = os.sendfile(sink.fileno(), stream.fileno(), offset, CHUNK_BYTES)
            except OSError:
                if offset:
                    raise
                self._sendfile = False  # not supported here: read instead, from the start of this file
                break
            if not count:
                return True
            offset += count
            self._count(count)
        buffer = bytearray(CHUNK_BYTES)
        stream.seek(offset)
        while not self._stop.is_set():
            count = stream.readinto(buffer)
            if not count:
                return True
            self._count(count)
        return False

    def _count(self, count: int) -> None:
        with self._lock:
            self.report.bytes += count


def weight_files(folders: Iterable[Path | None]) -> list[Path]:
    """Every ``*.safetensors`` file under the folders that exist, in path order (the load order)."""
    present = [folder for folder in folders if folder is not None and folder.is_dir()]
    return sorted(path for folder in present for path in folder.rglob("*.safetensors"))


def library_files(packages: Iterable[str] = STARTUP_PACKAGES) -> list[Path]:
    """The shared objects and this interpreter's bytecode of ``packages`` (those installed), package by package.

    Found with ``importlib.util.find_spec`` and the file system alone: nothing is imported. A package's wheel
    may keep its bundled libraries beside it (``numpy.libs``); those are included.
    """
    tag = f".{sys.implementation.cache_tag}.pyc"
    files: list[Path] = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        roots = [Path(location) for location in spec.submodule_search_locations]
        roots += [root.with_name(f"{root.name}.libs") for root in roots]
        found = [
            path
            for root in roots
            if root.is_dir()
            for path in root.rglob("*")
            if ".so" in path.name or path.name.endswith(tag)
        ]
        shared = sorted((path for path in found if not path.name.endswith(tag)), key=lambda path: -_size(path))
        bytecode = sorted(path for path in found if path.name.endswith(tag))
        files += [path for path in shared + bytecode if path.is_file()]
    return files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def start_prefetch(folders: Iterable[Path | None]) -> FilePrefetch:
    """Start reading the weight files under ``folders`` (missing ones skipped) on a background thread."""
    return FilePrefetch(weight_files(folders), threads=1, name="weight-prefetch").start()


def start_library_prefetch(packages: Iterable[str] = STARTUP_PACKAGES) -> FilePrefetch:
    """Start reading the start-up packages' libraries and bytecode on ``LIBRARY_THREADS`` background threads."""
    names = tuple(packages)
    return FilePrefetch(lambda: library_files(names), threads=LIBRARY_THREADS, name="library-prefetch").start()
