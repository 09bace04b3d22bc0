"""The files of a batch run as typed records: an item's sidecar, a failed line's error file, a shard's summary and
the run's layout.

Each record is the one place its keys are named. :meth:`_Record.to_json` writes exactly the bytes the runner has
always written (sorted keys, two-space indent, UTF-8, a final newline), so the output folders of earlier runs
resume and compare equal; :meth:`_Record.from_json` reads them back, keeping keys this version does not know. A
field a file may lack (an error file's ``code``, a summary's run settings) is written only when it was set
(pydantic's ``exclude_unset``); a field every file has is required, or named in ``ALWAYS``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from batch.jobs import InvalidLine, Job
from core.errors import WorkerError
from core.results import GenerationMetadata

SIDECAR_FORMAT = "sdxl-batch-item/1"
ERROR_FORMAT = "sdxl-batch-error/1"
PADDING_HINT_SHARE = 0.25  # padding above this share of the work is worth a line at the end of a run


def json_bytes(value: Any, indent: int | None = 2) -> bytes:
    return (json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def why_unreadable(error: ValueError) -> str:
    """What is wrong with a file :meth:`_Record.from_json` refused, on one line (the first few problems)."""
    if not isinstance(error, ValidationError):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    problems = [
        ".".join(str(part) for part in problem["loc"]) + ": " + problem["msg"] if problem["loc"] else problem["msg"]
        for problem in error.errors()[:3]
    ]
    return "; ".join(problems) + (f"; and {error.error_count() - 3} more" if error.error_count() > 3 else "")


def changed_line_message(item_id: str) -> str:
    """Why a line whose id was already made from another request is not made (nor its images replaced)."""
    return (
        f"id {item_id!r} was already made from a different request (see {item_id}.json); give the changed line a "
        "new id, or delete that sidecar to make it again"
    )


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    ALWAYS: ClassVar[tuple[str, ...]] = ()  # fields with a default that every file carries

    def to_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.ALWAYS}, **self.model_dump(exclude_unset=True)}

    def to_json(self, indent: int | None = 2) -> bytes:
        return json_bytes(self.to_dict(), indent)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """The record in ``data``; a ValueError (pydantic's ValidationError is one) when it is not one."""
        return cls.model_validate_json(data)


class ImageRecord(_Record):
    """One image of a done item: its path relative to the output folder, seed, sha256 and size in bytes."""

    file_name: str
    seed: int | None = None
    sha256: str | None = None
    size: int | None = None


class Sidecar(_Record):
    """``<out>/<id>.json``: a done item, with what it was made from and how. Its presence means "done"."""

    ALWAYS = ("format", "status")

    format: str = SIDECAR_FORMAT
    id: str
    line: int  # the line it was made from (lines move when the file is edited)
    status: str = "done"
    request: dict[str, Any]
    seed: int | None = None
    seed_source: str | None = None
    images: tuple[ImageRecord, ...]
    metadata: dict[str, Any] = {}
    generation: dict[str, Any] = {}

    @classmethod
    def build(
        cls, job: Job, images: list[ImageRecord], metadata: GenerationMetadata, generation: dict[str, Any]
    ) -> Sidecar:
        """The sidecar of a done item.

        ``metadata`` keeps only the stable part (what follows from the request and the model), so it is
        identical whichever process, machine or run made the item; timings and the volatile part (device,
        cache hits) go to ``generation`` with the other facts of this particular run.
        """
        return cls(
            id=job.id,
            line=job.line,
            request=job.request.model_dump(mode="json"),
            seed=job.request.seed,
            seed_source=job.seed_source,
            images=tuple(images),
            metadata=metadata.stable,
            generation={**generation, **metadata.volatile, "timings": metadata.timings.to_dict()},
        )

    @property
    def model(self) -> dict[str, Any]:
        """The model's name and manifest hash as the metadata records them (empty when it does not)."""
        model = self.metadata.get("model")
        return model if isinstance(model, dict) else {}


class ErrorRecord(_Record):
    """``<out>/errors/line-<n>.json``: why line n failed. ``kind``: an invalid-line kind (``invalid_json``, ...),
    ``changed_line``, or for a line that failed to generate ``retriable_error``, else who refused it
    (``engine_error``, ``remote_error``)."""

    ALWAYS = ("format",)

    format: str = ERROR_FORMAT
    line: int
    id: str | None = None
    kind: str
    error: str
    retriable: bool
    code: str | None = None  # the error kind's code, for a line that failed to generate
    attempts: int | None = None  # runs in which this line failed so far
    input: str | None = None  # the input file, for an invalid line

    @classmethod
    def invalid(cls, invalid: InvalidLine, source: str) -> ErrorRecord:
        return cls(
            line=invalid.line, id=invalid.id, kind=invalid.kind, error=invalid.message, retriable=False, input=source
        )

    @classmethod
    def failure(cls, job: Job, error: WorkerError, mode: str, attempts: int) -> ErrorRecord:
        kind = "retriable_error" if error.retriable else ("remote_error" if mode == "remote" else "engine_error")
        return cls(
            line=job.line,
            id=job.id,
            kind=kind,
            code=error.code,
            error=str(error),
            retriable=error.retriable,
            attempts=attempts,
        )


class RunLayout(_Record):
    """``<out>/_batch/run.json``: the input and the shard count of the run, for ``status``."""

    input: str
    num_shards: int


class ShardSummary(_Record):
    """``<out>/_batch/shards/summary-<I>-of-<N>.json``: the last run of a shard, as ``run_shard`` returns it."""

    shard: str
    mode: str
    input: str
    lines: int
    items: int
    invalid_lines: int
    already_done: int
    made: int
    done_by_other: int
    failed: int  # refused (not retriable): the engine or the endpoint refused the line
    failed_retriable: int
    remaining: int
    images: int
    pipeline_calls: int
    padded_images: int
    claims_taken_over: int
    commits_lost: int
    seconds: float  # from the first job on (set-up such as the model load excluded)
    setup_seconds: float | None
    items_per_s: float | None
    images_per_s: float | None
    exit_code: int
    stopped: str | None
    # How it ran (the run kind's summary_settings), written only when set.
    batch_size: int | None = None
    deterministic: bool | None = None
    endpoint: str | None = None
    concurrency: int | None = None

    def describe(self) -> str:
        """A few human lines for the end of a run."""
        failed = self.failed + self.failed_retriable + self.invalid_lines
        lines = [
            f"shard {self.shard}: {self.made} made, {self.already_done} already done, "
            f"{self.done_by_other} by another process, {failed} failed "
            f"({self.invalid_lines} invalid lines, {self.failed} refused, "
            f"{self.failed_retriable} retriable), {self.remaining} remaining",
            f"{self.images} images in {self.seconds:.1f} s ({self.images_per_s or 0:.3f} images/s, "
            f"{self.pipeline_calls} pipeline calls, {self.padded_images} padding images); "
            f"exit code {self.exit_code}",
        ]
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        computed = self.images + self.padded_images
        if self.deterministic and computed and self.padded_images / computed >= PADDING_HINT_SHARE:
            lines.append(
                f"{self.padded_images} of the {computed} images computed were padding: with --deterministic each call "
                f"holds --batch-size {self.batch_size} images so an image never depends on its batch mates, and this "
                "input has few images per shape; a smaller --batch-size pads less, --no-deterministic not at all "
                "(images may then differ by float rounding between runs)"
            )
        if failed:
            lines.append("see errors/line-*.json in the output folder for each failed line")
        if self.remaining or self.failed_retriable:
            lines.append("run the same command again to resume: done items are kept, the rest is made")
        return "\n".join(lines)
