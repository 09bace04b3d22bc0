"""A1111 attention syntax for prompts: ``parse_prompt_attention(text)`` gives ``[(text, weight), ...]`` runs.

This is AUTOMATIC1111's ``modules/prompt_parser.py`` ``parse_prompt_attention`` as of A1111 1.10.x (the SDXL
releases; compared against master at commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906), so weighted prompts copied from
its web UI give the same runs, weights (to the last bit) and therefore the same tokens here:

- ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` multiplies it by 1.3. Nesting
  multiplies. Weights are taken as written: ``(x:0)`` is 0 and ``(x:-1)`` is -1, nothing is clamped.
- Whitespace around the number is allowed, as in A1111 since 1.6: ``(masterpiece: 1.2)`` and ``(x: 1.3 )`` are
  weights 1.2 and 1.3 (A1111's ``:\\s*([+-]?[.\\d]+)\\s*\\)``), and the whitespace is not part of the text.
- Multipliers are applied in A1111's order: when a bracket closes it multiplies every run opened since its opening
  bracket; brackets still open at the end close there, round ones first, then square ones, each outermost first. The
  order matters in floating point: in ``((sun[(set)]))`` both runs end up at exactly ``1.1 * 1.1`` and merge into one
  run, so ``sunset`` is tokenized as one word, as in A1111.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a backslash before any other character is
  dropped (A1111 does the same). A closing bracket with no opener is literal text.
- ``BREAK`` (the uppercase word, with the whitespace around it) forces a chunk boundary: it appears as the item
  ``BREAK == ("BREAK", -1.0)``, A1111's own marker. A leading or doubled ``BREAK`` gives an empty (padding) chunk, as
  in A1111 (the chunker in :mod:`worker.prompting.chunks` does that).
- Adjacent runs of equal weight merge, exactly as A1111 merges them (an empty run between two runs keeps them apart
  there too); empty runs are then dropped. A prompt with no text gives ``[("", 1.0)]``.

Two deliberate differences from A1111, both where A1111 1.10 does something no prompt writer means:

1. ``BREAK`` inside brackets is still a chunk boundary. A1111 multiplies its marker's weight by the bracket, after
   which it is no longer the marker and the word "BREAK" is encoded as text.
2. A weight is a plain decimal number (``1``, ``1.3``, ``.5``, ``+1.2``, ``1.``, with optional whitespace around it);
   anything else after the colon, such as ``(x:1.2.3)`` or ``(x:.)``, is literal text. A1111 raises an error on those
   and the whole generation fails.

A weight can overflow to infinity (a number over 1.8e308, or about 7,500 nested round brackets); the parser returns it
as computed and the encoder refuses it, naming the field. Prompt editing (``[a:b:when]``, ``[a|b]``) is resolved before
this parser runs: see :mod:`worker.prompting.schedule`.
"""

from __future__ import annotations

import re
from typing import Final

import numpy as np

ROUND_BRACKET_MULTIPLIER: Final = 1.1
SQUARE_BRACKET_MULTIPLIER: Final = 1 / 1.1
BREAK: Final[tuple[str, float]] = ("BREAK", -1.0)

# A1111 1.10's token regex, in its order (escapes, a lone backslash, openers, an explicit weight closing a round
# bracket, whitespace allowed around it, closers, plain text, a colon), with the weight number made strict: A1111's
# [.\d]+ also matches "1.2.3", which float() then rejects (deliberate difference 2).
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]
    | \\
    | \(
    | \[
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)
    | \)
    | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def _apply_multipliers(events: list[tuple[int, int, float]], length: int) -> list[float]:
    """Each run's weight: 1.0 times the multipliers of ``events`` ``(start, end, multiplier)`` covering it, in order.

    The same floating-point operations as A1111's ``multiply_range``, one event after the other, but each event is one
    vectorised slice multiplication, so a 20,000-character prompt of thousands of nested brackets stays fast
    (``test_deep_nesting_is_fast`` in tests/worker/test_prompt_syntax.py bounds it).
    """
    weights = np.ones(length, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for start, end, multiplier in events:
            if end > start:
                weights[start:end] *= multiplier
    return weights.tolist()


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` runs, with ``BREAK`` items between chunks; see the module docstring.

    >>> parse_prompt_attention("a (cat:1.5) on [a] BREAK mat")
    [('a ', 1.0), ('cat', 1.5), (' on ', 1.0), ('a', 0.9090909090909091), ('BREAK', -1.0), ('mat', 1.0)]
    """
    runs: list[str | None] = []  # A1111's ``res`` in order; None marks a BREAK
    events: list[tuple[int, int, float]] = []  # A1111's multiply_range calls: (start, end exclusive, multiplier)
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if token.startswith("\\"):
            runs.append(token[1:])  # a lone backslash gives an empty run: dropped, as in A1111
        elif token == "(":
            round_brackets.append(len(runs))
        elif token == "[":
            square_brackets.append(len(runs))
        elif weight is not None and round_brackets:
            events.append((round_brackets.pop(), len(runs), float(weight)))
        elif token == ")" and round_brackets:
            events.append((round_brackets.pop(), len(runs), ROUND_BRACKET_MULTIPLIER))
        elif token == "]" and square_brackets:
            events.append((square_brackets.pop(), len(runs), SQUARE_BRACKET_MULTIPLIER))
        else:
            for index, part in enumerate(_BREAK_WORD.split(token)):
                if index > 0:
                    runs.append(None)
                runs.append(part)

    # Still open at the end: A1111 closes the round ones, then the square ones, each list from its first (outermost).
    events += [(start, len(runs), ROUND_BRACKET_MULTIPLIER) for start in round_brackets]
    events += [(start, len(runs), SQUARE_BRACKET_MULTIPLIER) for start in square_brackets]
    weights = _apply_multipliers(events, len(runs))

    # A1111 merges neighbours of equal weight (empty runs included) before anything is dropped; a BREAK never merges.
    merged: list[list] = []
    for run_text, weight in zip(runs, weights, strict=True):
        if run_text is None:
            merged.append([None, 0.0])
        elif merged and merged[-1][0] is not None and merged[-1][1] == weight:
            merged[-1][0] += run_text
        else:
            merged.append([run_text, weight])

    result: list[tuple[str, float]] = [
        BREAK if run_text is None else (run_text, w) for run_text, w in merged if run_text != ""
    ]
    if all(item == BREAK for item in result):
        result.insert(0, ("", 1.0))
    return result


def weighted_runs(parsed: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The runs whose weight is not 1 (for metadata)."""
    return [item for item in parsed if item != BREAK and item[1] != 1.0]
