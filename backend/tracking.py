"""Streaming, mergeable summaries of D directions' activations, updated a batch at a time.

Everything lives on the device as [D, ...] tensors, updated with a fixed handful of batched ops
per batch: no per-token or per-direction Python, and a few host synchronisations (whether the
batch is all finite, which kept tokens a batch replaces). Memory is fixed by (D, k, window, bins,
vocabulary), whatever the number of tokens. Every summary follows backend.summaries' protocol
and merges exactly with another of its kind, which is how batches enter it and how processes
and shards are combined.
- moments: count / mean / M2 (float64), combined with Chan et al.'s parallel formulas; min, max
  and the count of NaN and infinite activations, which every summary leaves out.
- histogram: exact counts on a power-of-two grid that coarsens (merging bin pairs) as the range
  grows, so no value is ever re-read.
- top-k: the k distinct context windows of largest and the k of most negative activation per
  direction, each shown at one occurrence with its context; a batch's tokens are grouped by
  window and its candidates merged with the running lists, de-duplicated by window key.
- quantile samples (backend.sampling), position and token profiles (backend.profiles).
SUMMARIES lists them: the one place a new summary is registered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from backend.contexts import BatchTokens, Example, unpack
from backend.profiles import PositionProfile, TokenProfile
from backend.sampling import QuantileSamples
from backend.summaries import (
    Exporter,
    Range,
    Shape,
    Summary,
    occurrences,
)

# Internal histogram resolution relative to the requested bins: the output groups whole internal
# bins, so a finer grid lets the output's edges hug [min, max] closely.
OVERSAMPLE = 16
_EMPTY_EXP = -(2**20)  # exponent of a direction that has seen no value yet
CHUNK = 64  # top-k candidates are searched in chunks of this many tokens
TIE = 1e-5  # occurrences of a window this close (relative) to its extreme count as equal
DENSE = 4  # chunks per direction beyond which every direction's k best chunks are searched


class Moments(Summary):
    name = "moments"
    STATE = ("count", "mean", "m2", "nonfinite", "range.min", "range.max")

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        d, device = shape.num_directions, shape.device
        self.count = torch.zeros(d, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(d, dtype=torch.long, device=device)
        self.mean = torch.zeros(d, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(d, dtype=torch.float64, device=device)
        self.range = Range(d, device)

    def update(self, batch: BatchTokens) -> None:
        n = batch.count  # [D]
        # The corrected two-pass algorithm, in float32 passes over [D, N] with float64 from the
        # per-direction sums on: a rough mean m, then the deviations from it, small numbers
        # whose sums are accurate to float32 rounding of themselves (not of the activations'
        # size): mean = m + sum(x - m) / n and M2 = sum (x - m)^2 - sum(x - m)^2 / n.
        count = n.clamp(min=1).double()
        rough = (batch.zeroed.sum(1) / count).float()  # [D]
        deviation = batch.zeroed - rough[:, None]  # [D, N]
        if not batch.all_finite:
            deviation.masked_fill_(~batch.finite, 0.0)
        first = deviation.sum(1).double()
        mean = rough.double() + first / count
        m2 = deviation.square_().sum(1).double() - first.square() / count
        self.nonfinite += batch.x.shape[1] - n
        self.range.update(batch)
        self._combine(n, mean, m2.clamp_(min=0.0))

    def _combine(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + n
        weight = n / total.clamp(min=1).double()  # (int / int tensors would give float32)
        delta = mean - self.mean
        self.mean += delta * weight
        self.m2 += m2 + delta**2 * (self.count * weight)
        self.count = total

    def merge(self, other: Moments) -> None:
        self._combine(other.count, other.mean, other.m2)
        self.nonfinite += other.nonfinite
        self.range.merge(other.range)

    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp(min=1)).sqrt()

    @property
    def min(self) -> torch.Tensor:
        return self.range.min

    @property
    def max(self) -> torch.Tensor:
        return self.range.max

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        lo, hi = self.range.of(d)
        stats = {"count": int(self.count[d]), "min": lo, "max": hi, "mean": float(self.mean[d])}
        return {
            "stats": {**stats, "std": float(self.std()[d]), "nonfinite": int(self.nonfinite[d])}
        }


class Histogram(Summary):
    """Exact counts of D streams on bins of width 2**exp[d] starting at start[d] * 2**exp[d]."""

    name = "histogram"
    STATE = ("exp", "start", "counts", "range.min", "range.max")

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        d, device = shape.num_directions, shape.device
        self.bins = shape.bins
        self.size = shape.bins * OVERSAMPLE
        self.exp = torch.full((d,), _EMPTY_EXP, dtype=torch.long, device=device)
        self.start = torch.zeros(d, dtype=torch.long, device=device)
        self.counts = torch.zeros(d, self.size, dtype=torch.long, device=device)
        self.range = Range(d, device)  # the grid covers it

    def _grid(self, lo: torch.Tensor, hi: torch.Tensor, exp: torch.Tensor):
        """The finest grid no finer than `exp` on which [lo, hi] (float64, [D]) fits."""
        n = self.size
        magnitude = torch.maximum(lo.abs(), hi.abs())
        # A zero span still needs a positive width; 2**-40 relative keeps indices small.
        span = torch.maximum(hi - lo, torch.clamp(magnitude * 2.0**-40, min=2.0**-100))
        exp = torch.maximum(torch.ceil(torch.log2(span / (n - 1))).long(), exp)
        exp = exp + (_floor_div(hi, exp) - _floor_div(lo, exp) > n - 1).long()  # log2 rounding
        return exp, _floor_div(lo, exp)

    def _rebinned(self, counts, exp, start, new_exp, new_start) -> torch.Tensor:
        # Old bin j (global index start + j) lies in new bin (start + j) >> (new_exp - exp).
        shift = (new_exp - exp).clamp(max=62)[:, None]
        old = start[:, None] + torch.arange(self.size, device=counts.device)
        index = ((old >> shift) - new_start[:, None]).clamp(
            0, self.size - 1
        )  # only empty bins clamp
        return torch.zeros_like(counts).scatter_add_(1, index, counts)

    def _fit(self, exp: torch.Tensor) -> None:
        new_exp, new_start = self._grid(*self.range.bounds(), exp)
        if torch.equal(new_exp, self.exp) and torch.equal(new_start, self.start):
            return  # the usual case once the range is known: no rebinning
        self.counts = self._rebinned(self.counts, self.exp, self.start, new_exp, new_start)
        self.exp, self.start = new_exp, new_start

    def update(self, batch: BatchTokens) -> None:
        self.range.update(batch)
        self._fit(self.exp)
        x, (d, n) = batch.x, (batch.x.shape[0], self.size)
        # floor(x / 2**exp) in float32 is exact (a power-of-two scale, and start is itself
        # floor(lo / 2**exp) of a float32 lo), and so is the difference of the two integers,
        # which is below `size`. A value so small that x / 2**exp underflows to zero
        # (|x| < 2**(exp - 149), a subnormal for any sane range) lands in the bin of zero.
        # The flat index adds d * size; where every start and flat index is below 2**24, the
        # difference start - d * size is an exact float32 too, and one subtraction does both.
        scale = torch.ldexp(torch.ones(d, device=x.device), -self.exp)[:, None]
        first = torch.arange(0, d * n, n, device=x.device)
        index = torch.mul(x, scale).floor_()  # [D, N]
        if int(self.start.abs().max()) + d * n < 2**24:
            index = index.sub_((self.start - first).float()[:, None]).int()
        else:
            index = index.sub_(self.start.float()[:, None]).int().add_(first.int()[:, None])
        if batch.all_finite:
            self.counts += occurrences(index, d * n, torch.long).view(d, n)
            return
        index.masked_fill_(~batch.finite, 0)  # counted with weight 0 below
        self.counts.view(-1).index_add_(0, index.flatten(), batch.finite.flatten().long())

    def merge(self, other: Histogram) -> None:
        self.range.merge(other.range)
        self._fit(torch.maximum(self.exp, other.exp))
        self.counts += self._rebinned(other.counts, other.exp, other.start, self.exp, self.start)

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        return {"histogram": self.export(d, *self.range.of(d))}

    def export(self, d: int, lo: float, hi: float) -> dict:
        """Direction d as `bins` bins of whole internal bins, edges covering [lo, hi].

        Bins group `group` internal bins each; the occupied ones need `used` <= `bins` of them,
        and the rest are empty bins split between both ends, so every direction has `bins` bins.
        """
        width = math.ldexp(1.0, int(self.exp[d]))
        start = int(self.start[d])
        first, last = math.floor(lo / width) - start, math.floor(hi / width) - start
        group = math.ceil((last - first + 1) / self.bins)
        used = math.ceil((last - first + 1) / group)
        first -= (self.bins - used) // 2 * group  # global bin indices may go past the grid
        counts = torch.zeros(self.bins * group, dtype=torch.long)
        inside = slice(max(first, 0), min(first + self.bins * group, self.size))
        counts[inside.start - first : inside.stop - first] = self.counts[d, inside].cpu()
        edges = [(start + first + i * group) * width for i in range(self.bins + 1)]
        return {"edges": edges, "counts": counts.view(self.bins, group).sum(1).tolist()}


def _floor_div(x: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """floor(x / 2**exp) as int64 for float64 x; exact, since the scale is a power of two."""
    return torch.floor(torch.ldexp(x, -exp)).long()


def beyond(
    x: torch.Tensor, floor: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The entries of x [D, N] beyond floor [D] (above it if largest, else below): rows,
    columns and values [Q], in no particular order; None where too many chunks hold one.

    Once the lists are full few tokens beat their k-th value, and few chunks hold one: only
    those chunks are read. Where many chunks do (the first batches, or a batch larger than any
    before), the caller first raises the floor to the batch's own k-th window.
    """
    d, n = x.shape
    whole = n - n % CHUNK
    test = torch.gt if largest else torch.lt
    chunks = x[:, :whole].view(d, whole // CHUNK, CHUNK)
    peaks = chunks.amax(2) if largest else chunks.amin(2)  # [D, chunks]
    row, chunk = test(peaks, floor[:, None]).nonzero(as_tuple=True)  # [Q] (a host sync)
    if len(row) > DENSE * d:
        return None
    tail = torch.arange(whole, n, device=x.device)  # the columns that fill no whole chunk
    rows = torch.cat(
        [
            row.repeat_interleave(CHUNK),
            torch.arange(d, device=x.device).repeat_interleave(len(tail)),
        ]
    )
    columns = torch.cat(
        [(chunk[:, None] * CHUNK + torch.arange(CHUNK, device=x.device)).flatten(), tail.repeat(d)]
    )
    values = x.reshape(-1).index_select(0, rows * n + columns)
    keep = test(values, floor[rows])
    return rows[keep], columns[keep], values[keep]


def window_floor(x: torch.Tensor, windows: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """[D]: a floor below which no entry of x [D, N] can matter to a top-k of distinct windows
    (windows [N] each token's window key): the batch's own k-th best window, less TIE (so that
    an occurrence near a kept window's value still counts); the empty floor if it has fewer."""
    sign = 1.0 if largest else -1.0
    _, inverse = torch.unique(windows, return_inverse=True)  # [N] into the G windows
    groups = int(inverse.max()) + 1
    if groups < k:
        return x.new_full((x.shape[0],), -math.inf * sign)
    best = x.new_full((x.shape[0], groups), -math.inf)  # [D, G] each window's extreme
    best.scatter_reduce_(1, inverse.expand(x.shape[0], -1), x * sign, "amax")
    kth = best.topk(k, dim=1).values[:, -1]  # [D]
    return (kth - TIE * kth.abs()) * sign


def sort_by(*keys: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts by keys[0], then keys[1], ... (each [Q], ascending)."""
    order = keys[-1].argsort(stable=True)
    for key in reversed(keys[:-1]):
        order = order[key[order].argsort(stable=True)]
    return order


def group_starts(key: torch.Tensor) -> torch.Tensor:
    """[Q] bool: where the sorted key [Q] changes (True at 0): the first of each group."""
    start = torch.ones_like(key, dtype=torch.bool)
    start[1:] = key[1:] != key[:-1]
    return start


def near(value: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Whether values count as equal to the extreme (>= it, up to TIE relative)."""
    return value >= extreme - TIE * extreme.abs()


def _pair(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One int64 per (row, window key): equal exactly when both are, up to a 64-bit hash
    collision (as for the keys themselves)."""
    return keys ^ (rows * (0x9E3779B97F4A7C15 - 2**64))  # an odd 64-bit multiplier


def token_order(example: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(example_index, token_index) as one int64 that sorts the same way."""
    return example * 2**32 + position


def distinct_windows(
    lists: torch.Tensor,  # [Q] list (side * D + direction) of each entry
    columns: torch.Tensor,  # [Q] its token (into the batch's real tokens)
    values: torch.Tensor,  # [Q] its activation, oriented so that larger is better
    keys: torch.Tensor,  # [Q] its token's window key
    order: torch.Tensor,  # [Q] its token's (example, position) order
) -> tuple[torch.Tensor, ...]:
    """One entry per (list, window) among the entries: the window's extreme value and its
    shown occurrence, the earliest of those near the extreme. Returns lists, columns, extremes,
    shown values, keys and orders [G], one per group."""
    pair = _pair(lists, keys)
    at = sort_by(pair, -values)  # by (list, window), best first
    pair, values, order = pair[at], values[at], order[at]
    start = group_starts(pair)
    group = start.cumsum(0) - 1  # [Q]
    extreme = values[start][group]
    candidate = order.where(near(values, extreme), torch.iinfo(torch.long).max)
    earliest = torch.full_like(order[start], torch.iinfo(torch.long).max)
    earliest.scatter_reduce_(0, group, candidate, "amin")
    shown = candidate == earliest[group]  # one per group: a token's order is unique
    at = at[shown]
    return lists[at], columns[at], extreme[shown], values[shown], keys[at], order[shown]


def distinct(
    values: torch.Tensor,  # [2, D, k + m] kept windows' values then candidates' (oriented)
    shown: torch.Tensor,  # [2, D, k + m] the values of the occurrences they show
    order: torch.Tensor,  # [2, D, k + m] those occurrences' token_order
    key: torch.Tensor,  # [2, D, k + m] window keys, distinct among the k and among the m
    k: int,
) -> torch.Tensor:
    """values with each window once per list: where a candidate has a kept window's key, the
    one whose shown occurrence wins (near the larger extreme, and earlier if both are) takes
    the larger extreme and the other becomes -inf. Only lists with candidates are read."""
    flat = values.flatten(0, 1)  # [2D, k + m]
    lists = (flat[:, k:] > -math.inf).any(1).nonzero().squeeze(1)  # [P] (a host sync)
    v, s, o, w = (t.flatten(0, 1).index_select(0, lists) for t in (values, shown, order, key))
    same = w[:, :k, None] == w[:, None, k:]  # [P, k, m]
    same &= (v[:, :k, None] > -math.inf) & (v[:, None, k:] > -math.inf)
    extreme = torch.maximum(v[:, :k, None], v[:, None, k:])  # [P, k, m]
    kept_wins = near(s[:, :k, None], extreme) & (
        ~near(s[:, None, k:], extreme) | (o[:, :k, None] < o[:, None, k:])
    )
    none = torch.tensor(-math.inf, device=v.device)
    kept = torch.where(same & kept_wins, extreme, none).amax(2).maximum(v[:, :k])
    new = torch.where(same & ~kept_wins, extreme, none).amax(1).maximum(v[:, k:])
    kept.masked_fill_((same & ~kept_wins).any(2), -math.inf)
    new.masked_fill_((same & kept_wins).any(1), -math.inf)
    return flat.index_copy(0, lists, torch.cat([kept, new], 1)).view_as(values)


class TopK(Summary):
    """The k context windows with the largest and the k with the most negative activations of
    each direction: one slot per distinct window (backend.contexts.window_keys).

    A window's value on a sign is its most extreme activation of that sign over all its
    occurrences; the occurrence shown is the earliest by (example_index, token_index) of those
    within TIE relative of it (identical prompt prefixes differ only in float rounding), so the
    choice does not depend on how the run was split. Side 0 keeps the largest activations; side
    1 the most negative, stored negated so that "better" means "larger" on both sides. Each side
    is sorted, best first, ties by the shown occurrence's (example_index, token_index).
    """

    name = "top"
    # [2, D, k, ...]; values: the windows' extremes, key: their window keys
    STATE = FIELDS = ("values", "example", "position", "ids", "acts", "siblings", "key")

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        d, k, c, s = (
            shape.num_directions,
            shape.top_k,
            2 * shape.window + 1,
            shape.siblings.shape[1],
        )
        device = shape.device
        self.values = torch.full((2, d, k), -math.inf, device=device)
        self.example = torch.full((2, d, k), -1, dtype=torch.long, device=device)
        self.position = torch.full((2, d, k), -1, dtype=torch.long, device=device)
        self.ids = torch.full((2, d, k, c), -1, dtype=torch.long, device=device)
        self.acts = torch.zeros(2, d, k, c, device=device)  # [2, D, k, 2W+1]
        self.siblings = torch.zeros(2, d, k, s, c, device=device)  # [2, D, k, S, 2W+1]
        self.key = torch.zeros(2, d, k, dtype=torch.long, device=device)
        self.sign = torch.tensor([1.0, -1.0], device=device)[:, None, None]  # [2, 1, 1]

    def _shown(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept windows' shown values (oriented) and orders [2, D, k]."""
        shown = self.acts[..., self.shape.window] * self.sign  # the token's own activation
        return shown, token_order(self.example, self.position)

    def update(self, batch: BatchTokens) -> None:
        # A window enters a list only if it beats the list's k-th value (-inf until it is full);
        # a kept window's occurrence a little below its value may become the one shown.
        d = self.shape.num_directions
        floor = self.values[:, :, -1]  # [2, D]
        relaxed = floor - TIE * floor.abs()
        high = self._entries(batch, batch.high, relaxed[0], largest=True)
        low = self._entries(batch, batch.low, -relaxed[1], largest=False)
        if len(high[0]) + len(low[0]) == 0:
            return  # no token of the batch comes near any list
        found = self._candidates(
            batch,
            torch.cat([high[0], low[0] + d]),
            torch.cat([high[1], low[1]]),
            torch.cat([high[2], -low[2]]),
        )
        lists, rank, columns, extreme, occurrence, window, order, known = found
        width = int(rank.max()) + 1  # candidates per list, at most 2k (a host sync)
        at = lists * width + rank
        values = torch.full((2 * d * width,), -math.inf, device=batch.x.device)
        shown = torch.full_like(values, -math.inf)
        key, token, first = (torch.zeros_like(values, dtype=torch.long) for _ in range(3))
        values[at], shown[at], key[at], token[at], first[at] = (
            extreme, occurrence, window, columns, order
        )  # fmt: skip
        values, shown, key, token, first = (
            t.view(2, d, width) for t in (values, shown, key, token, first)
        )

        def entering(side: torch.Tensor, d: torch.Tensor, j: torch.Tensor) -> dict:
            n = token[side, d, j]
            ids, acts = batch.contexts(d, n)  # acts [M, 1 + S, C]: the direction's, siblings'
            return {
                "example": batch.example[n],
                "position": batch.position[n],
                "ids": ids,
                "acts": acts[:, 0],
                "siblings": acts[:, 1:],
                "key": key[side, d, j],
            }

        self._merge(values, shown, first, key, entering, known)

    def _entries(
        self, batch: BatchTokens, x: torch.Tensor, floor: torch.Tensor, largest: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries of x [D, N] (batch.high or batch.low) that may matter to one side's
        lists, beyond floor [D]: rows, columns and values [Q] (beyond)."""
        found = beyond(x, floor, largest)
        if found is not None:
            return found
        tighter = window_floor(x, batch.window_key, self.shape.top_k, largest)
        floor = torch.maximum(floor, tighter) if largest else torch.minimum(floor, tighter)
        found = beyond(x, floor, largest)
        if found is not None:
            return found
        rows, columns = (x > floor[:, None] if largest else x < floor[:, None]).nonzero(
            as_tuple=True
        )  # many ties at the top: every entry beyond
        return rows, columns, x[rows, columns]

    def _candidates(
        self, batch: BatchTokens, lists: torch.Tensor, columns: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The candidate windows of a batch's entries (lists [Q], columns, oriented values):
        lists, ranks (< 2k per list), columns, extremes, shown values, keys and orders [G],
        and whether any is a window a list keeps.

        Per list, the windows it already keeps come first (they may change the occurrence
        shown), then the k best others: whatever else the batch holds cannot enter.
        """
        k = self.shape.top_k
        window = batch.window_key[columns]
        order = token_order(batch.example[columns], batch.position[columns])
        lists, columns, extreme, value, window, order = distinct_windows(
            lists, columns, values, window, order
        )
        kept = self.values.view(-1, k) > -math.inf  # [2D, k]
        known = torch.isin(
            _pair(lists, window), _pair(kept.nonzero()[:, 0], self.key.view(-1, k)[kept])
        )
        at = sort_by(lists, extreme.masked_fill(known, math.inf).neg_(), order)
        lists = lists[at]
        rank = torch.arange(len(lists), device=lists.device) - torch.searchsorted(lists, lists)
        keep = rank < 2 * k
        at = at[keep]
        found = (t[at] for t in (columns, extreme, value, window, order))
        return lists[keep], rank[keep], *found, bool(known.any())  # a host sync

    def merge(self, other: TopK) -> None:
        def entering(side: torch.Tensor, d: torch.Tensor, j: torch.Tensor) -> dict:
            return {name: getattr(other, name)[side, d, j] for name in self.FIELDS[1:]}

        self._merge(other.values, *other._shown(), other.key, entering)

    def _merge(
        self,
        values: torch.Tensor,  # [2, D, m] candidates' window values (oriented), -inf: none
        shown: torch.Tensor,  # [2, D, m] the value of the occurrence each would show
        order: torch.Tensor,  # [2, D, m] that occurrence's token_order
        key: torch.Tensor,  # [2, D, m] window keys, distinct within a list
        entering: Callable[..., dict],
        known: bool = True,  # False: no candidate is a window its list keeps
    ) -> None:
        """Keep the k best distinct windows of the kept ones and the candidates.

        entering(side, direction, j) gives the other fields of the candidates j that make it
        in. After the first batches few do, in few of the 2D lists: only those lists are
        rewritten, and only the entering tokens' context windows are read.
        """
        k = self.shape.top_k
        kept_shown, kept_order = self._shown()
        both = torch.cat([self.values, values], 2)
        if known:
            both = distinct(
                both,
                torch.cat([kept_shown, shown], 2),
                torch.cat([kept_order, order], 2),
                torch.cat([self.key, key], 2),
                k,
            )
        at = torch.cat([kept_order, order], 2).argsort(2)  # ties: the earlier occurrence
        best = at.gather(2, both.gather(2, at).argsort(dim=2, descending=True, stable=True))[
            ..., :k
        ]
        self.values = both.gather(2, best)
        new = (best >= k).view(-1, k)  # [2D, k] over the lists, side-major
        lists = new.any(1).nonzero().squeeze(1)  # [P] the lists that change (a host sync)
        best, new = best.view(-1, k).index_select(0, lists), new.index_select(0, lists)  # [P, k]
        changed, slot = new.nonzero(as_tuple=True)  # [M] entering tokens
        where, directions = lists[changed], self.shape.num_directions
        entered = entering(where // directions, where % directions, best[changed, slot] - k)
        kept = best.clamp(max=k - 1)  # where a new one enters, overwritten below
        for name, value in entered.items():
            field = getattr(self, name).flatten(0, 1)  # [2D, k, ...], a view
            rows = field.index_select(0, lists)  # [P, k, ...]
            at = kept.view(*kept.shape, *[1] * (rows.dim() - 2)).expand_as(rows)
            rows = rows.gather(1, at)
            rows[changed, slot] = value.to(rows.dtype)
            field.index_copy_(0, lists, rows)

    def top_examples(self, d: int, negative: bool) -> list[Example]:
        """Direction d's top examples on one side, strongest first."""
        side = int(negative)
        kept = int((self.values[side, d] > 0).sum())  # -inf fillers and zeros: neither side
        return unpack(
            self.acts[side, d, :kept, self.shape.window],  # the shown occurrence's activation
            self.example[side, d, :kept],
            self.position[side, d, :kept],
            self.ids[side, d, :kept],
            self.acts[side, d, :kept],
            self.siblings[side, d, :kept],
            self.shape.siblings[d].tolist(),
        )

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        return {
            f"top_{side}": [doc.example(e) for e in self.top_examples(d, negative)]
            for side, negative in (("positive", False), ("negative", True))
        }

    def examples(self) -> torch.Tensor:
        return self.example.flatten()

    def token_ids(self) -> torch.Tensor:
        return self.ids.flatten()

    def windows(self) -> torch.Tensor:
        return self.ids.flatten(0, 2)  # [2Dk, 2W+1]


# Every per-direction summary, in the order of its fields in a direction's entry.
SUMMARIES: list[type[Summary]] = [
    Moments,
    Histogram,
    TopK,
    QuantileSamples,
    PositionProfile,
    TokenProfile,
]


class Tracker:
    """One of each summary in SUMMARIES over the same D directions, fed the same batches.

    NaN and infinite activations are counted per direction (Moments) and kept out of every
    summary. The summaries are reached by name: tracker.histogram, tracker.samples, ...
    """

    def __init__(
        self,
        num_directions: int,
        top_k: int,
        context_window: int,
        bins: int,
        device: torch.device,
        siblings: torch.Tensor | None = None,  # [D, S] see backend.contexts; None: no siblings
        vocab_size: int = 0,  # token profiles need ids below it; 0: no token profiles
        below_median: int = 0,  # contexts the quantile samples show below the median, if more
    ) -> None:
        if siblings is None:
            siblings = torch.empty(num_directions, 0, dtype=torch.long)
        self.shape = Shape(
            num_directions, top_k, context_window, bins, siblings.to(device), vocab_size, device,
            below_median,
        )  # fmt: skip
        self.summaries = {cls.name: cls(self.shape) for cls in SUMMARIES if cls.applies(self.shape)}

    def __getattr__(self, name: str) -> Summary:
        summaries = self.__dict__.get("summaries", {})
        if name not in summaries:
            raise AttributeError(name)
        return summaries[name]

    def update(
        self,
        acts: torch.Tensor,  # [D, B*L] float32, row-major over (sequence, position)
        real: torch.Tensor,  # [N] flat positions of the real (non-padding) tokens
        input_ids: torch.Tensor,  # [B, L]
        lengths: torch.Tensor,  # [B] real tokens per row (right padding)
        example_index: torch.Tensor,  # [B]
    ) -> BatchTokens | None:
        """Every summary's update; returns the batch's shared view (None: no real tokens)."""
        if real.numel() == 0:
            return None
        s = self.shape
        batch = BatchTokens(acts, real, input_ids, lengths, example_index, s.window, s.siblings)
        for summary in self.summaries.values():
            summary.update(batch)
        return batch

    def merge(self, other: Tracker) -> None:
        """Fold in another tracker of the same directions (another process, shard or run)."""
        for name, summary in self.summaries.items():
            summary.merge(other.summaries[name])

    def state_dict(self) -> dict[str, Any]:
        """Everything the tracker holds, on the CPU: for checkpoints, shards and processes."""
        return {
            "shape": self.shape.options(),
            "siblings": self.shape.siblings.cpu(),
            "summaries": {name: s.state_dict() for name, s in self.summaries.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> Tracker:
        o = state["shape"]
        tracker = cls(
            o["num_directions"], o["top_k"], o["window"], o["bins"], device, state["siblings"],
            o["vocab_size"], o["below_median"],
        )  # fmt: skip
        for name, summary in tracker.summaries.items():
            summary.load(state["summaries"][name])
        return tracker

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        """Every summary's fields of direction d's document entry."""
        found: dict[str, Any] = {}
        for summary in self.summaries.values():
            found.update(summary.fields(d, doc))
        return found

    def examples_kept(self) -> set[int]:
        """Indices of the examples the kept tokens come from (a superset of those the output
        shows)."""
        kept = torch.cat([s.examples().cpu() for s in self.summaries.values()])
        return {int(i) for i in torch.unique(kept) if i >= 0}

    def windows(self) -> torch.Tensor:
        """[M, 2W+1] every context window the summaries keep, on the CPU (rows of -1: none)."""
        return torch.cat([s.windows().long().cpu() for s in self.summaries.values()])

    def token_ids(self) -> set[int]:
        """Token ids the summaries' fields may name."""
        ids = torch.cat([s.token_ids().long().cpu() for s in self.summaries.values()])
        return {int(i) for i in torch.unique(ids) if i >= 0}
