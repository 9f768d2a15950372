"""One slot per distinct context window: the top lists against a brute force that groups every
token by its window, however the tokens are batched, ordered and merged; a kept window's key,
by which its occurrences are counted; and the count's refusal of rows it cannot read again."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from backend import UserError
from backend.config import RunConfig
from backend.contexts import context_keys, window_keys
from backend.pipeline import analyze
from backend.tracking import Tracker
from tests.reference import top_windows, window_of
from tests.runs import load
from tests.tiny import random_texts

W, D = 2, 3


def repeated_data(
    seed: int, rows: int = 30, causal: bool = False
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Rows of a 3-token alphabet, each three times behind one shared prefix: windows repeat.

    causal=False: a token's activations depend on its whole window, times 1 + noise of 1e-7
    (equal windows differ as float rounding would). causal=True: they depend on its prefix
    only, exactly (as a causal model's): windows that differ only after their token tie."""
    rng = random.Random(seed)
    prefix = [rng.randint(0, 2) for _ in range(6)]
    distinct = [prefix + [rng.randint(0, 2) for _ in range(rng.randint(1, 9))] for _ in range(rows)]
    ids = [row for row in distinct for _ in range(3)]
    noise = np.random.default_rng(seed)
    drawn: dict[tuple, np.ndarray] = {}  # the window (or prefix) -> its activations [D]
    acts = []
    for row in ids:
        values = np.zeros((D, len(row)))
        for p in range(len(row)):
            seen = (tuple(row[: p + 1]), p) if causal else window_of(row, p, W)
            values[:, p] = drawn.setdefault(seen, noise.normal(size=D))
        if not causal:
            values *= 1 + 1e-7 * noise.normal(size=values.shape)
        acts.append(values.astype(np.float32))
    return ids, acts


def feed(tracker: Tracker, ids: list[list[int]], acts: list[np.ndarray], rows: list[int]) -> None:
    """The rows (example indices) as one batch, right padded."""
    length = max(len(ids[r]) for r in rows)
    batch = torch.zeros(len(rows), length, dtype=torch.long)
    values = torch.zeros(D, len(rows), length)
    for i, r in enumerate(rows):
        batch[i, : len(ids[r])] = torch.tensor(ids[r])
        values[:, i, : len(ids[r])] = torch.from_numpy(acts[r])
    lengths = torch.tensor([len(ids[r]) for r in rows])
    real = (torch.arange(length)[None] < lengths[:, None]).flatten().nonzero()[:, 0]
    tracker.update(values.view(D, -1), real, batch, lengths, torch.tensor(rows))


def tracker(k: int) -> Tracker:
    return Tracker(D, top_k=k, context_window=W, bins=20, device=torch.device("cpu"))


def assert_matches_brute_force(t: Tracker, ids, acts, k: int) -> None:
    for j in range(D):
        per_example = [a[j] for a in acts]
        for negative in (False, True):
            expected = top_windows(per_example, ids, k, W, negative)
            got = t.top.top_examples(j, negative)
            assert [(e.example_index, e.token_index) for e in got] == [w["shown"] for w in expected]
            assert [e.activation for e in got] == [w["activation"] for w in expected]
            windows = [window_of(ids[e.example_index], e.token_index, W) for e in got]
            assert len(set(windows)) == len(got)  # no window twice
            for e, w in zip(got, windows, strict=True):
                assert (tuple(e.context_ids), e.target) == w


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_top_windows_match_brute_force_however_batched(k, batch, causal):
    ids, acts = repeated_data(seed=k + batch, causal=causal)
    order = list(range(len(ids)))
    random.Random(batch).shuffle(order)  # shards and sorting see rows out of order
    t = tracker(k)
    for i in range(0, len(order), batch):
        feed(t, ids, acts, order[i : i + batch])
    assert_matches_brute_force(t, ids, acts, k)


@pytest.mark.parametrize("parts", [2, 3])
def test_merged_trackers_match_brute_force(parts):
    ids, acts = repeated_data(seed=parts)
    trackers = [tracker(5) for _ in range(parts)]
    for i in range(0, len(ids), 4):
        feed(trackers[i // 4 % parts], ids, acts, list(range(i, min(i + 4, len(ids)))))
    merged = trackers[0]
    for other in trackers[1:]:
        merged.merge(Tracker.from_state_dict(other.state_dict(), torch.device("cpu")))
    assert_matches_brute_force(merged, ids, acts, 5)


def test_an_evicted_window_seen_again_larger_re_enters():
    ids = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    acts = [np.array([[1.0, 2.0, 1.0]]), np.array([[3.0, 4.0, 5.0]]), np.array([[1.0, 9.0, 1.0]])]
    acts = [a.repeat(D, 0).astype(np.float32) for a in acts]
    t = tracker(2)
    for r in range(3):
        feed(t, ids, acts, [r])
    # window (0, 1, 0) of row 0 (2.0) was evicted by row 1's; row 2's 9.0 brings it back
    assert [
        (e.example_index, e.token_index, e.activation) for e in t.top.top_examples(0, False)
    ] == [
        (2, 1, 9.0),
        (1, 2, 5.0),
    ]
    assert_matches_brute_force(t, ids, acts, 2)


def test_a_kept_windows_key_is_its_tokens_key_in_the_data():
    ids, _ = repeated_data(seed=4)
    batch = torch.full((len(ids), max(map(len, ids))), 7, dtype=torch.long)  # 7: padding
    for row, sequence in enumerate(ids):
        batch[row, : len(sequence)] = torch.tensor(sequence)
    keys = window_keys(batch, torch.tensor([len(s) for s in ids]), W)
    contexts = torch.full((sum(map(len, ids)), 2 * W + 1), -1, dtype=torch.long)
    expected = []
    for row, sequence in enumerate(ids):
        for p in range(len(sequence)):
            window, target = window_of(sequence, p, W)
            at = len(expected)
            contexts[at, W - target : W - target + len(window)] = torch.tensor(window)
            expected.append(int(keys[row, p]))
    assert context_keys(contexts).tolist() == expected


def test_rows_that_cannot_be_read_again_are_refused(qwen2_base, rank1_adapter):
    model, tokenizer = load(qwen2_base, rank1_adapter)
    rows = ({"text": t} for t in random_texts(4))  # an iterator: spent after the pass
    with pytest.raises(UserError, match="must read the same each time"):
        analyze(model, tokenizer, rows, RunConfig(lora_path=str(rank1_adapter)))
