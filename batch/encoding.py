"""Image encoding off the generating process: encoding holds the GIL long enough to starve the GPU's launches.

Re-measured after PNG moved to :mod:`worker.output.png` (numpy filtering, zlib on a thread pool): with one thread
encoding 1024x1024 images, a main thread doing small Python steps (as a launch loop does) spent 38 % of its time in
stalls over 5 ms for PNG (longest 20 ms), 50 % for JPEG (Pillow's encoder keeps the GIL) and 4-5 % for WebP, on
this project's 2-core machine (``python bench/gil_probe.py``). In the runner the main thread launches the
pipeline's kernels, so a writer *thread* encoding images would starve the GPU instead of overlapping with it.
Encoding therefore runs in helper processes (``python -m batch.encoding``: plain pipes rather than a
multiprocessing pool, so nothing re-imports the caller's main script and nothing inherits the CUDA context), which
get the raw pixels and return the file bytes of :func:`worker.output.images.encode_image`, the worker's own encoder, as
an :class:`core.results.EncodedImage`. The parent's threads only wait on pipes, which releases the GIL.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from PIL import Image

from core.results import EncodedImage
from worker.output.images import encode_image

_REQUEST = struct.Struct("!II")  # header length, pixel bytes length
_ANSWER = struct.Struct("!BQ")  # 0 = ok / 1 = error, payload length


class EncodingFailed(Exception):
    """One image could not be encoded (the encoder's own message); the item fails, the run goes on."""


def default_workers() -> int:
    """One encoder process per 4 CPUs, 1 to 4 of them (a 2-core box gets 1, a 16-core GPU host 4)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("the encoder process closed its pipe")
        data += chunk
    return bytes(data)


class _EncoderProcess:
    """One ``python -m batch.encoding`` child; used by one thread at a time."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batch.encoding"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def encode(self, spec: tuple[Any, ...], pixels: bytes) -> bytes:
        header = pickle.dumps(spec)
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(_REQUEST.pack(len(header), len(pixels)) + header)
            stdin.write(pixels)
            stdin.flush()
            status, size = _ANSWER.unpack(_read_exactly(stdout, _ANSWER.size))
            payload = _read_exactly(stdout, size)
        except (BrokenPipeError, EOFError) as error:
            raise EncodingFailed(f"the image encoder process died (exit code {self.process.poll()})") from error
        if status != 0:
            raise EncodingFailed(f"image encoding failed: {payload.decode('utf-8', 'replace')}")
        return payload

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # EOF: the child exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ImageEncoder:
    """``submit(image, ...)`` -> a future of the file bytes; ``workers=0`` encodes in the calling thread."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers
        self._threads: ThreadPoolExecutor | None = None
        self._idle: queue.Queue[_EncoderProcess] = queue.Queue()
        self._all: list[_EncoderProcess] = []
        self._lock = threading.Lock()

    def submit(
        self, image: Image.Image, output_format: str, quality: int, seed: int, text: str
    ) -> Future[EncodedImage]:
        if self.workers <= 0:
            future: Future[EncodedImage] = Future()
            try:
                future.set_result(encode_image(image, output_format, quality, seed, text))
            except Exception as error:  # delivered where the result is awaited, as from an encoder process
                future.set_exception(EncodingFailed(f"image encoding failed: {type(error).__name__}: {error}"))
            return future
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="encode")
                for _ in range(self.workers):
                    process = _EncoderProcess()
                    self._all.append(process)
                    self._idle.put(process)
        spec = (image.mode, image.size, output_format, quality, seed, text)
        return self._threads.submit(self._encode, spec, image.tobytes())

    def _encode(self, spec: tuple[Any, ...], pixels: bytes) -> EncodedImage:
        process = self._idle.get()
        try:
            return EncodedImage(process.encode(spec, pixels), format=spec[2], seed=spec[4])
        finally:
            if not process.alive:  # killed (e.g. by the OOM killer): the next image gets a fresh one
                process.close()
                with self._lock:
                    self._all.remove(process)
                    process = _EncoderProcess()
                    self._all.append(process)
            self._idle.put(process)

    def close(self) -> None:
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=True, cancel_futures=True)
                self._threads = None
            for process in self._all:
                process.close()
            self._all.clear()


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: (spec, pixels) in, encoded bytes out, until the parent closes the pipe."""
    while True:
        head = requests.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            return
        header_size, pixel_size = _REQUEST.unpack(head)
        mode, size, output_format, quality, seed, text = pickle.loads(_read_exactly(requests, header_size))
        pixels = _read_exactly(requests, pixel_size)
        try:
            image = Image.frombytes(mode, size, pixels)
            payload, status = encode_image(image, output_format, quality, seed, text).data, 0
        except Exception as error:  # reported to the parent, which fails this item with it
            payload, status = f"{type(error).__name__}: {error}".encode(), 1
        answers.write(_ANSWER.pack(status, len(payload)) + payload)
        answers.flush()


if __name__ == "__main__":
    # The protocol owns the real stdout; anything printed by a library goes to stderr instead.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, protocol_out)
