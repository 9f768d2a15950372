"""The three prompts of explaining and scoring a feature (one direction and one sign), as chat
messages [{"role", "content"}], and the readers of their answers.

Conventions follow EleutherAI's delphi: the explainer sees activating examples with the tokens
of interest between << and >> and activations as integers 0-10; the scorers see one context at
a time and answer with one word, yes or no (a local scorer's answer is read as p(yes) vs p(no)
over ANSWERS).

How a token is shown. Tokens are strings as decoded, one at a time: they may hold line breaks,
tabs, spaces, backslashes and angle brackets. A context is shown as its tokens joined, with
these escapes inside each token, so that the text is one line and no token can fake a marker:

    backslash -> \\\\    line feed -> \\n    carriage return -> \\r    tab -> \\t
    <         -> \\<    >         -> \\>    any other control character -> \\u00XX

So every raw < or > in a prompt's context line is a marker's, and the shown text reads back
into exactly its tokens' text. A run of marked tokens next to each other is marked as one span,
<<like this>>, as delphi does. The explainer's list of token activations shows each token as a
JSON string literal ("\\n" for a line break, leading spaces kept inside the quotes).
"""

from __future__ import annotations

import json
import re
from typing import Any

ANSWERS = ("yes", "no")
EXPLANATION_PREFIX = "Explanation:"
OPEN, CLOSE = "<<", ">>"

_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_ESCAPES |= {ord("<"): "\\<", ord(">"): "\\>"}
_ESCAPES |= {c: f"\\u{c:04x}" for c in [*range(32), 127] if c not in _ESCAPES}

_SHOWN = (
    "Texts are shown on one line, with escapes inside tokens: \\n is a line break, \\t a tab, "
    "\\\\ a backslash, \\< and \\> are angle brackets of the text itself."
)

EXPLAINER_SYSTEM = (
    "You are studying one feature of a language model: a direction whose activation is read "
    "at every token of a text. You will see examples of text where it is strongly active. In "
    f"each example, one token where it is strongly active is marked {OPEN}like this{CLOSE}. "
    "Below each example, every token where it is active is listed with its activation, an "
    "integer from 1 (weak) to 10 (its strongest), as a quoted string. "
    f"{_SHOWN}\n"
    "Find what the marked tokens have in common, in themselves and in their context. Answer "
    "with one short explanation, a phrase or one sentence, on one line starting with "
    f'"{EXPLANATION_PREFIX} ".'
)

DETECTION_SYSTEM = (
    "You check explanations of features of a language model. You will see an explanation of "
    f"one feature and one text with one token marked {OPEN}like this{CLOSE}. {_SHOWN}\n"
    "Answer yes if the marked token, in its context, is one the explanation describes, no "
    "otherwise. Answer with exactly one word: yes or no."
)

FUZZING_SYSTEM = (
    "You check explanations of features of a language model. You will see an explanation of "
    "one feature and one text where it is active, with some tokens marked "
    f"{OPEN}like this{CLOSE}. Either the tokens where the feature is most active are marked, or "
    f"the same number of other tokens chosen at random. {_SHOWN}\n"
    "Answer yes if the marked tokens are those the explanation describes, no otherwise. Answer "
    "with exactly one word: yes or no."
)


def show(token: str) -> str:
    """A token as it stands in a prompt's text: escaped as the module docstring says."""
    return token.translate(_ESCAPES)


def window(example: dict[str, Any], context: int | None) -> range:
    """Indices into example["tokens"] within `context` tokens of its target on each side
    (clipped to the window it carries); None: all of them."""
    n, target = len(example["tokens"]), example["target"]
    if context is None:
        return range(n)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    return range(max(0, target - context), min(n, target + context + 1))


def render(tokens: list[str], marked: set[int], shown: range) -> str:
    """The tokens at `shown`, escaped and joined, with each run of marked ones in << >>."""
    parts = []
    for i in shown:
        if i in marked and (i - 1 not in marked or i == shown.start):
            parts.append(OPEN)
        parts.append(show(tokens[i]))
        if i in marked and (i + 1 not in marked or i + 1 == shown.stop):
            parts.append(CLOSE)
    return "".join(parts)


def scaled(activation: float | None, sign: int, extreme: float) -> int:
    """An activation as an integer 0-10 of the feature's extreme: round(10 * sign * a /
    extreme) (Python's round: halves to even), clipped to [0, 10]. Null, or a feature with no
    extreme (no tokens of its sign), counts as 0."""
    if activation is None or extreme <= 0:
        return 0
    return min(10, max(0, round(10 * sign * activation / extreme)))


def explainer_messages(
    examples: list[dict[str, Any]], sign: int, extreme: float, context: int | None = None
) -> list[dict[str, str]]:
    """The explainer's prompt: each Example's window (trimmed to `context` tokens on each side
    of its target, as the scorers see it; None: whole) with its target marked, then its tokens
    of nonzero scaled activation there with their values."""
    blocks = []
    for number, example in enumerate(examples, 1):
        tokens, shown = example["tokens"], window(example, context)
        text = render(tokens, {example["target"]}, shown)
        values = [scaled(example["activations"][i], sign, extreme) for i in shown]
        pairs = zip((tokens[i] for i in shown), values, strict=True)
        active = ", ".join(f"{json.dumps(t, ensure_ascii=False)}: {v}" for t, v in pairs if v)
        blocks.append(f"Example {number}: {text}\nActivations: {active or 'none'}")
    user = "\n\n".join(blocks) + "\n\nWhat do the marked tokens have in common?"
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


def _scorer_messages(
    system: str, explanation: str, text: str, question: str
) -> list[dict[str, str]]:
    user = f"Explanation: {explanation}\nText: {text}\n{question} Answer yes or no."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def detection_messages(
    explanation: str, example: dict[str, Any], context: int | None
) -> list[dict[str, str]]:
    """Detection: the explanation and one Example trimmed to `context` tokens on each side of
    its target, the target marked."""
    text = render(example["tokens"], {example["target"]}, window(example, context))
    question = "Does the marked token fit the explanation?"
    return _scorer_messages(DETECTION_SYSTEM, explanation, text, question)


def fuzzing_messages(
    explanation: str, example: dict[str, Any], marked: list[int], context: int | None
) -> list[dict[str, str]]:
    """Fuzzing: the explanation and one Example trimmed as in detection, with the tokens at
    `marked` (indices into example["tokens"], all within the trimmed window) marked."""
    shown = window(example, context)
    outside = [i for i in marked if i not in shown]
    if outside:
        raise ValueError(f"marked tokens {outside} lie outside the shown window {shown}")
    text = render(example["tokens"], set(marked), shown)
    question = "Are the marked tokens the ones the explanation describes?"
    return _scorer_messages(FUZZING_SYSTEM, explanation, text, question)


_QUOTES = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’"}  # opening -> closing
_DECORATION = "*_#> \t"


def _clean(line: str) -> str:
    """A line without markdown decoration around it, nor a pair of quotes around the rest."""
    line = line.strip(_DECORATION)
    if len(line) >= 2 and _QUOTES.get(line[0]) == line[-1]:
        line = line[1:-1].strip()
    return line


def parse_explanation(text: str) -> str:
    """The explanation in an explainer's answer: the rest of the first line that starts with
    the prefix (any case, markdown decoration allowed), else the first non-empty line; quotes
    and whitespace around it stripped. No text: ""."""
    lines = [_clean(line) for line in text.splitlines()]
    prefix = EXPLANATION_PREFIX.lower()
    for line in lines:
        if line.lower().startswith(prefix):
            return _clean(line[len(prefix) :])
    return next((line for line in lines if line), "")


_ANSWER = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_answer(text: str) -> bool | None:
    """A scorer's yes (True) or no (False): the first of the two words in the text; None where
    there is neither."""
    match = _ANSWER.search(text)
    return None if match is None else match.group(1).lower() == ANSWERS[0]
