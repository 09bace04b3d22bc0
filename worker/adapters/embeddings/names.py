"""Where a run of prompt text names an embedding: A1111's bare name, ComfyUI's ``embedding:name``.

A1111 finds an embedding by its name's CLIP tokens inside a run's tokens, so a name counts where it stands as whole
CLIP words: case does not matter (CLIP lowercases), and the characters around it must not join its first or last
character into one word. CLIP's pre-tokenizer joins runs of letters and runs of punctuation, never digits, so
``easynegative,`` and ``(easynegative:1.2)`` name ``easynegative`` but ``veryeasynegative`` does not, and
``style2`` in ``style23`` does, as in A1111. Of names starting at the same place the longest wins (A1111's order).
``embedding:name`` names it explicitly (whatever comes before the name; ComfyUI's ``embedding:name.safetensors``,
with the file's suffix, too); an explicit name that is no embedding is an error, where a bare word that is no
embedding simply stays text.

Reserved tokens
    Embeddings are added to the tokenizers under private tokens, ``<ti-N>`` (:func:`token_for`), never under their
    names: an added token matches anywhere in the text, inside words too, and would change how texts that never name
    an embedding are tokenized. A text that contains a private token's spelling literally gets a space after its
    ``<``, which leaves its CLIP tokens as they were (``<`` and a letter are two CLIP words either way) and keeps it
    from matching the added token: a prompt gives the same tokens whatever embeddings earlier jobs loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from core.safetensors_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX

EXPLICIT_PREFIX: Final = "embedding:"  # ComfyUI's form
FILE_SUFFIXES: Final = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)  # what ComfyUI lets embedding:name end with
_RESERVED: Final = re.compile(r"<(?=ti-[0-9])", re.IGNORECASE)


def token_for(serial: int) -> str:
    """The private token of the ``serial``-th embedding a worker loads (lower case: CLIP matches lowercased text)."""
    return f"<ti-{serial}>"


def neutralize_reserved(text: str) -> str:
    """``text`` with every literal private-token spelling broken up (see the module docstring)."""
    return _RESERVED.sub("< ", text)


def fold(text: str) -> str:
    """Lower case, one character for one (so positions in the folded text are positions in ``text``)."""
    return "".join(lowered if len(lowered := char.lower()) == 1 else char for char in text)


def _kind(char: str) -> str:
    if char.isalpha():
        return "letter"
    if char.isnumeric():
        return "digit"
    return "space" if char.isspace() else "punctuation"


def _joins(left: str, right: str) -> bool:
    """Whether CLIP's pre-tokenizer makes one word of these two neighbours (letter runs, punctuation runs)."""
    kind = _kind(left)
    return kind in ("letter", "punctuation") and kind == _kind(right)


@dataclass(frozen=True)
class NameMatch:
    """A name found in a text: ``text[start:end]`` (with ``embedding:`` when explicit) names the embedding ``key``."""

    start: int
    end: int
    key: str | None  # the folded name; None: an explicit ``embedding:word`` whose word is no embedding
    word: str  # as written (without ``embedding:``)


class NameFinder:
    """Finds the names of a fixed set of embeddings in texts; names are given folded (:func:`fold`)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = frozenset(keys)
        self._lengths = sorted({len(key) for key in self._keys}, reverse=True)
        self._first_characters = frozenset(key[0] for key in self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def find(self, text: str) -> list[NameMatch]:
        """Every name in ``text``, left to right, not overlapping."""
        folded = fold(text)
        matches: list[NameMatch] = []
        position = 0
        while position < len(text):
            match = self._explicit_at(text, folded, position) or self._bare_at(text, folded, position)
            if match is None:
                position += 1
                continue
            matches.append(match)
            position = match.end
        return matches

    def _explicit_at(self, text: str, folded: str, start: int) -> NameMatch | None:
        if not text.startswith(EXPLICIT_PREFIX, start) or not self._starts_word(text, start):
            return None
        name_start = start + len(EXPLICIT_PREFIX)
        if name_start >= len(text) or text[name_start].isspace():
            return None  # "embedding: a vector" is plain text
        end = self._longest_name_at(text, folded, name_start)
        if end is not None:
            suffix = next(
                (s for s in FILE_SUFFIXES if folded.startswith(s, end) and self._ends_word(text, end + len(s))), ""
            )
            return NameMatch(start, end + len(suffix), folded[name_start:end], text[name_start:end])
        word = re.match(r"[^\s,]+", text[name_start:])
        assert word is not None
        return NameMatch(start, name_start + word.end(), None, word.group())

    def _bare_at(self, text: str, folded: str, start: int) -> NameMatch | None:
        if folded[start] not in self._first_characters or not self._starts_word(text, start):
            return None
        end = self._longest_name_at(text, folded, start)
        return None if end is None else NameMatch(start, end, folded[start:end], text[start:end])

    def _longest_name_at(self, text: str, folded: str, start: int) -> int | None:
        for length in self._lengths:
            end = start + length
            if end <= len(text) and folded[start:end] in self._keys and self._ends_word(text, end):
                return end
        return None

    @staticmethod
    def _starts_word(text: str, start: int) -> bool:
        return start == 0 or not _joins(text[start - 1], text[start])

    @staticmethod
    def _ends_word(text: str, end: int) -> bool:
        return end == len(text) or not _joins(text[end - 1], text[end])
