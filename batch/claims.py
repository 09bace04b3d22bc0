"""Per-item claims, so two runners on one shard (Kubernetes may start two pods for an index) split the work.

A claim is a small file ``_batch/claims/<id>.claim`` created exclusively (hard link of a complete
temporary file) by the process about to generate the item, refreshed by a heartbeat thread, and
removed once the item's sidecar is committed. A claim is stale, and may be taken over, when its
heartbeat is older than the TTL (the heartbeat stops when the process has finished nothing for a
TTL, so a hung process loses its claims too; the local runner reports every denoising step, so a slow call
keeps them), or at once when its owner ran on this host and is gone (a crash or SIGKILL followed by a
resume on the same machine). Claims only avoid duplicate work: should two processes ever generate the
same item anyway, the locked commit keeps the first one's files and the second discards its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from batch.atomic import HOST, HOST_TAG, create_exclusive, process_alive

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 300.0
CLAIM_SUFFIX = ".claim"


@dataclass(frozen=True)
class ClaimOwner:
    host: str
    pid: int
    started: float  # process creation time: tells a live owner from a reused pid
    token: str

    @classmethod
    def this_process(cls) -> ClaimOwner:
        return cls(HOST, os.getpid(), psutil.Process().create_time(), secrets.token_hex(8))


class ClaimBook:
    """The claims this process holds in one output folder, with their heartbeat."""

    def __init__(self, folder: Path, tmp_dir: Path, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError("claim TTL must be positive")
        self.folder = folder
        self.tmp_dir = tmp_dir
        self.ttl_s = ttl_s
        self.owner = ClaimOwner.this_process()
        self.taken_over = 0
        self._last_progress = time.monotonic()
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- paths and contents ---------------------------------------------------------------------

    def path(self, item_id: str) -> Path:
        return self.folder / f"{item_id}{CLAIM_SUFFIX}"

    def _content(self) -> bytes:
        return json.dumps({**asdict(self.owner), "claimed_at": time.time()}).encode()

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: judged by its age alone
        return value if isinstance(value, dict) else {}

    def is_stale(self, path: Path, record: dict[str, Any], now: float | None = None) -> bool:
        now = time.time() if now is None else now
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > self.ttl_s:
            return True
        if record.get("host") == HOST and isinstance(record.get("pid"), int):
            return not process_alive(record["pid"], record.get("started"))
        return False

    def holder(self, item_id: str) -> dict[str, Any] | None:
        """The live claim on ``item_id`` (its owner's record), or None when free or stale."""
        path = self.path(item_id)
        record = self._read(path)
        if record is None or self.is_stale(path, record):
            return None
        return record

    # -- claim and release ------------------------------------------------------------------------

    def try_claim(self, item_id: str) -> bool:
        """Claim ``item_id`` for this process; False while another live process holds it."""
        path = self.path(item_id)
        with self._lock:
            if item_id in self._held:
                return True
        if create_exclusive(path, self._content(), self.tmp_dir, durable=False):
            return self._hold(item_id)
        record = self._read(path)
        if record is None:  # released between our attempt and the read
            return create_exclusive(path, self._content(), self.tmp_dir, durable=False) and self._hold(item_id)
        if record.get("token") == self.owner.token:
            return self._hold(item_id)
        if not self.is_stale(path, record):
            return False
        if not self._take_over(path, record.get("token")):
            return False
        self.taken_over += 1
        log.info("took over the stale claim on %s (owner %s pid %s)", item_id, record.get("host"), record.get("pid"))
        return self._hold(item_id)

    def _take_over(self, path: Path, stale_token: str | None) -> bool:
        # Move the stale claim aside first: of several processes racing for it, one rename wins.
        grave = self.tmp_dir / f".{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}.stale-claim.tmp"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            pass
        else:
            moved = self._read(grave) or {}
            if moved.get("token") != stale_token:
                # A racer renewed it between our check and the rename: give it back.
                with contextlib.suppress(OSError):
                    os.link(grave, path)
                grave.unlink(missing_ok=True)
                return False
            grave.unlink(missing_ok=True)
        return create_exclusive(path, self._content(), self.tmp_dir, durable=False)

    def _hold(self, item_id: str) -> bool:
        with self._lock:
            self._held.add(item_id)
        self.note_progress()
        return True

    def note_progress(self) -> None:
        """The work is moving: keep the heartbeat going (a hung process must not hold its claims forever)."""
        self._last_progress = time.monotonic()

    def release(self, item_id: str) -> None:
        with self._lock:
            self._held.discard(item_id)
        path = self.path(item_id)
        record = self._read(path)
        if record is not None and record.get("token") == self.owner.token:
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        with self._lock:
            held = list(self._held)
        for item_id in held:
            self.release(item_id)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    # -- heartbeat --------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _beat(self) -> None:
        interval = max(self.ttl_s / 5, 0.05)
        while not self._stop.wait(interval):
            if time.monotonic() - self._last_progress > self.ttl_s:
                continue  # no item finished for a whole TTL: let the claims go stale for another process
            with self._lock:
                held = list(self._held)
            for item_id in held:
                # Gone: released meanwhile, or taken over after a stall (the exclusive commit still decides).
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.path(item_id))

    def __enter__(self) -> ClaimBook:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_heartbeat()
        self.release_all()
