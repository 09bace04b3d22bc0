"""The A1111 attention parser: A1111's own docstring examples, parity with a reference of A1111 1.10's algorithm
(tests/support/prompt_reference.py), the two deliberate differences, and properties (hypothesis)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.support.prompt_reference import (
    a1111_parse_prompt_attention,
    as_production_runs,
    escape_prompt_text,
    has_bracketed_break,
    is_plain,
    split_at_breaks,
)
from worker.prompting.syntax import BREAK, parse_prompt_attention, weighted_runs


def approx_runs(runs: list[tuple[str, float]]) -> list:
    return [(text, pytest.approx(weight, rel=1e-12)) for text, weight in runs]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # A1111's docstring examples.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        # The rest of the syntax.
        ("[x]", [("x", 1 / 1.1)]),
        ("[[x]]", [("x", 1 / 1.21)]),
        ("(x:.5)", [("x", 0.5)]),
        ("(x:+2)", [("x", 2.0)]),
        ("(x:1.)", [("x", 1.0)]),
        ("((a)(b))c", [("ab", 1.21), ("c", 1.0)]),
        ("x)", [("x)", 1.0)]),  # a closer without opener is text
        ("x]", [("x]", 1.0)]),
        ("a:1.5)", [("a:1.5)", 1.0)]),  # a weight without an open bracket is text
        ("style: anime", [("style: anime", 1.0)]),
        # Whitespace around the number, as A1111 reads it since 1.6 (its regex is :\s*([+-]?[.\d]+)\s*\)).
        ("(x: 1.3)", [("x", 1.3)]),
        ("(masterpiece: 1.2), best", [("masterpiece", 1.2), (", best", 1.0)]),
        ("(x: 1.3 )", [("x", 1.3)]),
        ("(x :1.3)", [("x ", 1.3)]),  # whitespace before the colon is text
        ("(a\t:\n0.5\n)", [("a\t", 0.5)]),
        ("(x: +2 )", [("x", 2.0)]),
        ("(x: 1.3 ) y", [("x", 1.3), (" y", 1.0)]),
        ("(x: 1 .3)", [("x: 1 .3", 1.1)]),  # not a number: text, as A1111's regex also fails to match
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # deliberate difference 2: not a number, so text (A1111 raises)
        ("(a: 1.2.3 )", [("a: 1.2.3 ", 1.1)]),
        ("(a:.)", [("a:.", 1.1)]),
        ("(a:abc)", [("a:abc", 1.1)]),
        (r"a\\b", [("a\\b", 1.0)]),
        (r"a\nb", [("anb", 1.0)]),  # a lone backslash is dropped, as in A1111
        ("a\\", [("a", 1.0)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("aBREAK b", [("aBREAK b", 1.0)]),  # BREAK only as a word
        ("a break b", [("a break b", 1.0)]),  # only the uppercase word
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # deliberate difference 1: A1111 turns it into text
        ("BREAK", [("", 1.0), BREAK]),
        ("BREAK a", [BREAK, ("a", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        # Weights as written: nothing clamped.
        ("(a:0)", [("a", 0.0)]),
        ("(a:-1)", [("a", -1.0)]),
        ("(a:1000)", [("a", 1000.0)]),
        ("(a:" + "9" * 400 + ")", [("a", math.inf)]),  # the encoder refuses it
        ("[" * 10_000 + "a", [("a", 0.0)]),  # underflows to 0.0, as in A1111
        # A1111's order of multiplication: the runs of ((sun[(set)])) both end at exactly 1.1 * 1.1 and merge.
        ("((sun[(set)]))", [("sunset", 1.1 * 1.1)]),
        ("[[(((a:90)))]]", [("a", 90.0)]),  # A1111 gives 90 (clamping partial products gave 82.6)
    ],
)
def test_examples(prompt: str, expected: list) -> None:
    assert parse_prompt_attention(prompt) == approx_runs(expected)


def test_deep_brackets_multiply_in_a1111s_order() -> None:
    weight = 1.0
    for _ in range(500):
        weight *= 1.1
    assert parse_prompt_attention("(" * 500 + "a") == [("a", weight)]  # bit for bit, not approximately
    assert parse_prompt_attention("[[(((a:90)))]]") == [("a", (((90 * 1.1) * 1.1) * (1 / 1.1)) * (1 / 1.1))]


def test_deep_nesting_is_fast() -> None:
    import time

    prompt = "(" * 6667 + ")a" * 6666  # 20,000 characters, every bracket enclosing thousands of runs
    started = time.process_time()  # CPU time: other processes on a busy machine do not count
    runs = parse_prompt_attention(prompt)
    assert time.process_time() - started < 1.0
    assert all(math.isfinite(weight) for _, weight in runs)


def test_helpers() -> None:
    parsed = parse_prompt_attention("a (b:1.5) BREAK [c] d")
    assert split_at_breaks(parsed) == [[("a ", 1.0), ("b", 1.5)], [("c", pytest.approx(1 / 1.1)), (" d", 1.0)]]
    assert weighted_runs(parsed) == [("b", 1.5), ("c", pytest.approx(1 / 1.1))]
    assert is_plain(parse_prompt_attention("just: text, 1.5"))
    assert not is_plain(parsed)
    assert escape_prompt_text(r"(a) [b] \c") == r"\(a\) \[b\] \\c"


# ---- properties ------------------------------------------------------------------------------------------------------

SYNTAX_CHARS = "\\()[]:+-.0123456789"
syntax_heavy_text = st.text(
    alphabet=st.one_of(st.sampled_from(list("()[]\\:.+-0123456789 ,BREAKbreak\n\t")), st.characters()), max_size=80
) | st.lists(
    st.sampled_from(
        ["(", ")", "[", "]", "\\", ":", "1.3", " ", "BREAK", "cat", ",", ":0.5)", "\\(", ": 1.2)", ": .5 )", " \n"]
    ),
    max_size=30,
).map("".join)


def strip_syntax(text: str) -> str:
    """The text with every character that can be syntax removed, and the whitespace BREAK may swallow."""
    text = re.sub(r"\bBREAK\b", "", text)
    return "".join(char for char in text if char not in SYNTAX_CHARS and not char.isspace())


def is_subsequence(short: str, long: str) -> bool:
    remaining = iter(long)
    return all(char in remaining for char in short)


@given(syntax_heavy_text)
def test_any_string_parses_to_its_text_with_syntax_removed(prompt: str) -> None:
    parsed = parse_prompt_attention(prompt)
    assert parsed, "never empty"
    texts = []
    for item in parsed:
        if item == BREAK:
            continue
        text, weight = item
        assert isinstance(text, str) and isinstance(weight, float)
        texts.append(text)
    plain = "".join(texts)
    # Syntax is only ever removed, never added or reordered ...
    assert is_subsequence(plain, prompt)
    # ... and what is removed is syntax: the rest of the input survives, in order.
    assert strip_syntax(plain) == strip_syntax(prompt)
    # No empty run, except the lone one of a prompt without text.
    assert all(item[0] for item in parsed if item != BREAK) or parsed[0] == ("", 1.0)


@given(syntax_heavy_text)
def test_matches_a1111_except_the_two_deliberate_differences(prompt: str) -> None:
    try:
        reference = a1111_parse_prompt_attention(prompt)
    except ValueError:
        # A1111 raises on a malformed weight number such as "1.2.3" (deliberate difference 2: literal text here).
        assume(False)
    assume(not has_bracketed_break(reference))  # deliberate difference 1
    assert parse_prompt_attention(prompt) == as_production_runs(reference)  # exact: same runs, same float weights


@pytest.mark.parametrize(
    "prompt",
    [
        "((sun[(set)]))",
        "[[(((a:90)))]]",
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "(a:0) (b:-1.5) [c:0] (d:100000)",
        "[(a) [b] (c:2)",
        "(a[b)c]d",  # crossing brackets
        "a \\ b \\",
        "BREAK a BREAK BREAK b BREAK",
        "(" * 300 + "x" + ")" * 150 + "y",
        "(masterpiece: 1.2), (best quality:1.1), (detailed eyes: 1.3 ), [blurry: 0.5]",
        "((a: 1.5)) (b : 2) (c:\t0.8\t) d: 1.2)",
    ],
)
def test_fixed_prompts_match_a1111(prompt: str) -> None:
    assert parse_prompt_attention(prompt) == as_production_runs(a1111_parse_prompt_attention(prompt))


# A prompt built from a tree: literal leaves (with escapes) inside (), (:w) and [] groups. The tree gives the expected
# text and the expected weight of every character independently of the parser.
LEAF_ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!'-:"  # no digits: "a:1" + ")" would become a weight


@st.composite
def leaf(draw: st.DrawFn) -> tuple[str, list[tuple[str, float]]]:
    if draw(st.booleans()):
        text = draw(st.text(alphabet=LEAF_ALPHABET, min_size=1, max_size=8))
        return text, [(char, 1.0) for char in text]
    char = draw(st.sampled_from("()[]\\"))
    return "\\" + char, [(char, 1.0)]


def group(child: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, list[tuple[str, float]]]:
        children = draw(st.lists(child, min_size=1, max_size=3))
        source = "".join(c[0] for c in children)
        chars = [pair for c in children for pair in c[1]]
        kind = draw(st.sampled_from(["round", "weight", "square", "none"]))
        if kind == "round":
            return f"({source})", [(char, weight * 1.1) for char, weight in chars]
        if kind == "square":
            return f"[{source}]", [(char, weight / 1.1) for char, weight in chars]
        if kind == "weight":
            hundredths = draw(st.integers(50, 200))
            number = f"{hundredths / 100:g}"
            return f"({source}:{number})", [(char, weight * float(number)) for char, weight in chars]
        return source, chars

    return build()


structured_prompt = st.recursive(leaf(), group, max_leaves=12)


@given(structured_prompt)
def test_structured_prompts_parse_to_their_text_and_weights(built: tuple[str, list[tuple[str, float]]]) -> None:
    source, expected_chars = built
    parsed = parse_prompt_attention(source)
    got_chars = [(char, weight) for text, weight in parsed for char in text]
    assert "".join(char for char, _ in got_chars) == "".join(char for char, _ in expected_chars)
    for (_, got), (_, expected) in zip(got_chars, expected_chars, strict=True):
        assert got == pytest.approx(expected, rel=1e-9)


@given(st.lists(structured_prompt, min_size=1, max_size=4))
def test_break_splits_sections(sections: list[tuple[str, list[tuple[str, float]]]]) -> None:
    source = " BREAK ".join(section for section, _ in sections)
    parsed = parse_prompt_attention(source)
    assert parsed.count(BREAK) == len(sections) - 1
    got = ["".join(text for text, _ in section).strip() for section in split_at_breaks(parsed)]
    assert got == ["".join(char for char, _ in chars).strip() for _, chars in sections]


@given(st.text(max_size=60).filter(lambda text: "BREAK" not in text))
def test_escaped_text_parses_to_itself(text: str) -> None:
    parsed = parse_prompt_attention(escape_prompt_text(text))
    assert parsed == [(text, 1.0)]
    assert is_plain(parsed)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.!?'-:;\n0123456789", max_size=80))
def test_text_without_syntax_is_one_plain_run(text: str) -> None:
    assert parse_prompt_attention(text) == [(text, 1.0)]


def test_a_zero_weighted_break_merged_by_a1111_still_counts_as_bracketed() -> None:
    # Found by the encoder's property test: A1111 merges the multiplied marker into its 0-weighted neighbours.
    reference = a1111_parse_prompt_attention("( BREAK asset:0)")
    assert ["BREAKasset", 0.0] in reference and has_bracketed_break(reference)
