"""Grouping images into pipeline calls: same-shaped work shares one GPU batch.

Each job is split into single-image units (image k of a request is the same request with
``num_images=1`` and seed ``seed + k``: the engine's rule, so any image can be made alone). Units
with equal keys (the engine's ``group_key``: size, steps, scheduler, guidance, LoRA set, prompt
chunk count) are collected and emitted as calls of ``batch_size`` units.

Order. A shard's lines are taken group by group (:func:`order_jobs`, on the part of the key the
request alone gives: no prompt is encoded to order them), each group in line order, oldest group
first; when the next group starts, the earlier one's last partial call is emitted
(:meth:`Planner.start_group`). So each key has at most one partial call per pass, whatever the mix
of lines. Taken in line order instead, a file of many keys kept pushing partial calls out of the
waiting window, each padded to ``batch_size`` (``bench/batch_padding.py`` measures both).

Determinism. The engine gives every image its own CPU generator, so the noise of an image does
not depend on its batch mates; the arithmetic may. On CPU, the Linear layers whose GEMM M
dimension is the batch (time/text-time embeddings, every ResNet's ``time_emb_proj``) and Conv2d at
batch 1 round differently from larger batches (1/255 pixel differences, measured on the dev
model). Kernels are chosen by shape, so with ``pad=True`` (the runner's ``--deterministic``
default) every call has exactly ``batch_size`` images: a partial call is padded with copies of its
last unit, whose results are dropped. An image is then the same whether it ran alone, in a full
batch, in another shard or after a resume (given the same model, device type, software and
``--batch-size``).

Schedulers that draw their noise per call rather than per image (the "DPM++ SDE" family: one
Brownian tree seeded from the call's first seed) are never split or grouped: the whole request
runs as one call of its own, exactly as the worker runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from batch.jobs import Job
from worker.generation.grouping import fields_key
from worker.generation.seeds import image_seeds
from worker.request.schema import GenerationRequest


@dataclass(frozen=True)
class Unit:
    """Image ``index`` of ``job`` (or the whole job when ``index`` is None) as a request of its own."""

    job: Job
    index: int | None
    request: GenerationRequest

    @property
    def image_indices(self) -> list[int]:
        return list(range(self.job.request.num_images)) if self.index is None else [self.index]


def split_job(job: Job) -> list[Unit]:
    if job.per_call_noise:
        return [Unit(job, None, job.request)]
    seeds = image_seeds(job.request.seed, job.request.num_images)
    return [
        Unit(job, k, job.request.model_copy(update={"seed": seed, "num_images": 1})) for k, seed in enumerate(seeds)
    ]


def group_of(job: Job) -> Hashable:
    """The group :func:`order_jobs` puts ``job`` in: the part of its key its request alone gives."""
    return fields_key(job.request)


def order_jobs(jobs: Iterable[Job]) -> list[Job]:
    """``jobs`` group by group (groups in order of their first job, each in its given order): the runner's order."""
    groups: dict[Hashable, list[Job]] = {}
    for job in jobs:
        groups.setdefault(group_of(job), []).append(job)
    return [job for group in groups.values() for job in group]


@dataclass
class Call:
    """One pipeline call: the units whose images are kept, then padding requests whose images are dropped."""

    units: list[Unit]
    padding: list[GenerationRequest] = field(default_factory=list)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [unit.request for unit in self.units] + self.padding

    @property
    def num_images(self) -> int:
        return sum(request.num_images for request in self.requests)


class Planner:
    """Collects units by key and emits calls; ``window`` bounds how many units wait for batch mates."""

    def __init__(
        self, batch_size: int, pad: bool, key_of: Callable[[Unit], Hashable], window: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.batch_size = batch_size
        self.pad = pad
        self.key_of = key_of
        self.window = window if window is not None else 8 * batch_size
        self._pending: dict[Hashable, list[Unit]] = {}  # insertion order: oldest key first
        self._group: Hashable = None

    @property
    def pending_units(self) -> int:
        return sum(len(units) for units in self._pending.values())

    def add(self, unit: Unit, key: Hashable | None = None) -> list[Call]:
        """Queue ``unit``; returns the calls that became ready (full, alone-by-rule, or pushed out by the window)."""
        if unit.job.per_call_noise:
            return [Call([unit])]  # never grouped, never padded: exactly the worker's call
        key = self.key_of(unit) if key is None else key
        units = self._pending.setdefault(key, [])
        units.append(unit)
        calls = []
        if len(units) == self.batch_size:
            calls.append(self._emit(key))
        while self.pending_units > self.window:
            fullest = max(self._pending, key=lambda k: len(self._pending[k]))  # first such key = oldest
            calls.append(self._emit(fullest))
        return calls

    def start_group(self, group: Hashable) -> list[Call]:
        """Units of ``group`` (an :func:`order_jobs` group) come next: the earlier groups' waiting units get no more
        batch mates, so their calls are emitted now (each key's last, partial call) rather than held."""
        if group == self._group:
            return []
        self._group = group
        return self.flush()

    def flush(self) -> list[Call]:
        """Every waiting unit, as (possibly padded) calls, oldest key first."""
        return [self._emit(key) for key in list(self._pending)]

    def drop_job(self, job_id: str) -> None:
        """Forget the waiting units of a job that failed elsewhere."""
        for key in list(self._pending):
            self._pending[key] = [unit for unit in self._pending[key] if unit.job.id != job_id]
            if not self._pending[key]:
                del self._pending[key]

    def _emit(self, key: Hashable) -> Call:
        return self.make_call(self._pending.pop(key))

    def make_call(self, units: list[Unit]) -> Call:
        """A call of ``units`` (same key), padded to ``batch_size`` images when padding is on."""
        if len(units) == 1 and units[0].job.per_call_noise:
            return Call(units)
        padding = []
        if self.pad and len(units) < self.batch_size:
            padding = [units[-1].request] * (self.batch_size - len(units))
        return Call(units, padding)
