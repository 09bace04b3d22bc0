"""Reference behaviour of AUTOMATIC1111's stable-diffusion-webui prompt handling, for tests only.

Independent re-implementations of the algorithms in A1111's ``modules/prompt_parser.py`` (``parse_prompt_attention``)
and ``modules/sd_hijack_clip.py`` (``tokenize_line``), https://github.com/AUTOMATIC1111/stable-diffusion-webui
(AGPL-3.0; no code is copied here): written the straightforward, slow way A1111 does them (a range multiplication
every time a bracket closes; a chunk filled token by token), with A1111's quirks kept (a lone backslash dropped, a
bracketed BREAK turned into text, a malformed number raising), so the production code can be compared with them.

Also the test-only helpers that used to live in the production parser: :func:`split_at_breaks`, :func:`is_plain`,
:func:`escape_prompt_text`.
"""

from __future__ import annotations

import re

from worker.prompting.syntax import BREAK

# A1111's token alternatives, in its order: the five escapes, a lone backslash, "(", "[", ":<number>)" with a loose
# number (digits and dots, so "1.2.3" matches and float() then fails), ")", "]", text, ":".
_A1111_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:")
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_parse_prompt_attention(text: str) -> list[list]:
    """A1111's ``[[text, weight], ...]``: raises ValueError where A1111 does (a weight like ``1.2.3``)."""
    result: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for entry in result[start:]:
            entry[1] *= factor

    for match in _A1111_TOKEN.finditer(text):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\"):
            result.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(result))
        elif token == "[":
            square_open.append(len(result))
        elif number is not None and round_open:
            scale_from(round_open.pop(), float(number))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_A1111_BREAK.split(token)):
                if index:
                    result.append(["BREAK", -1])
                result.append([part, 1.0])
    for start in round_open:
        scale_from(start, 1.1)
    for start in square_open:
        scale_from(start, 1 / 1.1)
    if not result:
        result = [["", 1.0]]
    merged: list[list] = [result[0]]
    for entry in result[1:]:
        if entry[1] == merged[-1][1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    return merged


def has_bracketed_break(reference: list[list]) -> bool:
    """True when A1111 multiplied a BREAK marker (a BREAK inside brackets), one of the two deliberate differences.

    The multiplied marker is no longer ``["BREAK", -1]``; with a weight of 0 it even equals its neighbours' (-0.0 ==
    0.0) and A1111 merges it into them (``( BREAK asset:0)`` -> ``["BREAKasset", 0]``), so any other run holding the
    uppercase word counts, word boundary or not.
    """
    return any("BREAK" in text and [text, weight] != ["BREAK", -1] for text, weight in reference)


def as_production_runs(reference: list[list]) -> list[tuple[str, float]]:
    """A1111's result in the production parser's form: empty runs dropped, BREAK markers as ``BREAK``."""
    runs = [BREAK if (text, weight) == ("BREAK", -1) else (text, weight) for text, weight in reference if text != ""]
    if all(run == BREAK for run in runs):
        runs.insert(0, ("", 1.0))
    return runs


def a1111_chunks(
    runs: list[tuple[list[int], float] | None], comma_token: int, chunk_length: int = 75, backtrack: int = 20
) -> list[tuple[list[int], list[float]]]:
    """A1111's ``tokenize_line`` chunking, token by token: ``(tokens, weights)`` per chunk, without BOS/EOS/padding.

    ``runs`` holds ``(token_ids, weight)`` per parsed run and None for a BREAK marker.
    """
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for run in runs:
        if run is None:
            next_chunk()  # even an empty chunk: a leading or doubled BREAK pads
            continue
        run_tokens, weight = run
        for token in run_tokens:
            if token == comma_token:
                last_comma = len(tokens)
            elif (
                backtrack and len(tokens) == chunk_length and last_comma != -1 and len(tokens) - last_comma <= backtrack
            ):
                split = last_comma + 1
                moved = tokens[split:], weights[split:]
                tokens, weights = tokens[:split], weights[:split]
                next_chunk()
                tokens, weights = moved
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


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


def escape_prompt_text(text: str) -> str:
    r"""Escape ``( ) [ ] \`` so ``text`` parses as itself with weight 1 (``BREAK`` cannot be escaped)."""
    return re.sub(r"([()\[\]\\])", r"\\\1", text)
