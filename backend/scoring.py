"""The arithmetic of scores: balanced accuracy with a stratified bootstrap interval over
contexts, AUROC, a seeded derangement (the shuffled baseline), and means and differences of
scores with bootstrap intervals over features.

Intervals are 95% percentile intervals (numpy's default linear interpolation between order
statistics) of RESAMPLES bootstrap resamples, drawn at once as an index matrix from numpy's
PCG64 generator seeded by `seed`: the same seed gives the same interval on any machine (the
draws are integer arithmetic, the statistics exact means of 0/1 or float sums in a fixed order).

Empty inputs have defined results, not exceptions: a score, mean or AUROC of nothing is None,
its interval None and its n 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _draws(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """[resamples, n] indices into n items, drawn with replacement."""
    return rng.integers(0, n, size=(resamples, n))


def _interval(samples: np.ndarray) -> list[float]:
    """[lo, hi]: the central LEVEL percentile interval of the resampled statistics."""
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _rates(labels: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the correct answers on positives, on negatives), each a 0/1 float array."""
    return correct[labels].astype(np.float64), correct[~labels].astype(np.float64)


def _balanced(tpr: np.ndarray | None, tnr: np.ndarray | None) -> np.ndarray:
    """(TPR + TNR) / 2 elementwise; where a class has no members (None), the other's rate."""
    if tpr is None or tnr is None:
        return tpr if tnr is None else tnr
    return (tpr + tnr) / 2


def _as_arrays(labels: Sequence[bool], predictions: Sequence[bool]) -> tuple[np.ndarray, ...]:
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    truth = np.asarray(labels, dtype=bool).reshape(-1)
    return truth, truth == np.asarray(predictions, dtype=bool).reshape(-1)


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool]) -> float | None:
    """(TPR + TNR) / 2. Where one class has no members, the other's rate alone (the one rate
    there is to measure); no contexts at all: None."""
    if not len(labels):
        return None
    positives, negatives = _rates(*_as_arrays(labels, predictions))
    tpr = positives.mean() if positives.size else None
    tnr = negatives.mean() if negatives.size else None
    return float(_balanced(tpr, tnr))


def score(
    labels: Sequence[bool],
    predictions: Sequence[bool],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """{"score": balanced accuracy, "ci": [lo, hi], "n": contexts}, the interval from
    `resamples` bootstrap resamples of the contexts, stratified by label: each resample draws
    as many positives from the positives (first) and negatives from the negatives (then) as
    there are. Stratified because balanced accuracy needs both classes: a plain resample of a
    few contexts may draw no negatives, and its score would then be the TPR alone, a different
    statistic; fixing the class sizes keeps every resample's score the same statistic."""
    n = len(labels)
    if not n:
        return {"score": None, "ci": None, "n": 0}
    positives, negatives = _rates(*_as_arrays(labels, predictions))
    rng = _rng(seed)
    rates = [
        side[_draws(rng, side.size, resamples)].mean(axis=1) if side.size else None  # [R]
        for side in (positives, negatives)
    ]
    return {
        "score": balanced_accuracy(labels, predictions),
        "ci": _interval(_balanced(*rates)),
        "n": n,
    }


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """The area under the ROC curve: the chance that a random positive scores above a random
    negative (Mann-Whitney U / (P * N)), ties counted 1/2. None with fewer than two classes."""
    truth = np.asarray(labels, dtype=bool).reshape(-1)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if truth.size != values.size:
        raise ValueError(f"{truth.size} labels but {values.size} scores")
    pos, neg = values[truth][:, None], values[~truth][None, :]  # [P, 1], [1, N]
    if not pos.size or not neg.size:
        return None
    wins = (pos > neg).sum() + 0.5 * (pos == neg).sum()
    return float(wins / (pos.size * neg.size))


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation p of range(n) with p[i] != i for every i: uniform over
    derangements (shuffles until one has no fixed point; about e tries on average)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = random.Random(seed)
    order = list(range(n))
    while True:
        rng.shuffle(order)
        if all(i != p for i, p in enumerate(order)):
            return order


def _values(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def mean_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "ci", "n"} of per-feature scores, the interval from `resamples` bootstrap
    resamples of the features."""
    x = _values(values)
    if not x.size:
        return {"mean": None, "ci": None, "n": 0}
    means = x[_draws(_rng(seed), x.size, resamples)].mean(axis=1)  # [R]
    return {"mean": float(x.mean()), "ci": _interval(means), "n": int(x.size)}


def difference_ci(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """{"mean": mean(a) - mean(b), "ci"}: a and b are different features (LoRA directions,
    neurons), so each is resampled on its own, a's draws first, then b's."""
    x, y = _values(a), _values(b)
    if not x.size or not y.size:
        return {"mean": None, "ci": None}
    rng = _rng(seed)
    means = [v[_draws(rng, v.size, resamples)].mean(axis=1) for v in (x, y)]  # [R] each
    return {"mean": float(x.mean() - y.mean()), "ci": _interval(means[0] - means[1])}
