"""A least-recently-used cache of encoded prompts, bounded by the bytes of the tensors it holds.

A count bound is not a memory bound: one prompt of 64 chunks holds 64 times the tensors of a short one (at full size
about 20 MB per side in fp16, against 0.3 MB), so the cache is sized by the sum of its tensors' ``nbytes``. An entry
larger than the whole budget is not kept. Not thread-safe: one cache per encoder, one encoder per worker thread.

The key is the encoder's to build (every input that changes a result); :class:`PromptCache` hands out clones, so
callers may modify what they get.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

from worker.prompting.encoded import EncodedPrompts

DEFAULT_CACHE_BYTES: Final = 256 * 1024 * 1024  # about 400 short prompts at full size, or 6 of the longest

Value = TypeVar("Value")


class ByteBoundedCache(Generic[Value]):
    """``get`` / ``put`` by key; the least recently used entries go first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int, size_of: Callable[[Value], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: {max_bytes} must be >= 0 (0 disables the cache)")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[Value, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Value | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Value) -> bool:
        """Keep ``value`` under ``key``; False when it alone exceeds the budget (then it is not kept)."""
        size = self._size_of(value)
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class PromptCache:
    """Encoded prompts by key, with hit and miss counts; every result handed out is a fresh clone."""

    def __init__(self, max_bytes: int) -> None:
        self._entries: ByteBoundedCache[EncodedPrompts] = ByteBoundedCache(max_bytes, EncodedPrompts.nbytes)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of tensors held now."""
        return self._entries.bytes

    def get(self, key: Hashable) -> EncodedPrompts | None:
        """A clone of the entry (its ``info["cache_hit"]`` set), or None, counted as a hit or a miss."""
        cached = self._entries.get(key) if self._entries.max_bytes else None
        if cached is None:
            self.misses += 1
            return None
        self.hits += 1
        result = cached.clone()
        result.info["cache_hit"] = True
        return result

    def keep(self, key: Hashable, encoded: EncodedPrompts) -> EncodedPrompts:
        """Store ``encoded`` if it fits; returns what the caller may own (a clone when the cache kept the original)."""
        if self._entries.max_bytes and self._entries.put(key, encoded):
            return encoded.clone()
        return encoded

    def clear(self) -> None:
        self._entries.clear()
