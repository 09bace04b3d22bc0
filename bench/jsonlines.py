"""The benchmarks' output: JSON lines printed as measured (and copied to a file), and a deadline to fit a lease."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

_copy: TextIO | None = None
_deadline = math.inf


def start(copy_to: Path | None = None, deadline: float = math.inf) -> None:
    """Also append every line to ``copy_to``; ``deadline`` is a ``time.perf_counter()`` value."""
    global _copy, _deadline
    _deadline = deadline
    if copy_to is not None:
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        _copy = open(copy_to, "a")  # noqa: SIM115 (kept open for the process's lifetime)


def emit(**record: Any) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if _copy is not None:
        _copy.write(line + "\n")
        _copy.flush()


def time_left() -> float:
    """Seconds until the deadline: a section that would not finish in time is skipped, so a call returns lines."""
    return _deadline - time.perf_counter()
