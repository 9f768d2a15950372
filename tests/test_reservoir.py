"""The reservoir against brute force: the K distinct windows of smallest key over the whole run,
their samples by direction, sign and range, and the same state however the data is split."""

from __future__ import annotations

import math

import pytest
import torch

from backend.contexts import EMPTY, BatchTokens, Example, token_keys, window_keys
from backend.reservoir import Reservoir
from backend.summaries import Shape

W = 2  # context tokens each side
D = 4


def dataset(seed: int, rows: int = 60, length: int = 40, nonfinite: bool = False):
    """ids [B, L] (right padding) in which every third row repeats an earlier one behind a
    shared prefix (windows recur), lengths [B], activations [D, B, L]: normal, with zeros of
    both signs on direction 2, and NaN and infinities on direction 3 if `nonfinite`. Padding
    holds activations too, which nothing may read."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (rows, length), generator=generator)
    ids[:, :6] = 5  # a shared prefix
    ids[2::3] = ids[0:-2:3]  # repeated rows
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[2::3] = lengths[0:-2:3]
    acts = torch.randn(D, rows, length, generator=generator)
    zero = torch.rand(rows, length, generator=generator) < 0.3
    acts[2] = torch.where(zero, torch.where(acts[2] < 0, -0.0, 0.0), acts[2])
    if nonfinite:
        u = torch.rand(rows, length, generator=generator)
        acts[3] = torch.where(u < 0.1, math.nan, acts[3])
        acts[3] = torch.where((u >= 0.1) & (u < 0.2), math.inf * acts[3].sign(), acts[3])
    return ids, lengths, acts


def shape_for(siblings: torch.Tensor | None = None) -> Shape:
    if siblings is None:
        siblings = torch.tensor([[1, -1], [0, -1], [3, 0], [2, -1]])
    return Shape(D, 3, W, 10, siblings, 0, torch.device("cpu"))


def batch_of(data, rows: range, shape: Shape) -> BatchTokens:
    """Rows of the data as one batch, padded to its longest row."""
    ids, lengths, acts = data
    lengths = lengths[rows.start : rows.stop]
    length = int(lengths.max())
    ids = ids[rows.start : rows.stop, :length]
    acts = acts[:, rows.start : rows.stop, :length].flatten(1)
    real = (torch.arange(length)[None] < lengths[:, None]).flatten().nonzero().squeeze(1)
    example = torch.arange(rows.start, rows.stop)
    return BatchTokens(acts, real, ids, lengths, example, W, shape.siblings)


def run(data, size: int, batches: list[range], shape: Shape | None = None) -> Reservoir:
    shape = shape or shape_for()
    reservoir = Reservoir(shape, size)
    for rows in batches:
        reservoir.update(batch_of(data, rows, shape))
    return reservoir


def every_row(data, step: int) -> list[range]:
    rows = data[0].shape[0]
    return [range(i, min(i + step, rows)) for i in range(0, rows, step)]


def tokens(data) -> list[dict]:
    """Every real token as brute force sees it: its key, window (clipped ids and its place in
    them), window ids padded with -1, and every direction's activations there (0 outside)."""
    ids, lengths, acts = data
    found = []
    for e in range(ids.shape[0]):
        sequence = ids[e, : lengths[e]].tolist()
        for p in range(len(sequence)):
            first = max(0, p - W)
            places = [q if 0 <= q < len(sequence) else None for q in range(p - W, p + W + 1)]
            found.append(
                {
                    "key": int(token_keys(torch.tensor(e), torch.tensor(p))),
                    "example": e,
                    "position": p,
                    "window": (tuple(sequence[first : p + W + 1]), p - first),
                    "ids": [-1 if q is None else sequence[q] for q in places],
                    "acts": torch.stack(
                        [torch.zeros(D) if q is None else acts[:, e, q] for q in places], 1
                    ),  # [D, C]
                }
            )
    return found


def brute_force(data, size: int) -> list[dict]:
    """Of each distinct window its token of smallest key; the `size` of smallest key."""
    best: dict = {}
    for t in tokens(data):
        if t["window"] not in best or t["key"] < best[t["window"]]["key"]:
            best[t["window"]] = t
    return sorted(best.values(), key=lambda t: t["key"])[:size]


def in_range(t: dict, d: int, sign: int, lo: float, hi: float) -> bool:
    x = float(t["acts"][d, W])
    return math.isfinite(x) and math.copysign(1.0, x) == sign and lo <= abs(x) < hi


def example_of(t: dict, d: int, siblings: list[int]) -> Example:
    inside = [i for i, v in enumerate(t["ids"]) if v >= 0]
    return Example(
        activation=float(t["acts"][d, W]),
        example_index=t["example"],
        token_index=t["position"],
        context_ids=[t["ids"][i] for i in inside],
        context_acts=[float(t["acts"][d, i]) for i in inside],
        target=W - sum(1 for i in range(W) if t["ids"][i] < 0),
        siblings={s: [float(t["acts"][s, i]) for i in inside] for s in siblings if s >= 0},
    )


def assert_same_examples(got: list[Example], expected: list[Example]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        # NaN on the window (another token's) compares unequal to itself: compare as strings
        assert repr(a) == repr(b)


def assert_same_state(a: Reservoir, b: Reservoir) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == {"meta", "ids", "acts"}
    for name in sa:
        # Bit for bit: NaN equals itself, -0.0 differs from 0.0
        x, y = (t.view(torch.int32) if t.is_floating_point() else t for t in (sa[name], sb[name]))
        assert torch.equal(x, y), name


@pytest.mark.parametrize("size", [1, 40, 300, 5000])
def test_the_kept_windows_are_the_distinct_windows_of_smallest_key(size):
    data = dataset(seed=1)
    reservoir = run(data, size, every_row(data, 5))
    expected = brute_force(data, size)
    state = reservoir.state_dict()
    meta, ids, acts = state["meta"], state["ids"], state["acts"]
    kept = len(expected)
    assert kept == min(size, len({t["window"] for t in tokens(data)}))
    keys = window_keys(data[0], data[1], W)  # [B, L]
    assert meta[:kept].tolist() == [
        [t["key"], t["example"], t["position"], int(keys[t["example"], t["position"]])]
        for t in expected
    ]
    assert ids[:kept].tolist() == [t["ids"] for t in expected]
    assert torch.equal(acts[:kept], torch.stack([t["acts"] for t in expected]))
    # Empty slots after the kept ones, as built.
    assert meta[kept:].tolist() == [[EMPTY, -1, -1, 0]] * (size - kept)
    assert (ids[kept:] == -1).all() and (acts[kept:] == 0).all()
    limit = expected[-1]["key"] if kept == size else EMPTY
    assert int(reservoir.limit) == limit
    assert sorted(reservoir.examples().tolist()) == sorted(
        [t["example"] for t in expected] + [-1] * (size - kept)
    )
    assert sorted(reservoir.windows().tolist()) == sorted(
        [t["ids"] for t in expected] + [[-1] * (2 * W + 1)] * (size - kept)
    )
    if size == 300:
        assert len({t["window"] for t in tokens(data)}) < 0.8 * len(tokens(data))  # windows recur
        assert kept == size  # full: the limit was tested


@pytest.mark.parametrize(
    ("d", "sign", "lo", "hi", "n"),
    [
        (0, 1, 0.0, math.inf, 10**6),  # a whole sign
        (0, -1, 0.0, 0.6745, 25),  # below the median magnitude
        (1, 1, 0.5, 1.5, 7),
        (2, 1, 0.0, 0.25, 10**6),  # +0.0 on the positive side
        (2, -1, 0.0, 1e-30, 10**6),  # -0.0 on the negative side, and only it
        (2, -1, 1.0, 1.0, 10**6),  # an empty range
    ],
)
def test_a_sample_is_the_ranges_windows_of_smallest_key(d, sign, lo, hi, n):
    data = dataset(seed=2)
    size = 200
    reservoir = run(data, size, every_row(data, 4))
    siblings = shape_for().siblings[d].tolist()
    got = reservoir.sample(d, sign, lo, hi, n, siblings)
    kept = brute_force(data, size)
    expected = [t for t in kept if in_range(t, d, sign, lo, hi)][:n]
    assert_same_examples(got, [example_of(t, d, siblings) for t in expected])
    # ...which are the range's windows of smallest key among all, up to the reservoir's limit.
    everywhere = [t for t in brute_force(data, 10**9) if in_range(t, d, sign, lo, hi)]
    below = [t for t in everywhere if t["key"] <= int(reservoir.limit)][:n]
    assert [(e.example_index, e.token_index) for e in got] == [
        (t["example"], t["position"]) for t in below
    ]
    if (lo, hi) == (0.0, 1e-30):
        assert got and all(math.copysign(1.0, e.activation) < 0 for e in got)
    if lo < hi and hi > 0.25:
        assert len(got) > 3  # the range had something to sample


def test_non_finite_activations_are_never_sampled_for_their_direction():
    data = dataset(seed=3, nonfinite=True)
    size = 400
    reservoir = run(data, size, every_row(data, 6))
    kept = brute_force(data, size)
    bad = {(t["example"], t["position"]) for t in kept if not math.isfinite(t["acts"][3, W])}
    assert bad  # non-finite tokens were kept, with their windows
    for sign in (1, -1):
        got = reservoir.sample(3, sign, 0.0, math.inf, size, [2])
        assert not {(e.example_index, e.token_index) for e in got} & bad
        assert all(math.isfinite(e.activation) for e in got)
        expected = [t for t in kept if in_range(t, 3, sign, 0.0, math.inf)]
        assert_same_examples(got, [example_of(t, 3, [2]) for t in expected])
    # The same windows are sampled for the other directions.
    others = reservoir.sample(0, 1, 0.0, math.inf, size, [])
    assert {(e.example_index, e.token_index) for e in others} & bad


def test_any_split_gives_the_same_state():
    data = dataset(seed=4, nonfinite=True)
    rows, size = data[0].shape[0], 150
    one = run(data, size, [range(0, rows)])
    small = run(data, size, every_row(data, 3))
    reversed_ = run(data, size, every_row(data, 7)[::-1])
    assert_same_state(small, one)
    assert_same_state(reversed_, one)
    # Two halves merged, through a saved state.
    later = [range(i, min(i + 9, rows)) for i in range(25, rows, 9)]
    first, second = run(data, size, [range(0, 25)]), run(data, size, later)
    loaded = Reservoir(shape_for(), size)
    loaded.load(second.state_dict())
    first.merge(loaded)
    assert_same_state(first, one)
    # Resumed mid-way from a saved state.
    half = run(data, size, every_row(data, 5)[:6])
    resumed = Reservoir(shape_for(), size)
    resumed.load(half.state_dict())
    for b in every_row(data, 5)[6:]:
        resumed.update(batch_of(data, b, shape_for()))
    assert_same_state(resumed, one)
    # Merging the same tokens again changes nothing.
    again = Reservoir(shape_for(), size)
    again.load(one.state_dict())
    again.merge(one)
    assert_same_state(again, one)


def test_an_empty_reservoir_merges_and_samples_nothing():
    data = dataset(seed=5)
    empty = Reservoir(shape_for(), 20)
    assert empty.sample(0, 1, 0.0, math.inf, 5, [1]) == []
    full = run(data, 20, every_row(data, 10))
    before = Reservoir(shape_for(), 20)
    before.load(full.state_dict())
    full.merge(empty)
    assert_same_state(full, before)
    empty.merge(full)
    assert_same_state(empty, full)
