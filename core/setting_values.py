"""How each setting's text becomes its value: the parsers :mod:`core.settings` declares its fields with.

A parser takes the variable's raw text and returns the value or raises ``ValueError`` saying what is accepted;
:func:`core.settings.load_settings` turns that into a :class:`core.errors.ConfigurationError` naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from core.sha256_pins import normalize_sha256

OFFLOAD_MODES = ("auto", "none", "model", "sequential")


def text(raw: str) -> str:
    return raw


def optional_text(raw: str) -> str | None:
    return raw or None


def optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def optional_sha256(raw: str) -> str | None:
    return normalize_sha256(raw) if raw.strip() else None


def flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def whole_number(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = raw.strip()
        if not text.lstrip("+").isdigit() or not low <= int(text) <= high:
            raise ValueError(f"use a whole number from {low} to {high}")
        return int(text)

    return parse


def number(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise ValueError(f"use a number from {low:,g} to {high:,g}")
        return value

    return parse


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(raw: str) -> str | None:
    value = raw.strip().upper()
    if value and value not in LOG_LEVELS:
        raise ValueError(f"use one of {', '.join(LOG_LEVELS)} (any case), or leave it unset")
    return value or None


def offload(raw: str) -> str:
    value = raw.strip().lower()
    if value not in OFFLOAD_MODES:
        raise ValueError(f"use one of {', '.join(OFFLOAD_MODES)}")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"use one of {', '.join(a or repr(a) for a in allowed)}")
        return value

    return parse


MIN_WARMUP_SIDE, MAX_WARMUP_SIDE = 64, 4096


def sizes(raw: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for item in (part.strip().lower() for part in raw.split(",") if part.strip()):
        width, _, height = item.partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 8 or int(height) % 8:
            raise ValueError(f"{item!r}: write WIDTHxHEIGHT in multiples of 8, comma-separated, e.g. 1024x1024")
        if not all(MIN_WARMUP_SIDE <= int(side) <= MAX_WARMUP_SIDE for side in (width, height)):
            raise ValueError(f"{item!r}: each side from {MIN_WARMUP_SIDE} to {MAX_WARMUP_SIDE}")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


def counts(raw: str) -> tuple[int, ...]:
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not all(part.isdigit() and 1 <= int(part) <= 64 for part in parts):
        raise ValueError("write whole numbers from 1 to 64, comma-separated, e.g. 1,4")
    return tuple(int(part) for part in parts)


def optional_index(raw: str) -> int | None:
    text = raw.strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError("a whole number >= 0 (Kubernetes sets it for an Indexed Job)")
    return int(text)


def paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(part) for part in raw.split(os.pathsep) if part)


HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def hosts(raw: str) -> frozenset[str]:
    hosts = [part.strip().lower().rstrip(".") for part in raw.split(",") if part.strip()]
    for host in hosts:
        if len(host) > 253 or not HOST_NAME.fullmatch(host):
            raise ValueError(
                f"{host[:60]!r} is not a host name; write host names only (no scheme, path or port), "
                "comma-separated, e.g. huggingface.co,civitai.com"
            )
    return frozenset(hosts)
