"""A1111 attention syntax for prompts: pure Python, no torch.

``parse_prompt_attention(text)`` turns a prompt into ``[(text, weight), ...]`` runs, the representation
AUTOMATIC1111's web UI uses, so weighted prompts copied from it mean the same thing here:

- ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` multiplies it by 1.3
  (spaces are allowed around the number: ``(x: 1.3 )``). Nesting multiplies: ``((x))`` is 1.21.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters. A backslash before any other character is a
  literal backslash (A1111 silently drops it; dropping text the user typed helps nobody).
- Brackets still open at the end of the prompt are closed there (so ``(x`` is ``(x)``); a closing bracket with no
  opener is literal text.
- ``BREAK`` (the uppercase word, with the whitespace around it) forces a chunk boundary. It appears in the result as
  the item ``BREAK == ("BREAK", -1.0)``, A1111's own marker. Every other item has a positive, finite weight, so the
  marker can never be confused with the text "BREAK". Unlike A1111 the marker's weight is never multiplied by
  enclosing brackets (there, ``(a BREAK b)`` turned the marker into the text "BREAK").
- Adjacent runs of equal weight merge, and empty runs are dropped; a prompt with no text gives ``[("", 1.0)]``.
- Weights are clamped into ``[MIN_WEIGHT, MAX_WEIGHT]``: ``(x:0)``, ``(x:-1)``, a number too large for a float, or
  hundreds of nested brackets would otherwise give a zero, negative or infinite weight, which the encoder cannot use.

A weight is written only as a plain decimal number (``1``, ``1.3``, ``.5``, ``+1.2``); ``(x:abc)`` or ``(x:1.2.3)``
is not a weight, so the colon and what follows are text (A1111 crashed on the latter).

A1111's prompt editing (``[from:to:when]``) and alternation (``[a|b]``) are not part of this syntax: such text is
parsed as plain brackets.
"""

from __future__ import annotations

import math
import re
from typing import Final

ROUND_BRACKET_MULTIPLIER: Final = 1.1
SQUARE_BRACKET_MULTIPLIER: Final = 1 / 1.1
MIN_WEIGHT: Final = 0.01
MAX_WEIGHT: Final = 100.0
BREAK: Final[tuple[str, float]] = ("BREAK", -1.0)

# One alternative per token of the syntax, tried in order (A1111's regex, with a strict number and lone backslashes
# made literal): escapes, a lone backslash, openers, an explicit weight closing a round bracket, closers, plain text
# (anything without syntax characters), a colon that is not part of a weight.
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


def _clamp_weight(weight: float) -> float:
    if math.isnan(weight):
        return 1.0
    return min(MAX_WEIGHT, max(MIN_WEIGHT, weight))


def _nested_products(intervals: list[tuple[int, int, float]], length: int) -> list[float]:
    """Per run, the product of the multipliers of the intervals enclosing it, clamped.

    The intervals come from one bracket stack, so they are nested or disjoint: a sweep with a stack of running
    products gives every run its weight in linear time (multiplying ranges when brackets close, as A1111 does, is
    quadratic: thousands of nested brackets in a 20,000-character prompt would take seconds). Products run from the
    outermost bracket inwards, so ``((x))`` is exactly ``1.1 * 1.1``, and a run enclosed by nothing is exactly 1.0.
    """
    ordered = sorted((start, -end, multiplier) for start, end, multiplier in intervals if end > start)
    products = [1.0] * length
    open_products: list[tuple[int, float]] = []  # (end, running product), innermost last
    next_interval = 0
    for position in range(length):
        while open_products and open_products[-1][0] <= position:
            open_products.pop()
        while next_interval < len(ordered) and ordered[next_interval][0] <= position:
            _, negative_end, multiplier = ordered[next_interval]
            next_interval += 1
            outer = open_products[-1][1] if open_products else 1.0
            open_products.append((-negative_end, outer * multiplier))
        if open_products:
            products[position] = _clamp_weight(open_products[-1][1])
    return products


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` runs, with ``BREAK`` items between chunks; see the module docstring.

    >>> parse_prompt_attention("a (cat:1.5) on [a] BREAK mat")
    [('a ', 1.0), ('cat', 1.5), (' on ', 1.0), ('a', 0.9090909090909091), ('BREAK', -1.0), ('mat', 1.0)]
    """
    runs: list[str | None] = []  # text runs in order; None marks a BREAK
    round_brackets: list[int] = []  # index in ``runs`` where each open bracket started
    square_brackets: list[int] = []
    round_intervals: list[tuple[int, int, float]] = []  # (start, end, multiplier) over ``runs``, end exclusive
    square_intervals: list[tuple[int, int, float]] = []

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if token.startswith("\\"):
            runs.append(token[1:] if len(token) == 2 else token)
        elif token == "(":
            round_brackets.append(len(runs))
        elif token == "[":
            square_brackets.append(len(runs))
        elif weight is not None and round_brackets:
            round_intervals.append((round_brackets.pop(), len(runs), _clamp_weight(float(weight))))
        elif token == ")" and round_brackets:
            round_intervals.append((round_brackets.pop(), len(runs), ROUND_BRACKET_MULTIPLIER))
        elif token == "]" and square_brackets:
            square_intervals.append((square_brackets.pop(), len(runs), SQUARE_BRACKET_MULTIPLIER))
        else:
            # Plain text, or syntax that is literal here (a stray closer, a colon, ":1.3)" with no open bracket).
            for index, part in enumerate(_BREAK_WORD.split(token)):
                if index > 0:
                    runs.append(None)
                runs.append(part)

    # Brackets still open at the end close there.
    round_intervals += [(start, len(runs), ROUND_BRACKET_MULTIPLIER) for start in round_brackets]
    square_intervals += [(start, len(runs), SQUARE_BRACKET_MULTIPLIER) for start in square_brackets]
    round_products = _nested_products(round_intervals, len(runs))
    square_products = _nested_products(square_intervals, len(runs))

    result: list[tuple[str, float]] = []
    for run_text, round_product, square_product in zip(runs, round_products, square_products, strict=True):
        if run_text is None:
            result.append(BREAK)  # never multiplied: a bracket around BREAK does not turn it into text
        elif run_text:
            weight = _clamp_weight(round_product * square_product)
            if result and result[-1] != BREAK and result[-1][1] == weight:
                result[-1] = (result[-1][0] + run_text, weight)  # adjacent runs of equal weight merge
            else:
                result.append((run_text, weight))
    if all(item == BREAK for item in result):
        result.insert(0, ("", 1.0))
    return result


def split_at_breaks(parsed: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    """The runs between ``BREAK`` items: one list per forced chunk (possibly empty)."""
    sections: list[list[tuple[str, float]]] = [[]]
    for item in parsed:
        if item == BREAK:
            sections.append([])
        else:
            sections[-1].append(item)
    return sections


def is_plain(parsed: list[tuple[str, float]]) -> bool:
    """True when the parse is one unweighted run: the text then tokenizes exactly as the raw prompt would."""
    return len(parsed) == 1 and parsed[0][1] == 1.0


def weighted_runs(parsed: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The runs whose weight is not 1 (for metadata)."""
    return [item for item in parsed if item != BREAK and item[1] != 1.0]


def escape_prompt_text(text: str) -> str:
    r"""Escape ``( ) [ ] \`` so ``text`` parses as itself with weight 1 (``BREAK`` cannot be escaped)."""
    return re.sub(r"([()\[\]\\])", r"\\\1", text)
