"""A1111 prompt editing: ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and alternation ``[a|b]``.

``prompt_schedule(text, steps)`` returns A1111 1.10's schedule for one prompt: ``[(end_step, plain_text), ...]``, the
same list as ``get_learned_conditioning_prompt_schedules([text], steps)[0]`` in AUTOMATIC1111's
``modules/prompt_parser.py`` with its default settings (``use_old_scheduling`` off, no hires pass): an independent
implementation of its grammar and semantics, checked against a port of A1111 1.10's own lark grammar in the tests.

- ``when`` is a number. Written with a decimal point (``0.5``, ``.5``, ``1.``, ``2.5``) it is a fraction of ``steps``,
  otherwise a step number (``3``, ``1e1``); either way ``min(steps, int(...))``. So ``[b:1.]`` at 10 steps ends at
  step 10 (``b`` is never read by a first-order sampler) and ``[b:15]`` at 10 steps too. Whitespace may stand on both
  sides of the number (``[a:b: 2 ]``).
- ``[from:to:when]`` reads ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` has an empty ``from`` and
  ``[from::when]`` an empty ``to``. Only an end of at least step 1 starts a new segment, but a ``when`` below 1 still
  decides what its group reads: ``[e:0]`` and ``[a:e:-1]`` read ``e`` from the first step. Editing nests:
  ``a[b:[c:d:2]:1]e``.
- ``[a|b|c]`` switches every step (step 1 ``a``, step 2 ``b``, ...), each alternative read whole: ``[x (y)|z]``
  alternates between ``x (y)`` and ``z``. An alternative may be empty: ``[fe|]male`` alternates ``female`` and
  ``male``.
- Round and square brackets, escapes and weights are left in the texts for the attention parser
  (:mod:`worker.prompting.syntax`). Brackets that close nothing are literal text.
- A prompt the grammar does not accept as a whole (a ``|`` outside an alternation, a backslash at the end or before a
  line break) has no editing: its one segment is the text as written. ``AND`` is literal text (A1111's composable
  diffusion is not implemented).

``text_at_step(schedule, step)`` is A1111's lookup during sampling: the text of the first segment whose
``end_step >= step``, where ``step`` counts model calls from 0. So ``a [b:3]`` with 10 steps reads ``a `` for steps
0 to 3 and ``a b`` from step 4, exactly as A1111 does. A1111 computes the schedule over ``steps`` times 2 for its
second-order samplers, whose step counter counts both calls of a step (:func:`worker.request.samplers.schedule_steps`
gives that count here).

One known divergence, where A1111's grammar is ambiguous: an editing group directly followed by a ``[``, ``]``,
``(``, ``)`` or ``:`` that closes nothing (``[a:b:2]:``, ``[a:b:2]](``) can be read by A1111's grammar either as the
group or as plain text (its start rule also takes those characters as text), and lark's Earley parser picks one.
With lark 1.1.2, the version A1111 1.10 pins, the pick depends on Python's string hashing, so it changes from one
start of A1111 to the next: ``x [a:b:2]: y`` was edited under 8 of 16 ``PYTHONHASHSEED`` values and plain text under
the rest. lark 1.3.1 picks the group when one such character follows and sometimes plain text when two or more do.
Here it is always the group. The differential test in ``tests/worker/test_prompt_schedule.py`` (lark 1.3.1) leaves
out a group followed by two or more such characters and compares everything else with A1111 1.10's grammar and
schedule code at 1, 2, 10, 20, 30, 50 and 150 steps.

Two differences from A1111, both where A1111 fails: a ``when`` too large for a float (``1e400``) means ``steps``
(A1111 raises OverflowError), and brackets nested deeper than :data:`MAX_NESTING` levels make the whole prompt plain
text (A1111 overflows the Python stack on such prompts). The parser is linear in the prompt's length.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

MAX_NESTING: Final = 100

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # no DOTALL: a backslash escapes any character but a line break
_WHITESPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_STRAY = frozenset("[]():")  # brackets and colons the grammar allows, as text, outside any group


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None
    after: tuple
    when: str  # as written: A1111 reads a number with a decimal point as a fraction


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]


class _Unparseable(Exception):
    """The grammar does not accept the prompt: it has no editing."""


class _Parser:
    """A packrat (memoising) recursive-descent parser of A1111's schedule grammar; linear in the prompt's length."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._prompts: dict[int, tuple[tuple, int]] = {}
        self._groups: dict[int, tuple[object, int] | None] = {}
        self._depth = 0

    def start(self) -> tuple:
        """``start: (prompt | /[][():]/+)*``."""
        text, nodes, position = self.text, [], 0
        while position < len(text):
            prompt, end = self.prompt(position)
            if end > position:
                nodes.append(prompt)
                position = end
            elif text[position] in _STRAY:
                nodes.append(text[position])
                position += 1
            else:
                raise _Unparseable(position)
        return tuple(nodes)

    def prompt(self, position: int) -> tuple[tuple, int]:
        """``prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*``, as long as it goes."""
        memo = self._prompts.get(position)
        if memo is not None:
            return memo
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise _Unparseable(position)
        start, nodes, text = position, [], self.text
        while position < len(text):
            plain = _PLAIN.match(text, position)
            if plain:
                nodes.append(plain.group())
                position = plain.end()
                continue
            group = self.group(position) if text[position] in "([" else None
            if group is None:
                break
            nodes.append(group[0])
            position = group[1]
        self._depth -= 1
        self._prompts[start] = (tuple(nodes), position)
        return self._prompts[start]

    def group(self, position: int) -> tuple[object, int] | None:
        """An emphasized, scheduled or alternate group opening at ``position``, or None."""
        if position not in self._groups:
            opener = self.text[position]
            self._groups[position] = self._round(position) if opener == "(" else self._square(position)
        return self._groups[position]

    def _char(self, position: int) -> str:
        return self.text[position] if position < len(self.text) else ""

    def _round(self, position: int) -> tuple[object, int] | None:
        """``"(" prompt ")"`` or ``"(" prompt ":" prompt ")"``: text for the attention parser."""
        inner, end = self.prompt(position + 1)
        if self._char(end) == ")":
            return ("(", inner, ")"), end + 1
        if self._char(end) == ":":
            weight, close = self.prompt(end + 1)
            if self._char(close) == ")":
                return ("(", inner, ":", weight, ")"), close + 1
        return None

    def _square(self, position: int) -> tuple[object, int] | None:
        first, end = self.prompt(position + 1)
        following = self._char(end)
        if following == "]":
            return ("[", first, "]"), end + 1
        if following == "|":
            options = [first]
            while self._char(end) == "|":
                option, end = self.prompt(end + 1)
                options.append(option)
            return (_Alternate(tuple(options)), end + 1) if self._char(end) == "]" else None
        if following == ":":
            # ``[to:when]`` ...
            number = self._number_and_close(end + 1)
            if number is not None:
                return _Scheduled(None, first, number[0]), number[1]
            # ... or ``[from:to:when]``.
            second, end = self.prompt(end + 1)
            if self._char(end) == ":":
                number = self._number_and_close(end + 1)
                if number is not None:
                    return _Scheduled(first, second, number[0]), number[1]
        return None

    def _number_and_close(self, position: int) -> tuple[str, int] | None:
        """``[WHITESPACE] NUMBER [WHITESPACE] "]"`` at ``position``: the number as written and the position after the
        bracket."""
        whitespace = _WHITESPACE.match(self.text, position)
        if whitespace:
            position = whitespace.end()
        number = _NUMBER.match(self.text, position)
        if not number:
            return None
        position = number.end()
        whitespace = _WHITESPACE.match(self.text, position)
        if whitespace:
            position = whitespace.end()
        return (number.group(), position + 1) if self._char(position) == "]" else None


def _end_step(when: str, steps: int) -> int:
    """A1111 1.10: a number written with a decimal point is a fraction of the steps, else a step number; then
    ``min(steps, int(...))``. A value too large for a float is ``steps`` (positive) or -1 (negative; A1111 raises)."""
    value = float(when)
    if "." in when:
        value *= steps
    if math.isinf(value):
        return steps if value > 0 else -1
    return min(steps, int(value))


def _collect_steps(nodes: object, steps: int, found: set[int]) -> None:
    """Every step at which some group changes, in every branch (A1111 visits the whole tree)."""
    if isinstance(nodes, _Scheduled):
        end = _end_step(nodes.when, steps)
        if end >= 1:  # A1111: an end before the first step starts no segment (the group still reads `after`)
            found.add(end)
        for branch in (nodes.before, nodes.after):
            if branch is not None:
                _collect_steps(branch, steps, found)
    elif isinstance(nodes, _Alternate):
        found.update(range(1, steps + 1))
        for option in nodes.options:
            _collect_steps(option, steps, found)
    elif isinstance(nodes, tuple):
        for node in nodes:
            _collect_steps(node, steps, found)


def _render(nodes: object, step: int, steps: int) -> str:
    """The text the prompt reads at schedule point ``step`` (A1111's ``at_step``)."""
    if isinstance(nodes, str):
        return nodes
    if isinstance(nodes, _Scheduled):
        if step <= _end_step(nodes.when, steps):
            return _render(nodes.before, step, steps) if nodes.before is not None else ""
        return _render(nodes.after, step, steps)
    if isinstance(nodes, _Alternate):
        return _render(nodes.options[(step - 1) % len(nodes.options)], step, steps)
    return "".join(_render(node, step, steps) for node in nodes)


def has_editing_syntax(text: str) -> bool:
    """A cheap test that ``text`` cannot contain editing (no ``[`` followed later by ``:`` or ``|``)."""
    opener = text.find("[")
    return opener >= 0 and (text.find(":", opener) >= 0 or text.find("|", opener) >= 0)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's ``[(end_step, text), ...]`` for ``text`` sampled in ``steps`` steps; see the module docstring."""
    if not has_editing_syntax(text):
        return [(steps, text)]
    try:
        tree = _Parser(text).start()
    except _Unparseable:
        return [(steps, text)]
    found = {steps}
    _collect_steps(tree, steps, found)
    return [(end, _render(tree, end, steps)) for end in sorted(found)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text model call ``step`` (0-based) uses: the first segment that ends at or after it (the last past the end,
    which A1111's counts never reach)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]
