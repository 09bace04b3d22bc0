"""The converter's errors. Each message says what is wrong and what to do about it.

They live in their own module so that every step (fetch, inspect, convert, prove) can raise them
without importing the orchestration in ``convert.py``, which re-exports :class:`ConversionError`.
They are :class:`core.errors.WorkerError` kinds, so the worker (which converts ``CHECKPOINT_PATH``
on its first start) reports them like any other error. A problem with where the output goes (a
read-only folder, a path under a file, a full disk) is a :class:`core.errors.ConfigurationError`
instead: the command line exits with 2 for it, as for any other configuration error.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.errors import ConfigurationError, WorkerError

SHOWN = 5  # how many names an error message lists before "… (N more)"


def shown_names(names: Iterable[str]) -> str:
    """The first few names, comma-separated, and how many more there are."""
    names = list(names)
    text = ", ".join(names[:SHOWN])
    return text + (f", … ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")


class ConversionError(WorkerError):
    """The checkpoint cannot be converted; the message says why and what to do.

    Not retriable: the same file converts the same way every time. A download that failed on the way is a
    :class:`FetchError` marked ``transient``: running the same command again resumes it, as the message says.
    """

    code = "conversion failed"
    transient: bool = False  # a FetchError of a download that failed on the way sets it


class FetchError(ConversionError):
    """A source could not be fetched, or it is not the file the user pinned.

    ``transient``: whether the same source can succeed later (a connection error, a 5xx, a cut-off transfer),
    decided where the cause is known, as data; False for a wrong name, a missing or gated file, a refused scheme.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class CheckpointError(ConversionError):
    """The file is not a convertible SDXL safetensors checkpoint (refused before any conversion)."""


class CompletenessError(ConversionError):
    """The converted pipeline does not hold exactly the checkpoint's tensors."""


class OutputNotWritable(ConversionError, ConfigurationError):
    """The output cannot be written: a file, under a file, read-only, or the disk is full.

    A configuration error (code ``configuration``; the command line exits with 2), and still a
    ConversionError for callers that catch those. When a write failed, the OSError is in the chain.
    """

    code = ConfigurationError.code
