"""The error registry (core/errors.py): every kind a caller can see is listed once, its code classifies its messages,
and whether a failure is retriable is the kind's data, never read off an exception's type name."""

from __future__ import annotations

import inspect

import pytest
import torch

from core import errors
from core.errors import (
    ERROR_KINDS,
    REFINED_KINDS,
    InternalError,
    ModelFolderError,
    ModelMissing,
    OutOfMemory,
    WorkerError,
    error_kind_of,
    from_exception,
)


def test_every_kind_in_core_is_registered_and_its_code_classifies_its_messages() -> None:
    defined = {kind for _, kind in inspect.getmembers(errors, inspect.isclass) if issubclass(kind, WorkerError)}
    assert defined - {WorkerError} == set(ERROR_KINDS) | set(REFINED_KINDS)
    codes = [kind.code for kind in ERROR_KINDS]
    assert len(codes) == len(set(codes)), codes
    for kind in ERROR_KINDS:
        assert error_kind_of(str(kind("what went wrong"))) is kind, kind
    for refined in REFINED_KINDS:
        # A refinement is its registered parent on the wire: same code, same retriable.
        listed = error_kind_of(str(refined("what went wrong")))
        assert listed in ERROR_KINDS and issubclass(refined, listed) and refined.retriable is listed.retriable


def test_a_broken_model_folder_reads_as_no_model_to_a_job() -> None:
    error = ModelFolderError("model folder /m has no manifest.json (not made by model_build); convert ...")
    assert isinstance(error, ModelMissing) and error.retriable
    assert (
        str(error) == "worker has no model: model folder /m has no manifest.json (not made by model_build); convert ..."
    )


def test_from_exception_goes_by_type_not_by_type_name() -> None:
    assert isinstance(from_exception(torch.cuda.OutOfMemoryError("CUDA out of memory")), OutOfMemory)
    assert isinstance(from_exception(MemoryError()), OutOfMemory)

    class OutOfMemoryError(Exception):  # a library's own error that merely shares torch's name
        pass

    wrapped = from_exception(OutOfMemoryError("disk quota"))
    assert isinstance(wrapped, InternalError) and str(wrapped) == "internal error: OutOfMemoryError: disk quota"


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_a_kinds_message_keeps_a_code_that_is_already_there(kind: type[WorkerError]) -> None:
    assert str(kind(f"{kind.code}: said once")) == f"{kind.code}: said once"
