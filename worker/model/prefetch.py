"""Read the model's weight files into the OS page cache on a thread while the worker imports torch and diffusers.

A fresh worker spends ~11 s importing torch, diffusers and transformers (H200 cold start, bench/results) before
``from_pretrained`` reads the first of ~7 GB of weights, and on a network volume or a freshly pulled image
those reads are cold. File reads release the GIL, so a thread started before the imports overlaps the two.
It only warms the page cache: loading still goes through ``from_pretrained`` and safetensors, and every check
runs as before. A missing folder (a checkpoint converted on this start) has nothing to read; a read error
stops the prefetch and loading reports the problem as it would have.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 16 * 2**20


@dataclass
class PrefetchReport:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    finished: bool = False
    error: str | None = None


class WeightPrefetch:
    """A daemon thread reading every ``*.safetensors`` file under ``folders`` once, in path order (the load order)."""

    def __init__(self, folders: Iterable[Path | None]) -> None:
        present = [folder for folder in folders if folder is not None and folder.is_dir()]
        self.files = sorted(path for folder in present for path in folder.rglob("*.safetensors"))
        self.report = PrefetchReport()
        self._stop = threading.Event()
        self._sendfile = hasattr(os, "sendfile")
        self._thread = threading.Thread(target=self._run, name="weight-prefetch", daemon=True)

    def start(self) -> WeightPrefetch:
        if self.files:
            self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> PrefetchReport:
        """Wait for the reading to finish (or ``timeout``) and return what was read."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return self.report

    def stop(self, timeout: float = 5.0) -> PrefetchReport:
        """Stop reading (the model is loaded: anything left is read by now) and return what was read."""
        self._stop.set()
        return self.join(timeout)

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            with open(os.devnull, "wb") as sink:
                for path in self.files:
                    with open(path, "rb", buffering=0) as stream:
                        if hasattr(os, "posix_fadvise"):  # a hint for larger read-ahead; not everywhere
                            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                        self._read(stream, sink)
                    if self._stop.is_set():
                        break
                    self.report.files += 1
            self.report.finished = self.report.files == len(self.files)
        except OSError as error:  # loading meets the same file and reports it properly
            self.report.error = f"{type(error).__name__}: {error}"
        self.report.seconds = round(time.perf_counter() - started, 3)

    def _read(self, stream: BinaryIO, sink: BinaryIO) -> None:
        """Read ``stream`` to its end (or until stopped) into the page cache.

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
                return
            offset += count
            self.report.bytes += count
        buffer = bytearray(CHUNK_BYTES)
        stream.seek(offset)
        while not self._stop.is_set():
            count = stream.readinto(buffer)
            if not count:
                return
            self.report.bytes += count


def start_prefetch(folders: Iterable[Path | None]) -> WeightPrefetch:
    """Start reading the weight files under ``folders`` (missing ones skipped) on a background thread."""
    return WeightPrefetch(folders).start()
