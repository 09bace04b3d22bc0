"""What was encoded, for the image metadata: JSON-able, bounded in size whatever the prompt's length."""

from __future__ import annotations

from typing import Any, Final

from worker.prompting.chunks import TokenChunks
from worker.prompting.syntax import BREAK, parse_prompt_attention, weighted_runs
from worker.prompting.texts import FieldText, PromptTexts, Sides
from worker.prompting.vocabulary import Tokenized

_MAX_METADATA_TEXT: Final = 120  # characters of a weighted run shown in metadata
_MAX_METADATA_RUNS: Final = 32  # distinct weighted runs shown in metadata
_MAX_SCHEDULE_TEXT: Final = 1000  # characters of each prompt-editing text shown in metadata


def describe_encoding(
    encoder_names: list[str], weighting: str, sides: Sides, tokenized: Tokenized, num_chunks: int
) -> dict[str, Any]:
    """Tokens and chunks per encoder and side, what was weighted, BREAKs, the weighting mode and ``num_chunks``."""

    def per_encoder(tokens: list[TokenChunks]) -> dict[str, dict[str, int]]:
        return {
            name: {"tokens": chunks.num_tokens, "chunks": chunks.num_chunks}
            for name, chunks in zip(encoder_names, tokens, strict=False)
        }

    # Each distinct (field, text, weight) once, with its count: "(cat:1.5), " * 100 is one entry, not 100.
    weighted: dict[tuple[str, str, float], int] = {}
    positive, negative = sides.positive, sides.negative
    fields: list[FieldText] = [("prompt", positive[0][1]), ("prompt_2", positive[1][1])]
    if negative is not None:
        fields += [("negative_prompt", negative[0][1]), ("negative_prompt_2", negative[1][1])]
    breaks: dict[str, int] = {}
    for index, (field_name, text) in enumerate(fields):
        if index % 2 and text == fields[index - 1][1]:
            continue  # prompt_2 defaulting to prompt (or the same text): report its weights once
        parsed = tokenized.parsed.get(text) or parse_prompt_attention(text)
        for run_text, weight in weighted_runs(parsed):
            shown = run_text if len(run_text) <= _MAX_METADATA_TEXT else run_text[: _MAX_METADATA_TEXT - 1] + "…"
            key = (field_name, shown, round(weight, 6))
            weighted[key] = weighted.get(key, 0) + 1
        if parsed.count(BREAK):
            breaks[field_name] = parsed.count(BREAK)
    weighted_list = [
        {"field": field_name, "text": text, "weight": weight, "count": count}
        for (field_name, text, weight), count in weighted.items()
    ]
    return {
        "weighting": weighting,
        "cache_hit": False,
        "positive": per_encoder(tokenized.positive),
        "negative": per_encoder(tokenized.negative) if tokenized.negative is not None else None,
        "negative_source": sides.negative_source,
        "weighted": weighted_list[:_MAX_METADATA_RUNS],
        "weighted_not_shown": max(0, len(weighted_list) - _MAX_METADATA_RUNS),
        "breaks": breaks,
        "num_chunks": num_chunks,
        "embeddings": list(tokenized.embeddings.values()),  # textual inversions the texts named
    }


def describe_schedule(schedule: list[tuple[int, PromptTexts]], distinct: list[PromptTexts]) -> dict[str, Any]:
    """The prompt-editing schedule: each distinct set of texts once, and the steps that use it."""
    segments, first_step = [], 0
    for last_step, texts in schedule:
        segments.append({"steps": [first_step, last_step], "texts": distinct.index(texts)})
        first_step = last_step + 1

    def shown(text: str) -> str:
        return text if len(text) <= _MAX_SCHEDULE_TEXT else text[: _MAX_SCHEDULE_TEXT - 1] + "…"

    return {
        "texts": [{name: shown(value) for name, value in texts.given().items()} for texts in distinct],
        "segments": segments,
    }
