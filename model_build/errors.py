"""The converter's errors. Each message says what is wrong and what to do about it.

They live in their own module so that every step (fetch, inspect, convert, prove) can raise them
without importing the orchestration in ``convert.py``, which re-exports :class:`ConversionError`.
"""

from __future__ import annotations


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why and what to do."""


class FetchError(ConversionError):
    """A source could not be fetched, or it is not the file the user pinned."""


class CheckpointError(ConversionError):
    """The file is not a convertible SDXL safetensors checkpoint (refused before any conversion)."""


class CompletenessError(ConversionError):
    """The converted pipeline does not hold exactly the checkpoint's tensors."""
