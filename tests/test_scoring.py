"""backend.scoring against hand-computed cases and against brute-force loops over the same
bootstrap resamples."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from backend.scoring import auroc, balanced_accuracy, derangement, difference_ci, mean_ci, score


def generator(seed: int) -> np.random.Generator:
    """The generator the module draws from: tests reproduce its resamples one by one."""
    return np.random.Generator(np.random.PCG64(seed))


def percentile_interval(samples: list[float]) -> list[float]:
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])]


def test_balanced_accuracy_by_hand():
    # TPR 2/3 (positives 0, 2 right), TNR 1/2 (negative 3 right, 4 wrong)
    labels = [True, True, True, False, False]
    predictions = [True, False, True, False, True]
    assert balanced_accuracy(labels, predictions) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert balanced_accuracy(labels, labels) == 1.0
    assert balanced_accuracy(labels, [not p for p in labels]) == 0.0
    assert balanced_accuracy(labels, [True] * 5) == 0.5  # always yes: chance, whatever the mix


def test_balanced_accuracy_one_class_and_empty():
    assert balanced_accuracy([True, True], [True, False]) == 0.5  # TPR alone
    assert balanced_accuracy([False] * 3, [False, False, True]) == pytest.approx(2 / 3)  # TNR
    assert balanced_accuracy([], []) is None
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        balanced_accuracy([True, False], [True])


def brute_score_interval(labels, predictions, resamples, seed) -> list[float]:
    """The stratified bootstrap one resample at a time: positives drawn first, then negatives."""
    positives = [p == y for y, p in zip(labels, predictions, strict=True) if y]
    negatives = [p == y for y, p in zip(labels, predictions, strict=True) if not y]
    rng = generator(seed)
    draws = [
        rng.integers(0, len(side), size=(resamples, len(side))) for side in (positives, negatives)
    ]
    scores = []
    for r in range(resamples):
        tpr = sum(positives[i] for i in draws[0][r]) / len(positives)
        tnr = sum(negatives[i] for i in draws[1][r]) / len(negatives)
        scores.append((tpr + tnr) / 2)
    return percentile_interval(scores)


def test_score_against_brute_force():
    rng = random.Random(1)
    labels = [rng.random() < 0.4 for _ in range(37)]
    predictions = [y if rng.random() < 0.75 else not y for y in labels]
    result = score(labels, predictions, resamples=300, seed=7)
    assert result["n"] == 37
    assert result["score"] == pytest.approx(balanced_accuracy(labels, predictions))
    assert result["ci"] == pytest.approx(brute_score_interval(labels, predictions, 300, 7))


def test_score_interval_brackets_and_shrinks_with_n():
    labels = [True] * 4 + [False] * 4
    predictions = [True, True, True, False, False, False, False, True]  # 3/4 on each side
    small = score(labels, predictions, seed=3)
    large = score(labels * 16, predictions * 16, seed=3)
    for result in (small, large):
        lo, hi = result["ci"]
        assert lo <= result["score"] == 0.75 <= hi
        assert 0 <= lo < hi <= 1
    width = [r["ci"][1] - r["ci"][0] for r in (small, large)]
    # the interval's width goes as 1/sqrt(n): 16 times the contexts, about a quarter as wide
    assert width[1] < width[0] / 2
    assert large["n"] == 128


def test_score_is_deterministic_for_a_seed():
    rng = random.Random(2)
    labels = [rng.random() < 0.5 for _ in range(40)]
    predictions = [rng.random() < 0.5 for _ in range(40)]
    assert score(labels, predictions, seed=11) == score(labels, predictions, seed=11)
    assert score(labels, predictions, seed=11)["ci"] != score(labels, predictions, seed=12)["ci"]


def test_score_one_class_and_empty():
    # every resample draws its 3 positives from the positives: the TPR of each resample
    result = score([True] * 3, [True, True, False], resamples=200, seed=0)
    assert result["score"] == pytest.approx(2 / 3)
    lo, hi = result["ci"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    assert score([True, True], [True, True]) == {"score": 1.0, "ci": [1.0, 1.0], "n": 2}
    assert score([], []) == {"score": None, "ci": None, "n": 0}


def brute_auroc(labels, scores) -> float:
    pairs = [
        (p, q)
        for (p, y), (q, z) in itertools.product(zip(scores, labels, strict=True), repeat=2)
        if y and not z
    ]
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)


def test_auroc_by_hand_with_ties():
    # pairs (positive, negative): (.9,.5) 1, (.9,.1) 1, (.5,.5) 1/2, (.5,.1) 1 -> 3.5 / 4
    assert auroc([True, True, False, False], [0.9, 0.5, 0.5, 0.1]) == 0.875
    assert auroc([True, False, True], [0.2, 0.2, 0.2]) == 0.5
    assert auroc([False, True], [0.9, 0.1]) == 0.0
    assert auroc([True, True], [0.1, 0.2]) is None
    assert auroc([], []) is None


def test_auroc_against_all_pairs():
    rng = random.Random(4)
    labels = [rng.random() < 0.3 for _ in range(60)]
    scores = [rng.choice([0.1, 0.2, 0.3, 0.5, 0.8]) for _ in range(60)]  # many ties
    assert auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))


@pytest.mark.parametrize("n", range(2, 51))
def test_derangement_is_a_permutation_without_fixed_points(n):
    p = derangement(n, seed=n)
    assert sorted(p) == list(range(n))
    assert all(p[i] != i for i in range(n))
    assert derangement(n, seed=n) == p


def test_derangement_varies_with_the_seed_and_rejects_too_few():
    assert derangement(2, 0) == [1, 0]  # the only one
    assert len({tuple(derangement(6, seed)) for seed in range(20)}) > 1
    for n in (0, 1):
        with pytest.raises(ValueError, match="at least 2"):
            derangement(n, 0)


def brute_means(values, draws) -> list[float]:
    return [sum(values[i] for i in row) / len(row) for row in draws]


def test_mean_ci_against_brute_force():
    values = [random.Random(i).random() for i in range(23)]
    result = mean_ci(values, resamples=400, seed=9)
    draws = generator(9).integers(0, 23, size=(400, 23))
    assert result["n"] == 23
    assert result["mean"] == pytest.approx(sum(values) / 23)
    assert result["ci"] == pytest.approx(percentile_interval(brute_means(values, draws)))
    lo, hi = result["ci"]
    assert lo < result["mean"] < hi


def test_difference_ci_against_brute_force():
    a = [random.Random(i).random() for i in range(15)]
    b = [random.Random(100 + i).random() * 0.5 for i in range(9)]
    result = difference_ci(a, b, resamples=400, seed=13)
    rng = generator(13)
    draws_a = rng.integers(0, 15, size=(400, 15))  # a's resamples first, then b's
    draws_b = rng.integers(0, 9, size=(400, 9))
    differences = [
        x - y for x, y in zip(brute_means(a, draws_a), brute_means(b, draws_b), strict=True)
    ]
    assert result["mean"] == pytest.approx(sum(a) / 15 - sum(b) / 9)
    assert result["ci"] == pytest.approx(percentile_interval(differences))
    assert set(result) == {"mean", "ci"}


def test_means_of_nothing():
    assert mean_ci([]) == {"mean": None, "ci": None, "n": 0}
    assert difference_ci([], [0.5]) == {"mean": None, "ci": None}
    assert difference_ci([0.5], []) == {"mean": None, "ci": None}
    assert mean_ci([0.25]) == {"mean": 0.25, "ci": [0.25, 0.25], "n": 1}
