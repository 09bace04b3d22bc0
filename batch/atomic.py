"""Crash-safe file writes: a file is either absent or complete, never torn.

Data goes to a temporary file in the output's own ``_batch/tmp`` folder (same filesystem, so
the final rename is atomic), is fsynced, then renamed or hard-linked into place, and the parent
folder is fsynced so the new name survives a power cut too. Temporary names carry the host and
pid of their writer, so leftovers of dead writers can be told apart from files being written.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import time
from pathlib import Path

import psutil

HOST = socket.gethostname()
HOST_TAG = re.sub(r"[^A-Za-z0-9_-]", "_", HOST)  # no dots: temporary names are split on them
TMP_SUFFIX = ".tmp"
# A temporary file this old is a leftover whatever its owner: writes take milliseconds.
TMP_MAX_AGE_S = 3600.0


def fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some filesystems cannot open folders; the rename itself is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def temporary_path(tmp_dir: Path, final_name: str) -> Path:
    return tmp_dir / f".{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}.{final_name}{TMP_SUFFIX}"


def write_fully(path: Path, data: bytes, *, durable: bool) -> None:
    """Create ``path`` (it must not exist) with ``data``; ``durable``: fsync it before returning."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


def write_atomic(
    path: Path, data: bytes, tmp_dir: Path, *, durable: bool = True, sync_folder: bool | None = None
) -> None:
    """Create or replace ``path`` with ``data`` in one step (readers see the old file or the new one).

    ``sync_folder=False`` skips the folder fsync, for a caller that writes several files into one folder
    and fsyncs it once afterwards.
    """
    tmp = temporary_path(tmp_dir, path.name)
    try:
        write_fully(tmp, data, durable=durable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable if sync_folder is None else sync_folder:
        fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, tmp_dir: Path, *, durable: bool = True) -> bool:
    """Create ``path`` with ``data`` unless it exists; True if this call created it.

    A hard link fails when the name exists, so of two processes committing the same file exactly
    one wins, and the winner's file is complete the moment it appears. Filesystems without hard
    links fall back to check-then-rename (not exclusive between processes; claims still are).
    """
    tmp = temporary_path(tmp_dir, path.name)
    try:
        write_fully(tmp, data, durable=durable)
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            created = not path.exists()
            if created:
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if created and durable:
        fsync_dir(path.parent)
    return created


def process_alive(pid: int, started: float | None) -> bool:
    """Whether ``pid`` runs on this host (and, given ``started``, is still the same process, not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # killed, not yet reaped by its parent: it will never finish anything
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _owner_is_gone(name: str) -> bool:
    """For ``.HOST.PID.xxxx.name.tmp``: True when HOST is this machine and PID no longer runs."""
    parts = name.split(".")
    if len(parts) < 4 or parts[1] != HOST_TAG or not parts[2].isdigit():
        return False
    return not process_alive(int(parts[2]), None)


def clean_temporary_files(tmp_dir: Path, now: float | None = None) -> int:
    """Remove leftovers of crashed writers (dead local pid, or older than an hour); returns how many."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.endswith(TMP_SUFFIX):
            continue
        try:
            old = now - entry.stat().st_mtime > TMP_MAX_AGE_S
            if old or _owner_is_gone(entry.name):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
