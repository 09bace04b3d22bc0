"""The one rule for a sha256 pin (``--sha256``, ``CHECKPOINT_SHA256``, LoRA pins): 64 hex digits, any case.

An optional ``sha256:`` prefix and surrounding whitespace are accepted, as people copy pins from Hub pages and
lock files; the result is lower case, the form hashlib's ``hexdigest`` gives.
"""

from __future__ import annotations

import re

_HEX64 = re.compile(r"[0-9a-f]{64}")


def normalize_sha256(pin: str) -> str:
    """``pin`` as 64 lower-case hex digits; ValueError saying what a pin looks like otherwise."""
    value = pin.strip().lower().removeprefix("sha256:")
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{pin.strip()[:80]!r} is not a sha256 (64 hex digits, e.g. from `sha256sum FILE`)")
    return value
