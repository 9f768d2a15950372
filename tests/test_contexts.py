"""Context windows: the key of a token's window against the windows themselves."""

from __future__ import annotations

import random

import pytest
import torch

from backend.contexts import window_keys


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
