"""Which Examples a feature's explainer and scorers see.

A feature is one direction and one sign (+1: its positive side, -1: its negative side). All of
it works on the document form (the direction dicts a run writes), so that explaining can run
standalone on a written file.

- explain: the even-ranked examples of the sign's top list (ranks 0, 2, 4, ...);
- activating: the odd-ranked ones, then the sign's quantile samples from ranges at or above the
  0.9 cut, by increasing cut;
- non_activating: the quantile samples of the sign's lowest range, the one with cut 0 (its
  tokens lie below the sign's median |activation|); a sign whose first range starts higher has
  none, since its tokens would not be below the median;
each cut to at most `contexts`, in that order. No context window (its tokens and target) is in
two of the lists: the explainer never sees a scoring context, even where a quantile sample
happens to be a top example, and no context counts as both activating and not.

The threshold of fuzzing is the sign's 0.9 cut: the |lower bound| of its quantile range with
cut 0.9. Where the sign has no such range (few distinct values: ranges merge), its 90% point is
unknown and the next stricter bound stands in: the lowest range with cut above 0.5, else the
sign's extreme. A stricter threshold marks fewer tokens, never more than the 0.9 cut would.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from backend.contract import EXAMPLE_LISTS, SIGNS
from backend.prompts import window

SIGN_NAMES = dict(zip((1, -1), SIGNS, strict=True))  # 1 -> "positive", -1 -> "negative"
TOP_LISTS = dict(zip((1, -1), EXAMPLE_LISTS, strict=True))  # 1 -> "top_positive", ...
ACTIVATING_CUT = 0.9

Example = dict[str, Any]


@dataclass(frozen=True)
class Feature:
    key: str  # e.g. "L3.gate_proj[0]/positive"
    sign: int  # +1 or -1
    extreme: float  # the sign's largest |activation| (0 where the sign has no tokens)
    explain: list[Example]
    activating: list[Example]
    non_activating: list[Example]
    threshold: float  # |activation| of the sign's 0.9 cut: fuzzing marks tokens at or above it
    seed: int  # stable across runs and Python processes: from the key by hashlib


def feature_seed(key: str) -> int:
    """A seed from a feature's key: the first 8 bytes of its SHA-256, as a non-negative int63
    (Python's hash() of a str changes between processes)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def _ranges(direction: dict[str, Any], sign: int) -> list[dict[str, Any]]:
    """The direction's quantile ranges of one sign, in increasing cut."""
    entries = [entry for entry in direction["quantile_samples"] if entry["sign"] == sign]
    return sorted(entries, key=lambda entry: entry["cut"])


def _lower_bound(entry: dict[str, Any]) -> float:
    """The |activation| a range starts at: lo of [lo, hi], or -hi of [-top, -bottom]."""
    return min(abs(v) for v in entry["value_range"])


def threshold(direction: dict[str, Any], sign: int, extreme: float) -> float:
    """The sign's 0.9 cut, or its stand-in (module docstring)."""
    ranges = _ranges(direction, sign)
    for entry in ranges:
        if entry["cut"] == ACTIVATING_CUT:
            return _lower_bound(entry)
    above = [entry for entry in ranges if entry["cut"] > 0.5]
    return _lower_bound(above[0]) if above else extreme


def _identity(example: Example) -> tuple[tuple[str, ...], int]:
    """A context window as a prompt shows it: two Examples of one window read the same."""
    return tuple(example["tokens"]), example["target"]


def _fresh(examples: list[Example], seen: set, contexts: int) -> list[Example]:
    """The examples whose window is not in `seen` (nor earlier in the list), at most `contexts`
    of them (0: all); `seen` gains them."""
    kept = []
    for example in examples:
        if contexts and len(kept) == contexts:
            break
        if _identity(example) not in seen:
            seen.add(_identity(example))
            kept.append(example)
    return kept


def feature(direction: dict[str, Any], key: str, sign: int, contexts: int) -> Feature:
    """Direction `key`'s feature of one sign, with its examples chosen as the module docstring
    says; Feature.key is `key` + "/positive" or "/negative"."""
    if sign not in SIGN_NAMES:
        raise ValueError(f"sign must be 1 or -1, got {sign}")
    stats = direction["stats"]
    extreme = max(0.0, float(stats["max"] if sign > 0 else -stats["min"]))
    top = direction[TOP_LISTS[sign]]
    ranges = _ranges(direction, sign)
    high = [e for entry in ranges if entry["cut"] >= ACTIVATING_CUT for e in entry["examples"]]
    low = ranges[0]["examples"] if ranges and ranges[0]["cut"] == 0 else []
    seen: set = set()
    explain = _fresh(top[0::2], seen, contexts)
    activating = _fresh(top[1::2] + high, seen, contexts)
    non_activating = _fresh(low, seen, contexts)
    name = f"{key}/{SIGN_NAMES[sign]}"
    return Feature(
        key=name,
        sign=sign,
        extreme=extreme,
        explain=explain,
        activating=activating,
        non_activating=non_activating,
        threshold=threshold(direction, sign, extreme),
        seed=feature_seed(name),
    )


def fuzz_marks(
    example: Example,
    sign: int,
    threshold: float,
    correct: bool,
    rng: random.Random,
    context: int | None,
) -> list[int]:
    """The token indices (into example["tokens"], within the window the prompt shows) to mark:
    correct, those whose sign * activation >= threshold; otherwise as many other tokens of the
    window, drawn by rng (fewer where the window has fewer others). Sorted."""
    shown = window(example, context)
    activations = example["activations"]
    right = [i for i in shown if activations[i] is not None and sign * activations[i] >= threshold]
    if correct:
        return right
    others = [i for i in shown if i not in right]
    return sorted(rng.sample(others, min(len(right), len(others))))


@dataclass(frozen=True)
class FuzzCase:
    example: Example
    marked: list[int]
    correct: bool  # the label: whether `marked` are the feature's own tokens


def fuzz_cases(feature: Feature, context: int | None) -> list[FuzzCase]:
    """Fuzzing's contexts: every activating Example, half of them (the larger half where odd)
    with correct marks and half with random ones; which, and the random marks, drawn from the
    feature's seed, so a rerun asks the same questions. A context left with nothing to mark (no
    token of its window at the threshold, or none other than those) is left out: it asks
    nothing."""
    rng = random.Random(feature.seed)
    n = len(feature.activating)
    labels = [i < (n + 1) // 2 for i in range(n)]
    rng.shuffle(labels)
    cases = []
    for example, correct in zip(feature.activating, labels, strict=True):
        marked = fuzz_marks(example, feature.sign, feature.threshold, correct, rng, context)
        if marked:
            cases.append(FuzzCase(example, marked, correct))
    return cases


def detection_cases(feature: Feature) -> list[tuple[Example, bool]]:
    """Detection's contexts with their labels: the activating ones (True), then the
    non-activating ones (False)."""
    return [(e, True) for e in feature.activating] + [(e, False) for e in feature.non_activating]
