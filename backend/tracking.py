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
- top-k: the k largest and the k most negative activations per direction with their context
  window; a batch's candidates are merged with the running top-k.
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


def topk_beyond(
    x: torch.Tensor, floor: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k' = min(k, N) best values of each row of x [D, N] and their columns, best first,
    where only values beyond floor [D] (above it if largest, else below) must be exact: the
    others may be any, or the fill (-inf if largest, else +inf).

    Once the lists are full few tokens beat their k-th value, and few chunks hold one: those
    are read, not the k best chunks of every row. Where many chunks do (the first batches, or
    a batch larger than any before), chunked_topk searches every row.
    """
    d, n = x.shape
    k, whole = min(k, n), n - n % CHUNK
    beyond = torch.gt if largest else torch.lt
    chunks = x[:, :whole].view(d, whole // CHUNK, CHUNK)
    peaks = chunks.amax(2) if largest else chunks.amin(2)  # [D, chunks]
    row, chunk = beyond(peaks, floor[:, None]).nonzero(as_tuple=True)  # [Q] (a host sync)
    if len(row) > DENSE * d:
        return chunked_topk(x, k, largest)
    # the Q chunks' columns, and the tail's that fills no whole chunk
    tail = torch.arange(whole, n, device=x.device)
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
    keep = beyond(values, floor[rows])
    rows, columns, values = rows[keep], columns[keep], values[keep]
    # By row, then best first: each row's first k are its best.
    order = values.argsort(descending=largest, stable=True)
    order = order[rows[order].argsort(stable=True)]
    rows, columns, values = rows[order], columns[order], values[order]
    rank = torch.arange(len(rows), device=x.device) - torch.searchsorted(rows, rows)
    keep = rank < k
    best = x.new_full((d, k), -math.inf if largest else math.inf)
    at = torch.zeros(d, k, dtype=torch.long, device=x.device)
    best[rows[keep], rank[keep]] = values[keep]
    at[rows[keep], rank[keep]] = columns[keep]
    return best, at


def chunked_topk(x: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=1) for x [D, N], reading x about once instead of sorting it.

    The top k of a row lie in at most k chunks, those with the k largest chunk maxima; so the
    full search runs over k * CHUNK candidates (plus the tail that fills no whole chunk).
    """
    d, n = x.shape
    whole = n - n % CHUNK
    if whole // CHUNK <= k:
        return x.topk(min(k, n), dim=1, largest=largest)
    chunks = x[:, :whole].view(d, whole // CHUNK, CHUNK)
    peaks = chunks.amax(2) if largest else chunks.amin(2)  # [D, chunks]
    best = peaks.topk(k, dim=1, largest=largest).indices  # [D, k]
    columns = (best[..., None] * CHUNK + torch.arange(CHUNK, device=x.device)).flatten(1)
    columns = torch.cat([columns, torch.arange(whole, n, device=x.device).expand(d, -1)], 1)
    values, index = x.gather(1, columns).topk(k, dim=1, largest=largest)
    return values, columns.gather(1, index)


class TopK(Summary):
    """The k largest and the k most negative activations of each direction, with context.

    Side 0 keeps the largest activations; side 1 the most negative, stored negated so that
    "better" means "larger" on both sides. Each side is sorted, best first.
    """

    name = "top"
    STATE = FIELDS = ("values", "example", "position", "ids", "acts", "siblings")  # [2, D, k, ...]

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

    def update(self, batch: BatchTokens) -> None:
        # A token enters a list only if it beats the list's k-th value (-inf until it is full).
        floor = self.values[:, :, -1]  # [2, D]
        found = [
            topk_beyond(x, floor[side] * sign, self.shape.top_k, largest=sign > 0)
            for side, (x, sign) in enumerate(((batch.high, 1.0), (batch.low, -1.0)))
        ]
        values = torch.stack([found[0][0], -found[1][0]])  # [2, D, k']
        token = torch.stack([found[0][1], found[1][1]])  # indices into the real tokens

        def entering(side: torch.Tensor, d: torch.Tensor, j: torch.Tensor) -> dict:
            n = token[side, d, j]
            ids, acts, siblings = batch.contexts(d, n)
            return {
                "example": batch.example[n],
                "position": batch.position[n],
                "ids": ids,
                "acts": acts,
                "siblings": siblings,
            }

        self._merge(values, entering)

    def merge(self, other: TopK) -> None:
        def entering(side: torch.Tensor, d: torch.Tensor, j: torch.Tensor) -> dict:
            return {name: getattr(other, name)[side, d, j] for name in self.FIELDS[1:]}

        self._merge(other.values, entering)

    def _merge(self, values: torch.Tensor, entering: Callable[..., dict]) -> None:
        """Keep the k best of the kept tokens and the candidates `values` [2, D, m].

        entering(side, direction, j) gives the other fields of the candidates j that make it
        in. After the first batches few do, in few of the 2D lists: only those lists are
        rewritten, and only the entering tokens' context windows are read.
        """
        k = self.shape.top_k
        both = torch.cat([self.values, values], 2)
        best = both.topk(k, dim=2).indices  # [2, D, k], sorted
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
        sign = -1.0 if negative else 1.0
        return unpack(
            sign * self.values[side, d, :kept],
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
    ) -> None:
        if siblings is None:
            siblings = torch.empty(num_directions, 0, dtype=torch.long)
        self.shape = Shape(
            num_directions, top_k, context_window, bins, siblings.to(device), vocab_size, device
        )
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
    ) -> None:
        if real.numel() == 0:
            return
        s = self.shape
        batch = BatchTokens(acts, real, input_ids, lengths, example_index, s.window, s.siblings)
        for summary in self.summaries.values():
            summary.update(batch)

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
            o["vocab_size"],
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

    def token_ids(self) -> set[int]:
        """Token ids the summaries' fields may name."""
        ids = torch.cat([s.token_ids().long().cpu() for s in self.summaries.values()])
        return {int(i) for i in torch.unique(ids) if i >= 0}

    # The moments and top-k by their old names, as the tests and the summary line read them.
    @property
    def count(self) -> torch.Tensor:
        return self.moments.count

    @property
    def mean(self) -> torch.Tensor:
        return self.moments.mean

    @property
    def m2(self) -> torch.Tensor:
        return self.moments.m2

    @property
    def min(self) -> torch.Tensor:
        return self.moments.min

    @property
    def max(self) -> torch.Tensor:
        return self.moments.max

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.moments.nonfinite

    def std(self) -> torch.Tensor:
        return self.moments.std()

    def top_examples(self, d: int, negative: bool) -> list[Example]:
        return self.top.top_examples(d, negative)
