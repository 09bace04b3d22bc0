"""Where a conversion writes: the output checked before any work, one conversion at a time, nothing half-written.

The output only ever appears by the rename of a finished, fsynced folder. Conversions into one
output are serialised by a file lock (``NAME.lock`` beside it); leftovers of a killed run are
hidden folders (``.NAME.converting-*``, ``.NAME.old-*``) that the next conversion into the same
output removes while it holds the lock. A failed write is told apart from a failed read: a full
disk or a read-only folder is the user's configuration (:class:`OutputNotWritable`), not a bad
checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from core.errors import NO_SPACE_ERRNOS
from model_build.errors import ConversionError, OutputNotWritable

log = logging.getLogger("model_build")

_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def check_output_location(output: Path) -> None:
    """Refuse an output that cannot be written before any work: a file, under a file, or in a read-only folder.

    Root may write into a folder without write permission, so only what the kernel would refuse
    (access(2), which also reports a read-only file system) is refused here.
    """
    if output.exists() and not output.is_dir():
        raise OutputNotWritable(f"--output {output} is a file, not a folder; choose another --output")
    existing = output.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritable(
            f"--output {output} is under {existing}, which is a file, not a folder; choose another --output"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise OutputNotWritable(f"--output {output}: {existing} {why}; choose a writable --output")


def write_errno(error: BaseException, folder: Path) -> int | None:
    """The errno of a failed write into ``folder`` (None for other failures, e.g. reading the checkpoint)."""
    if isinstance(error, OSError):
        written = os.fspath(error.filename2 or error.filename or folder)
        return error.errno if Path(os.path.abspath(written)).is_relative_to(os.path.abspath(folder)) else None
    # safetensors' writer (Rust) raises SafetensorError("... I/O error: ... (os error 28)"): the number is only there.
    match = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, SafetensorError) else None
    return int(match[1]) if match else None


def output_problem(error: BaseException, output: Path, needed: Callable[[], int]) -> OutputNotWritable | None:
    """A failed write into the output's folder as a configuration error (full disk, read-only), or None.

    ``needed()``: about how many bytes the converted folder takes, for the message.
    """
    number = write_errno(error, output.parent)
    if number in NO_SPACE_ERRNOS:
        return OutputNotWritable(
            f"--output {output}: cannot write the converted model: {os.strerror(number)}. It needs about "
            f"{needed() / 2**20:,.0f} MiB; free some space there or choose another --output"
        )
    if number in _NOT_WRITABLE:
        return OutputNotWritable(
            f"--output {output}: cannot write there ({os.strerror(number)}); choose a writable --output"
        )
    return None


def raise_output_problem(error: OSError | SafetensorError, output: Path, needed: Callable[[], int]) -> None:
    """Re-raise a failed write as :class:`OutputNotWritable` (with the OSError in the chain); return otherwise."""
    problem = output_problem(error, output, needed)
    if problem is None:
        return
    if not isinstance(error, OSError):  # callers look for the OSError (its errno) in the chain
        number = write_errno(error, output.parent)
        raise problem from OSError(number, os.strerror(number or 0), str(output))
    raise problem from error


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def conversion_lock(output: Path, timeout: float | None) -> Iterator[float]:
    """Hold ``NAME.lock`` beside the output; yield the seconds spent waiting for it."""
    from filelock import FileLock, Timeout

    path = lock_path(output)
    lock = FileLock(str(path))
    started = time.perf_counter()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is converting into %s; waiting for it (lock %s)", output, path)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout as error:
            raise ConversionError(
                f"another process has been converting into {output} for more than {timeout:.0f} s (lock {path}). "
                "Wait for it, or if no conversion is running, delete the lock file."
            ) from error
    try:
        yield time.perf_counter() - started
    finally:
        lock.release()


def _leftovers(output: Path) -> list[Path]:
    """Temporary folders of conversions into ``output`` that were killed before cleaning up."""
    patterns = (f".{output.name}.converting-*", f".{output.name}.old-*")
    return sorted(path for pattern in patterns for path in output.parent.glob(pattern))


def remove_leftovers(output: Path) -> None:
    """Only called while holding the lock: then no other conversion into ``output`` is running."""
    for leftover in _leftovers(output):
        log.info("removing %s, left by an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def remove_leftovers_if_idle(output: Path) -> None:
    """On a no-op, remove leftovers too (a killed --force can leave the previous model there), unless busy."""
    from filelock import FileLock, Timeout

    if not output.parent.is_dir() or not _leftovers(output):
        return
    try:
        with FileLock(str(lock_path(output)), timeout=0):
            remove_leftovers(output)
    except Timeout:
        pass  # a conversion is running; it removes them itself


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in sorted(p for p in folder.rglob("*") if p.is_dir()):
        fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
