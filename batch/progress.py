"""A shard's progress for people: a tqdm bar on a terminal, or, without one (a pod's log, ``--no-progress``), one log
line a minute with the same figures (items done, items/s, ETA)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 60.0


class ShardProgress:
    """Started when the first job is handed out (items/s and ETA count from there, not from the model load)."""

    def __init__(self, shard: str, total: int, done: int, bar: bool) -> None:
        self.shard = shard
        self.total = total
        self.started = self._last_log = time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="item",
            desc=f"shard {shard}",
            disable=not bar,
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
        )

    def advance(self, figures: Callable[[], tuple[int, int]]) -> None:
        """One more item finished; ``figures``: (items finished, items made here), read only when a line is due."""
        self.bar.update(1)
        now = time.perf_counter()
        if self.bar.disable and now - self._last_log >= PROGRESS_LOG_S:
            self._last_log = now
            finished, made = figures()
            rate = made / (now - self.started) if now > self.started else 0.0
            eta = f"{(self.total - finished) / rate / 60:.1f} min" if rate > 0 else "unknown"
            log.info("shard %s: %d/%d items, %.3f items/s, ETA %s", self.shard, finished, self.total, rate, eta)

    def close(self) -> None:
        self.bar.close()
