"""The four prompt fields of a request: which text each encoder side gets, and their joint prompt-editing schedule.

Sides, as in diffusers
    Positive: ``prompt`` goes to the first encoder, ``prompt_2 or prompt`` to the second. The negative side exists
    only with classifier-free guidance: ``negative_prompt=None`` with ``force_zeros_for_empty_prompt`` (SDXL base)
    gives zeros of the positive's shape; otherwise ``negative_prompt or ""`` goes to encoder 1 and
    ``negative_prompt_2 or negative_prompt`` to encoder 2.

Schedule
    Each of the four texts gets A1111's schedule (:func:`.schedule.prompt_schedule`); the union of their segment ends
    splits the steps into segments with one text per field each.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Final

from core.errors import InvalidRequest
from worker.prompting.chunks import MAX_CHUNKS_PER_SCHEDULE
from worker.prompting.schedule import has_editing_syntax, prompt_schedule, text_at_step

FIELD_NAMES: Final = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")

FieldText = tuple[str, str]  # (field name, text), the field named in errors and metadata


@dataclass(frozen=True)
class PromptTexts:
    """The four prompt fields of one request (or of one segment of an edited prompt), as given."""

    prompt: str
    prompt_2: str | None
    negative_prompt: str | None
    negative_prompt_2: str | None

    @classmethod
    def checked(
        cls, prompt: str, prompt_2: str | None, negative_prompt: str | None, negative_prompt_2: str | None
    ) -> PromptTexts:
        """The fields, after a ``TypeError`` for anything but a string (or None where a field is optional)."""
        for field_name, value in zip(FIELD_NAMES, (prompt, prompt_2, negative_prompt, negative_prompt_2), strict=True):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{field_name}: expected a string, got {type(value).__name__}")
        if prompt is None:
            raise TypeError("prompt: expected a string, got None")
        return cls(prompt, prompt_2, negative_prompt, negative_prompt_2)

    def given(self) -> dict[str, str]:
        """The fields that are not None, by name."""
        return {name: text for name, text in zip(FIELD_NAMES, astuple(self), strict=True) if text is not None}


@dataclass(frozen=True)
class Sides:
    """(field, text) per encoder for each side, and where the negative comes from."""

    positive: list[FieldText]
    negative_source: str  # "encoded", "zeros" (force_zeros_for_empty_prompt) or "none" (no guidance)
    negative: list[FieldText] | None  # only when negative_source is "encoded"


def encoder_sides(texts: PromptTexts, cfg: bool, force_zeros_for_empty_prompt: bool) -> Sides:
    """The texts each encoder gets on each side, with diffusers' defaults (see the module docstring)."""
    # diffusers' ``or``: an empty prompt_2 falls back to the prompt.
    positive = [
        ("prompt", texts.prompt),
        ("prompt_2", texts.prompt_2) if texts.prompt_2 else ("prompt", texts.prompt),
    ]
    if not cfg:
        return Sides(positive, "none", None)
    if texts.negative_prompt is None and force_zeros_for_empty_prompt:
        return Sides(positive, "zeros", None)
    negative_1 = ("negative_prompt", texts.negative_prompt or "")
    negative_2 = ("negative_prompt_2", texts.negative_prompt_2) if texts.negative_prompt_2 else negative_1
    return Sides(positive, "encoded", [negative_1, negative_2])


def edit_schedule(texts: PromptTexts, steps: int) -> list[tuple[int, PromptTexts]] | None:
    """``[(last_step, texts), ...]`` when any field uses prompt editing; None when none does.

    The union of the fields' segment ends splits the steps; consecutive segments with equal texts merge, and
    segments ending before step 0 (a negative ``when``) are never used, so they are left out.
    """
    fields = astuple(texts)
    if not any(text is not None and has_editing_syntax(text) for text in fields):
        return None
    schedules = [None if text is None else prompt_schedule(text, steps) for text in fields]
    ends = sorted({end for schedule in schedules if schedule for end, _ in schedule if end >= 0})
    segments: list[tuple[int, PromptTexts]] = []
    for end in ends:
        at_end = PromptTexts(*(None if schedule is None else text_at_step(schedule, end) for schedule in schedules))
        if segments and segments[-1][1] == at_end:
            segments[-1] = (end, at_end)
        else:
            segments.append((end, at_end))
    if len(segments) == 1 and segments[0][1] == texts:
        return None  # editing-like brackets that edit nothing: exactly the plain encode
    return segments


def schedule_too_large(texts: PromptTexts, distinct: int, chunks: int) -> InvalidRequest:
    """The error for a schedule over :data:`.chunks.MAX_CHUNKS_PER_SCHEDULE`, naming the edited fields."""
    edited = [name for name, text in texts.given().items() if has_editing_syntax(text)]
    return InvalidRequest(
        f"{' and '.join(edited)}: prompt editing makes {distinct} distinct texts, each held at the longest one's "
        f"length ({chunks} chunks or more): at least {distinct * chunks} chunks of conditioning, over the limit of "
        f"{MAX_CHUNKS_PER_SCHEDULE}; use fewer alternations ([a|b]) or edits, or shorten the longest text"
    )
