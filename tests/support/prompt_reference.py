"""Reference behaviour of AUTOMATIC1111's stable-diffusion-webui 1.10.x prompt handling, for tests only.

The version compared against is A1111 1.10.x (the last SDXL-era releases, July 2024), read at
https://github.com/AUTOMATIC1111/stable-diffusion-webui:

- ``modules/prompt_parser.py`` at master commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906: ``parse_prompt_attention``
  (its ``re_attention`` with ``:\\s*([+-]?[.\\d]+)\\s*\\)``, whitespace around a weight allowed since 1.6) and
  ``get_learned_conditioning_prompt_schedules`` (the lark grammar with ``[WHITESPACE] NUMBER [WHITESPACE]`` and empty
  alternatives, and the 1.6+ rule that a ``when`` written with a decimal point is a fraction), default settings
  (``use_old_scheduling`` off, no hires pass);
- ``modules/sd_hijack_clip.py`` ``tokenize_line`` (the chunk layout and comma backtrack, default
  ``comma_padding_backtrack`` 20; unchanged from 1.8's emphasis option through 1.10);
- ``modules/processing.py`` ``setup_conds`` (the schedule is computed over ``steps * step_multiplier``, 2 for a
  sampler declared ``second_order``), ``modules/sd_samplers_kdiffusion.py`` (which samplers are second-order) and
  ``modules/sd_samplers_cfg_denoiser.py`` (the schedule's step counter counts every model call, from 0).

Independent re-implementations (A1111 is AGPL-3.0; no code is copied here): written the straightforward, slow way A1111
does them (a range multiplication every time a bracket closes; a chunk filled token by token; the schedule through a
lark parse tree), with A1111's quirks kept (a lone backslash dropped, a bracketed BREAK turned into text, a malformed
number raising), so the production code can be compared with them. The prompt-editing grammar is A1111's language
definition and is stated as such (:data:`A1111_SCHEDULE_GRAMMAR`); A1111 1.10 pins lark 1.1.2, the tests run the lark of
requirements-dev.txt.

Also the test-only helpers that used to live in the production parser: :func:`split_at_breaks`, :func:`is_plain`,
:func:`escape_prompt_text`.
"""

from __future__ import annotations

import re
from typing import Any

from worker.prompting.syntax import BREAK

# A1111 1.10's token alternatives, in its order: the five escapes, a lone backslash, "(", "[", ": <number> )" with
# whitespace allowed around a loose number (digits and dots, so "1.2.3" matches and float() then fails), ")", "]",
# text, ":".
_A1111_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
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


# ---- prompt editing: A1111 1.10's get_learned_conditioning_prompt_schedules ------------------------------------------

# A1111 1.10's prompt-editing grammar (its ``schedule_parser``), the language definition that decides what is editing.
A1111_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""

_schedule_parser = None


def _a1111_schedule_parser() -> Any:
    global _schedule_parser
    if _schedule_parser is None:
        import lark

        # lark's defaults, as A1111 constructs it: Earley, dynamic lexer, ambiguity resolved, placeholders for [x].
        _schedule_parser = lark.Lark(A1111_SCHEDULE_GRAMMAR)
    return _schedule_parser


def _a1111_end_step(number: str, steps: int) -> int:
    """A1111 1.10 (use_old_scheduling off, no hires): a number with a "." is a fraction of the steps, else a step.

    Raises OverflowError for a number too large for a float, as A1111 does.
    """
    value = float(number)
    if "." in number:
        value = value * steps
    return min(steps, int(value))


def _a1111_render(node: object, step: int, whens: dict[int, int]) -> str:
    """The text of a parse (sub)tree at schedule point ``step``, as A1111's ``AtStep`` transformer flattens it."""
    import lark

    if node is None:
        return ""
    if isinstance(node, lark.Token):
        return str(node)
    assert isinstance(node, lark.Tree)
    if node.data == "scheduled":
        before, after = node.children[0], node.children[1]
        return _a1111_render(before if step <= whens[id(node)] else after, step, whens)
    if node.data == "alternate":
        options = node.children  # a missing option is None: the empty text
        return _a1111_render(options[(step - 1) % len(options)], step, whens)
    return "".join(_a1111_render(child, step, whens) for child in node.children)


def a1111_prompt_schedule(prompt: str, steps: int) -> list[list]:
    """A1111 1.10's ``get_learned_conditioning_prompt_schedules([prompt], steps)[0]``: ``[[end_step, text], ...]``.

    A prompt the grammar rejects is one segment, the text as written. Only steps of at least 1 start a segment, but a
    ``when`` below 1 still decides its group's text (``[e:0]`` reads ``e`` from the first step).
    """
    import lark

    try:
        tree = _a1111_schedule_parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [[steps, prompt]]
    ends, whens = {steps}, {}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            whens[id(node)] = _a1111_end_step(str(node.children[-2]), steps)
            if whens[id(node)] >= 1:
                ends.add(whens[id(node)])
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return [[end, _a1111_render(tree, end, whens)] for end in sorted(ends)]


def a1111_text_at_call(schedule: list[list], call: int) -> str:
    """A1111's lookup at model call ``call`` (its denoiser's step counter, from 0): the first segment ending at or
    after it; past the last one A1111 falls back to the first (a counter never gets there in A1111)."""
    for end, text in schedule:
        if call <= end:
            return text
    return schedule[0][1]


# A1111 1.10's k-diffusion samplers flagged ``second_order`` (modules/sd_samplers_kdiffusion.py): ``setup_conds``
# computes the prompt schedule over twice the requested steps for them, and the counter counts every model call. Since
# 1.9 "Karras" is a schedule type, not a sampler, so the older "DPM2 Karras" is "DPM2" with the Karras schedule.
A1111_SECOND_ORDER_SAMPLERS = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"})
A1111_FIRST_ORDER_SAMPLERS = frozenset({
    "Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
    "DDIM", "PLMS", "UniPC",  # modules/sd_samplers_timesteps.py
})  # fmt: skip


def a1111_schedule_steps(sampler: str, steps: int) -> int:
    """The steps A1111 1.10 computes a prompt's schedule over: ``steps * step_multiplier``."""
    base = sampler.removesuffix(" Karras")
    if base not in A1111_SECOND_ORDER_SAMPLERS | A1111_FIRST_ORDER_SAMPLERS:
        raise KeyError(f"{sampler!r} is not an A1111 1.10 sampler")
    return steps * (2 if base in A1111_SECOND_ORDER_SAMPLERS else 1)
