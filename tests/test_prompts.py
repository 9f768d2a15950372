"""Golden tests of the explainer, detection and fuzzing prompts (backend.prompts), the readers of
their answers, and which Examples each feature's explainer and scorers see (backend.features),
from a synthetic direction in the document's form."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from backend.features import Feature, detection_cases, feature, fuzz_cases, fuzz_marks
from backend.prompts import (
    DETECTION_SYSTEM,
    EXPLAINER_SYSTEM,
    FUZZING_SYSTEM,
    detection_messages,
    explainer_messages,
    fuzzing_messages,
    parse_answer,
    parse_explanation,
    show,
)

SHOWN = (
    "Texts are shown on one line, with escapes inside tokens: \\n is a line break, \\t a tab, "
    "\\\\ a backslash, \\< and \\> are angle brackets of the text itself."
)


def example(tokens: list[str], activations: list[float | None], target: int, index: int = 0):
    return {
        "activation": activations[target],
        "example_index": index,
        "token_index": target,
        "tokens": tokens,
        "activations": activations,
        "target": target,
        "occurrences": 1,
    }


# ---- the explainer ------------------------------------------------------------------------


def test_explainer_system_prompt():
    assert EXPLAINER_SYSTEM == (
        "You are studying one feature of a language model: a direction whose activation is "
        "read at every token of a text. You will see examples of text where it is strongly "
        "active. In each example, one token where it is strongly active is marked <<like "
        "this>>. Below each example, every token where it is active is listed with its "
        "activation, an integer from 1 (weak) to 10 (its strongest), as a quoted string. "
        + SHOWN
        + "\nFind what the marked tokens have in common, in themselves and in their context. "
        "Answer with one short explanation, a phrase or one sentence, on one line starting "
        'with "Explanation: ".'
    )


def test_explainer_prompt_golden():
    # extreme 2: 0.4 -> 2, 2.0 -> 10, null -> 0, a negative activation clips to 0;
    # 1.0 -> 5, 1.8 -> 9, 0.05 -> round(0.25) = 0, 0.25 -> round(1.25) = 1
    first = example(["The", " cat", " sat", "\n", "on"], [0.0, 0.4, 2.0, None, -1.0], 2)
    second = example(["a<", "b", ">c", "\t"], [1.0, 1.8, 0.05, 0.25], 1)
    quiet = example(["x", "y"], [0.0, 0.01], 0)
    messages = explainer_messages([first, second, quiet], 1, 2.0)
    assert messages == [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {
            "role": "user",
            "content": "Example 1: The cat<< sat>>\\non\n"
            'Activations: " cat": 2, " sat": 10\n'
            "\n"
            "Example 2: a\\<<<b>>\\>c\\t\n"
            'Activations: "a<": 5, "b": 9, "\\t": 1\n'
            "\n"
            "Example 3: <<x>>y\n"
            "Activations: none\n"
            "\n"
            "What do the marked tokens have in common?",
        },
    ]


def test_explainer_prompt_negative_sign():
    # sign -1, extreme 4: -4 -> 10, -1.2 -> 3, a positive activation clips to 0
    messages = explainer_messages([example(["x", " y", " z"], [-4.0, 3.0, -1.2], 0)], -1, 4.0)
    assert messages[1]["content"] == (
        'Example 1: <<x>> y z\nActivations: "x": 10, " z": 3\n\n'
        "What do the marked tokens have in common?"
    )


def test_explainer_prompt_shows_every_token_of_the_window():
    # the explainer sees the whole window, however long; scaling clips above the extreme
    tokens = [f" w{i}" for i in range(9)]
    messages = explainer_messages([example(tokens, [3.0] + [0.0] * 8, 8)], 1, 2.0)
    assert messages[1]["content"].startswith(
        'Example 1:  w0 w1 w2 w3 w4 w5 w6 w7<< w8>>\nActivations: " w0": 10\n'
    )


def test_explainer_prompt_trims_the_window_as_the_scorers_do():
    # context 2: the target and 2 tokens before it; the activations shown are those inside
    tokens = [f" w{i}" for i in range(9)]
    messages = explainer_messages([example(tokens, [3.0] + [0.0] * 7 + [1.0], 8)], 1, 2.0, 2)
    assert messages[1]["content"] == (
        'Example 1:  w6 w7<< w8>>\nActivations: " w8": 5\n\n'
        "What do the marked tokens have in common?"
    )


def test_show_escapes_what_could_break_the_line_or_fake_a_marker():
    assert show("a\nb") == "a\\nb"
    assert show("\r\n\t") == "\\r\\n\\t"
    assert show("\\n") == "\\\\n"  # a backslash then n: not a line break
    assert show("<<x>>") == "\\<\\<x\\>\\>"
    assert show("\x00\x1b\x7f") == "\\u0000\\u001b\\u007f"
    assert show(" ünï ↵") == " ünï ↵"


# ---- detection ----------------------------------------------------------------------------

WORDS = ["A", " b", " c", " d", " e", " f", " g"]


def test_detection_prompt_golden():
    messages = detection_messages("the letter b", example(WORDS, [0.0] * 7, 1), 2)
    assert messages == [
        {"role": "system", "content": DETECTION_SYSTEM},
        {
            "role": "user",
            "content": "Explanation: the letter b\nText: A<< b>> c d\n"
            "Does the marked token fit the explanation? Answer yes or no.",
        },
    ]
    assert DETECTION_SYSTEM == (
        "You check explanations of features of a language model. You will see an explanation "
        "of one feature and one text with one token marked <<like this>>. "
        + SHOWN
        + "\nAnswer yes if the marked token, in its context, is one the explanation describes, "
        "no otherwise. Answer with exactly one word: yes or no."
    )


@pytest.mark.parametrize(
    ("target", "context", "text"),
    [
        (1, 2, "A<< b>> c d"),  # clipped at the start
        (6, 2, " e f<< g>>"),  # clipped at the end
        (3, 1, " c<< d>> e"),  # trimmed on both sides
        (0, 0, "<<A>>"),  # the target alone
        (3, 10, "A b c<< d>> e f g"),  # wider than the window: all of it
        (3, None, "A b c<< d>> e f g"),
    ],
)
def test_detection_trims_to_the_context(target, context, text):
    messages = detection_messages("x", example(WORDS, [0.0] * 7, target), context)
    assert messages[1]["content"].split("\n")[1] == f"Text: {text}"


def test_detection_prompt_with_newlines_and_brackets_in_tokens():
    tokens = ["if", " a", " <", " b", ":\n", "\t", "return"]
    messages = detection_messages("comparisons", example(tokens, [0.0] * 7, 2), 3)
    assert messages[1]["content"] == (
        "Explanation: comparisons\nText: if a<< \\<>> b:\\n\\t\n"
        "Does the marked token fit the explanation? Answer yes or no."
    )


# ---- fuzzing ------------------------------------------------------------------------------


def test_fuzzing_prompt_golden():
    messages = fuzzing_messages("vowels", example(WORDS, [0.0] * 7, 3), [2, 3], 2)
    assert messages == [
        {"role": "system", "content": FUZZING_SYSTEM},
        {
            "role": "user",
            "content": "Explanation: vowels\nText:  b<< c d>> e f\n"
            "Are the marked tokens the ones the explanation describes? Answer yes or no.",
        },
    ]
    assert FUZZING_SYSTEM == (
        "You check explanations of features of a language model. You will see an explanation "
        "of one feature and one text where it is active, with some tokens marked <<like "
        "this>>. Either the tokens where the feature is most active are marked, or the same "
        "number of other tokens chosen at random. "
        + SHOWN
        + "\nAnswer yes if the marked tokens are those the explanation describes, no "
        "otherwise. Answer with exactly one word: yes or no."
    )


@pytest.mark.parametrize(
    ("marked", "text"),
    [
        ([1, 5], "<< b>> c d e<< f>>"),  # marks at both edges of the trimmed window
        ([1, 2, 4], "<< b c>> d<< e>> f"),  # a run of marks is one span
        ([], " b c d e f"),
    ],
)
def test_fuzzing_marks(marked, text):
    messages = fuzzing_messages("x", example(WORDS, [0.0] * 7, 3), marked, 2)
    assert messages[1]["content"].split("\n")[1] == f"Text: {text}"


def test_fuzzing_rejects_marks_it_would_not_show():
    with pytest.raises(ValueError, match=r"marked tokens \[0\] lie outside"):
        fuzzing_messages("x", example(WORDS, [0.0] * 7, 3), [0, 3], 2)


# ---- reading answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "explanation"),
    [
        ("Explanation: the word cat", "the word cat"),
        ('  explanation:   "plural nouns"  \nmore text', "plural nouns"),
        ("**Explanation:** Tokens after a comma.", "Tokens after a comma."),
        ("Sure, here it is.\n\nExplanation: numbers in dates", "numbers in dates"),
        ("'dates and times'", "dates and times"),
        ("“curly quotes”\nsecond line", "curly quotes"),
        ("the word 'not'", "the word 'not'"),
        ("\n  \nfirst real line\nsecond", "first real line"),
        ("Explanation:", ""),
        ("", ""),
        (" \n\t\n", ""),
    ],
)
def test_parse_explanation(text, explanation):
    assert parse_explanation(text) == explanation


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("yes", True),
        ("Yes.", True),
        (" YES, because", True),
        ("no", False),
        ("No, it does not.", False),
        ("The answer is no.", False),
        ("yes or no: yes", True),
        ("nothing here", None),
        ("Not sure", None),
        ("", None),
    ],
)
def test_parse_answer(text, answer):
    assert parse_answer(text) is answer


# ---- which examples each feature sees -----------------------------------------------------


def ex(name: str, value: float, index: int) -> dict:
    """A distinct 3-token window peaking at `value` on its middle token."""
    return example([f"{name}.0", f"{name}.1", f"{name}.2"], [0.0, value, value / 2], 1, index)


TOP_POSITIVE = [ex(f"P{i}", v, i) for i, v in enumerate([5.0, 4.0, 3.0, 2.5, 2.2])]
TOP_NEGATIVE = [ex(f"N{i}", v, 10 + i) for i, v in enumerate([-3.0, -2.8, -2.6])]
L1, L2 = ex("L1", 0.1, 20), ex("L2", 0.3, 21)  # below the median
M1 = ex("M1", 1.0, 22)  # between the median and the 0.9 cut
H1, H2, X1 = ex("H1", 1.6, 23), ex("H2", 2.0, 24), ex("X1", 3.5, 25)  # at or above the 0.9 cut
NL1, NH1 = ex("NL1", -0.2, 30), ex("NH1", -2.1, 31)


def entry(cut: float, sign: int, value_range: list[float], examples: list[dict]) -> dict:
    return {
        "cut": cut,
        "sign": sign,
        "quantile_range": [cut, 1.0],
        "value_range": value_range,
        "examples": examples,
    }


def direction() -> dict:
    """Ranges as the sampler writes them (by range, positive first); the negative side has no
    0.9 range; the positive 0.999 range samples P0, a window the explainer sees."""
    return {
        "stats": {"count": 100, "min": -3.0, "max": 5.0, "mean": 0.1, "std": 1.0, "nonfinite": 0},
        "top_positive": TOP_POSITIVE,
        "top_negative": TOP_NEGATIVE,
        "quantile_samples": [
            entry(0.0, 1, [0.0, 0.5], [L1, L2]),
            entry(0.0, -1, [-0.4, 0.0], [NL1]),
            entry(0.5, 1, [0.5, 1.5], [M1]),
            entry(0.9, 1, [1.5, 2.5], [H1, H2]),
            entry(0.99, 1, [2.5, 4.0], [X1]),
            entry(0.99, -1, [-3.0, -2.0], [NH1]),
            entry(0.999, 1, [4.0, 5.0], [dict(TOP_POSITIVE[0], example_index=99)]),
        ],
    }


def names(examples: list[dict]) -> list[str]:
    return [e["tokens"][0].split(".")[0] for e in examples]


def assert_disjoint(f: Feature) -> None:
    windows = [
        {(tuple(e["tokens"]), e["target"]) for e in lst}
        for lst in (f.explain, f.activating, f.non_activating)
    ]
    assert not windows[0] & windows[1]
    assert not windows[0] & windows[2]
    assert not windows[1] & windows[2]


def test_feature_positive():
    f = feature(direction(), "L3.gate_proj[0]", 1, 0)
    assert f.key == "L3.gate_proj[0]/positive"
    assert (f.sign, f.extreme, f.threshold) == (1, 5.0, 1.5)
    assert names(f.explain) == ["P0", "P2", "P4"]
    # odd ranks, then the samples at or above the 0.9 cut; P0's sample is the explainer's
    assert names(f.activating) == ["P1", "P3", "H1", "H2", "X1"]
    assert names(f.non_activating) == ["L1", "L2"]
    assert_disjoint(f)
    digest = hashlib.sha256(b"L3.gate_proj[0]/positive").digest()
    assert f.seed == int.from_bytes(digest[:8], "big") >> 1


def test_feature_negative_without_a_09_range():
    f = feature(direction(), "L3.gate_proj[0]", -1, 0)
    assert f.key == "L3.gate_proj[0]/negative"
    # no 0.9 range on this side: the 0.99 range's |lower bound| stands in
    assert (f.sign, f.extreme, f.threshold) == (-1, 3.0, 2.0)
    assert names(f.explain) == ["N0", "N2"]
    assert names(f.activating) == ["N1", "NH1"]
    assert names(f.non_activating) == ["NL1"]
    assert_disjoint(f)
    assert f.seed != feature(direction(), "L3.gate_proj[0]", 1, 0).seed


def test_feature_lists_cut_to_contexts_in_order():
    f = feature(direction(), "d", 1, 2)
    assert names(f.explain) == ["P0", "P2"]
    assert names(f.activating) == ["P1", "P3"]
    assert names(f.non_activating) == ["L1", "L2"]
    assert_disjoint(f)


def test_feature_without_low_or_high_ranges():
    d = direction()
    d["quantile_samples"] = [entry(0.5, 1, [0.5, 1.5], [M1])]
    f = feature(d, "d", 1, 0)
    assert f.threshold == 5.0  # no range above 0.5: the extreme
    assert names(f.activating) == ["P1", "P3"]
    assert f.non_activating == []  # its lowest range starts at the median: not below it
    # a side with no tokens: nothing to see, and no extreme
    d["top_negative"], d["stats"]["min"] = [], 0.5
    empty = feature(d, "d", -1, 0)
    assert (empty.explain, empty.activating, empty.non_activating) == ([], [], [])
    assert (empty.extreme, empty.threshold) == (0.0, 0.0)


def test_feature_rejects_a_bad_sign():
    with pytest.raises(ValueError, match="sign must be 1 or -1"):
        feature(direction(), "d", 0, 0)


# ---- fuzzing marks ------------------------------------------------------------------------

FUZZ = example(WORDS, [0.1, 2.0, -3.0, 1.5, None, 0.2, 1.6], 3)


def test_fuzz_marks_correct_are_the_tokens_at_the_threshold():
    assert fuzz_marks(FUZZ, 1, 1.5, True, random.Random(0), None) == [1, 3, 6]
    assert fuzz_marks(FUZZ, 1, 1.5, True, random.Random(0), 2) == [1, 3]  # within ±2 of 3
    assert fuzz_marks(FUZZ, -1, 1.5, True, random.Random(0), None) == [2]


def test_fuzz_marks_random_are_as_many_others():
    for seed in range(20):
        marks = fuzz_marks(FUZZ, 1, 1.5, False, random.Random(seed), 2)
        assert len(marks) == 2 and marks == sorted(marks)
        assert set(marks) <= {2, 4, 5}  # the window 1..5 less the correct 1 and 3
    drawn = {tuple(fuzz_marks(FUZZ, 1, 1.5, False, random.Random(s), 2)) for s in range(20)}
    assert len(drawn) > 1
    # 5 right of 7: only 2 others to mark
    assert fuzz_marks(FUZZ, 1, 0.1, False, random.Random(0), None) == [2, 4]


def test_fuzz_cases_half_and_half_seeded():
    f = feature(direction(), "L3.gate_proj[0]", 1, 0)  # 5 activating contexts
    cases = fuzz_cases(f, 1)
    assert [c.example for c in cases] == f.activating
    assert sum(c.correct for c in cases) == 3
    for case in cases:
        right = fuzz_marks(case.example, 1, f.threshold, True, random.Random(0), 1)
        assert (case.marked == right) is case.correct
        # random marks: as many as the right ones, where the 3-token window has that many others
        assert len(case.marked) == (len(right) if case.correct else min(len(right), 3 - len(right)))
        fuzzing_messages("x", case.example, case.marked, 1)  # every mark is shown
    assert fuzz_cases(f, 1) == cases
    # which contexts get the right marks depends on the feature's seed
    labels = {
        tuple(c.correct for c in fuzz_cases(feature(direction(), f"L{i}", 1, 0), 1))
        for i in range(10)
    }
    assert len(labels) > 1


def test_fuzz_cases_leave_out_contexts_with_nothing_to_mark():
    f = feature(direction(), "d", 1, 0)
    below = ex("B", 1.0, 50)  # nothing of its window reaches the threshold 1.5
    f = dataclasses.replace(f, activating=[below, *f.activating])
    assert below not in [c.example for c in fuzz_cases(f, 1)]


def test_detection_cases():
    f = feature(direction(), "d", 1, 0)
    cases = detection_cases(f)
    assert [e for e, _ in cases] == f.activating + f.non_activating
    assert [label for _, label in cases] == [True] * 5 + [False] * 2
