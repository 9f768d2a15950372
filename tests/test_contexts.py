"""Context windows: the key of a token's window against the windows themselves."""

from __future__ import annotations

import random

import pytest
import torch

from backend.contexts import BatchTokens, window_keys


@pytest.mark.parametrize("window", [0, 1, 3])
def test_window_keys_are_equal_exactly_for_equal_windows(window):
    rng = random.Random(window)
    # A small alphabet: many windows repeat, within and across sequences.
    sequences = [[rng.randint(0, 3) for _ in range(rng.randint(1, 14))] for _ in range(60)]
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    keys = window_keys(ids, torch.tensor([len(s) for s in sequences]), window)
    windows = {}  # key -> the window (clipped ids, place of the token in it)
    for row, sequence in enumerate(sequences):
        for p in range(len(sequence)):
            first = max(0, p - window)
            found = (tuple(sequence[first : p + window + 1]), p - first)
            assert windows.setdefault(int(keys[row, p]), found) == found
    distinct = set(windows.values())
    assert len(windows) == len(distinct)  # one key per distinct window...
    assert len(distinct) >= min(4 ** (2 * window + 1), 40)  # ...and many of them


@pytest.mark.parametrize(("directions", "lengths", "window"), [(5, [7, 1, 4], 3), (1, [2], 4)])
def test_windows_against_the_tokens_one_by_one(directions, lengths, window):
    """BatchTokens.windows against each window read value by value: the ids clipped to the
    sequence, every direction's activations there and zeros outside, for every real token and
    direction, those at either end of the batch's buffer and a batch smaller than one window
    included."""
    length = max(lengths)
    gen = torch.Generator().manual_seed(len(lengths))
    acts = torch.randn(directions, len(lengths) * length, generator=gen)
    ids = torch.randint(0, 50, (len(lengths), length), generator=gen)
    inside = torch.arange(length) < torch.tensor(lengths)[:, None]
    real = inside.flatten().nonzero().squeeze(1)
    batch = BatchTokens(
        acts, real, ids, torch.tensor(lengths), torch.arange(len(lengths)), window,
        torch.empty(directions, 0, dtype=torch.long),
    )  # fmt: skip
    n = torch.arange(len(real))
    every = torch.arange(directions).expand(len(n), -1)
    got_ids, got = batch.windows(every, n)
    for i, flat in enumerate(real.tolist()):
        row, p = divmod(flat, length)
        for j, q in enumerate(range(p - window, p + window + 1)):
            seen = 0 <= q < lengths[row]
            assert got_ids[i, j] == (ids[row, q] if seen else -1)
            expected = acts[:, row * length + q] if seen else torch.zeros(directions)
            assert torch.equal(got[i, :, j], expected)
