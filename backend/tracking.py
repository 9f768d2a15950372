"""Streaming, mergeable summaries of D directions' activations, updated a batch at a time.

Everything lives on the device as [D, ...] tensors, updated with a fixed handful of batched ops
per batch: no per-token or per-direction Python, and at most one host synchronisation (the
quantile samples'). Memory is fixed by (D, k, window, bins, vocabulary), whatever the number of
tokens. Every summary merges exactly with another of its kind, which is how batches enter it and
how processes and shards are combined.
- top-k: the k largest and the k most negative activations per direction with their context
  window; a batch's candidates are merged with the running top-k.
- moments: count / mean / M2 (float64), combined with Chan et al.'s parallel formulas.
- histogram: exact counts on a power-of-two grid that coarsens (merging bin pairs) as the range
  grows, so no value is ever re-read.
- quantile samples (backend.sampling), position and token profiles (backend.profiles).
"""

from __future__ import annotations

import math

import torch

from backend.contexts import BatchTokens, Example, unpack
from backend.profiles import PositionProfile, TokenProfile, TokenRows
from backend.sampling import QuantileSamples

# Internal histogram resolution relative to the requested bins: the output groups whole internal
# bins, so a finer grid lets the output's edges hug [min, max] closely.
OVERSAMPLE = 16
_EMPTY_EXP = -(2**20)  # exponent of a direction that has seen no value yet
CHUNK = 64  # top-k candidates are searched in chunks of this many tokens


class Histogram:
    """Exact counts of D streams on bins of width 2**exp[d] starting at start[d] * 2**exp[d]."""

    def __init__(self, num_directions: int, bins: int, device: torch.device) -> None:
        self.bins = bins
        self.size = bins * OVERSAMPLE
        self.exp = torch.full((num_directions,), _EMPTY_EXP, dtype=torch.long, device=device)
        self.start = torch.zeros(num_directions, dtype=torch.long, device=device)
        self.counts = torch.zeros(num_directions, self.size, dtype=torch.long, device=device)

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

    def _fit(self, lo: torch.Tensor, hi: torch.Tensor, exp: torch.Tensor) -> None:
        new_exp, new_start = self._grid(lo, hi, exp)
        self.counts = self._rebinned(self.counts, self.exp, self.start, new_exp, new_start)
        self.exp, self.start = new_exp, new_start

    def update(self, x: torch.Tensor, finite: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """Add values x [D, N] where `finite`; lo/hi [D]: the running min/max including them."""
        self._fit(lo, hi, self.exp)
        d, n = x.shape[0], self.size
        # floor(x / 2**exp) in float32 is exact (a power-of-two scale, and start is itself
        # floor(lo / 2**exp) of a float32 lo), and so is the difference of the two integers,
        # which is below `size`. A value so small that x / 2**exp underflows to zero
        # (|x| < 2**(exp - 149), a subnormal for any sane range) lands in the bin of zero.
        scale = torch.ldexp(torch.ones(d, device=x.device), -self.exp)[:, None]
        index = torch.floor(x * scale).sub_(self.start.float()[:, None]).int()  # [D, N] in [0, n)
        index.masked_fill_(~finite, 0)  # counted with weight 0 below
        index += torch.arange(0, d * n, n, dtype=torch.int, device=x.device)[:, None]
        # index_add_, not bincount: bincount on a GPU waits for the host to size its output.
        self.counts.view(-1).index_add_(0, index.flatten(), finite.flatten().long())

    def merge(self, other: Histogram, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Add another histogram's counts; lo/hi: the min/max over both."""
        self._fit(lo, hi, torch.maximum(self.exp, other.exp))
        self.counts += self._rebinned(other.counts, other.exp, other.start, self.exp, self.start)

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


class Tracker:
    """Every summary of D directions: top-k with context, moments, histograms, quantile samples,
    position and (given a vocabulary size) token profiles.

    NaN and infinite activations are counted per direction and kept out of every summary.
    """

    STATE = (
        "count", "mean", "m2", "min", "max", "nonfinite", "siblings",
        "top_values", "top_example", "top_position", "context_ids", "context_acts",
        "context_siblings",
    )  # fmt: skip

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
        d, k, c = num_directions, top_k, 2 * context_window + 1
        self.num_directions, self.top_k, self.window = d, k, context_window
        if siblings is None:
            siblings = torch.empty(d, 0, dtype=torch.long)
        self.siblings = siblings.to(device)
        s = self.siblings.shape[1]
        f64 = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(d, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(d, dtype=torch.long, device=device)
        self.mean = torch.zeros(d, **f64)
        self.m2 = torch.zeros(d, **f64)
        self.min = torch.full((d,), math.inf, **f64)
        self.max = torch.full((d,), -math.inf, **f64)
        self.histogram = Histogram(d, bins, device)
        # Side 0 keeps the largest activations; side 1 the most negative, stored negated so
        # that "better" means "larger" on both sides.
        self.top_values = torch.full((2, d, k), -math.inf, device=device)  # [2, D, k]
        self.top_example = torch.full((2, d, k), -1, dtype=torch.long, device=device)
        self.top_position = torch.full((2, d, k), -1, dtype=torch.long, device=device)
        self.context_ids = torch.full((2, d, k, c), -1, dtype=torch.long, device=device)
        self.context_acts = torch.zeros(2, d, k, c, device=device)  # [2, D, k, 2W+1]
        self.context_siblings = torch.zeros(2, d, k, s, c, device=device)  # [2, D, k, S, 2W+1]
        self.samples = QuantileSamples(d, c, s, device)
        self.positions = PositionProfile(d, device)
        self.tokens = TokenProfile(d, vocab_size, device) if vocab_size else None

    def update(
        self,
        acts: torch.Tensor,  # [D, B*L] float32, row-major over (sequence, position)
        real: torch.Tensor,  # [N] flat positions of the real (non-padding) tokens
        input_ids: torch.Tensor,  # [B, L]
        lengths: torch.Tensor,  # [B] real tokens per row (right padding)
        example_index: torch.Tensor,  # [B]
    ) -> None:
        batch = BatchTokens(
            acts, real, input_ids, lengths, example_index, self.window, self.siblings
        )
        x = acts.index_select(1, real)  # [D, N]
        finite = torch.isfinite(x)
        self.nonfinite += x.shape[1] - finite.sum(1)
        # x with its non-finite values made harmless, as each summary needs them
        zeroed = x.double().masked_fill_(~finite, 0.0)  # for sums; float64: many tokens
        high = x.masked_fill(~finite, -math.inf)  # for maxima
        low = x.masked_fill(~finite, math.inf)  # for minima
        self._update_moments(zeroed, finite, low, high)
        self.histogram.update(x, finite, *self.bounds())
        self._update_top(high, low, batch)
        self.samples.update(x, finite, batch)
        # The profiles add a row of D values per token: token-major copies make those rows
        # contiguous.
        rows = TokenRows(x.T.contiguous(), finite.T.contiguous())
        self.positions.update(rows, batch.position)
        if self.tokens is not None:
            self.tokens.update(rows, batch.ids)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """min and max [D], 0 for a direction that has seen no finite value yet."""
        seen = self.count > 0
        return self.min.where(seen, 0.0), self.max.where(seen, 0.0)

    def _update_moments(self, zeroed, finite, low, high) -> None:
        n = finite.sum(1)  # [D]
        mean = zeroed.sum(1) / n.clamp(min=1)
        m2 = (zeroed - mean[:, None]).masked_fill_(~finite, 0.0).square_().sum(1)
        self._merge_moments(n, mean, m2, low.amin(1).double(), high.amax(1).double())

    def _merge_moments(self, n, mean, m2, lo, hi) -> None:
        total = self.count + n
        weight = n / total.clamp(min=1).double()  # (int / int tensors would give float32)
        delta = mean - self.mean
        self.mean += delta * weight
        self.m2 += m2 + delta**2 * (self.count * weight)
        self.count = total
        self.min = torch.minimum(self.min, lo)
        self.max = torch.maximum(self.max, hi)

    def _update_top(self, high: torch.Tensor, low: torch.Tensor, batch: BatchTokens) -> None:
        d, k = high.shape[0], self.top_k
        best, best_at = chunked_topk(high, k, largest=True)
        worst, worst_at = chunked_topk(low, k, largest=False)
        n = torch.stack([best_at, worst_at])  # [2, D, k'] indices into the real tokens
        direction = torch.arange(d, device=n.device)[None, :, None].expand_as(n)
        ids, acts, siblings = batch.contexts(direction, n)
        values = torch.stack([best, -worst])  # [2, D, k']
        self._merge_top(values, batch.example[n], batch.position[n], ids, acts, siblings)

    def _merge_top(self, values, example, position, ids, acts, siblings) -> None:
        """Keep the k best of the running top-k and these candidates ([2, D, m, ...])."""
        values = torch.cat([self.top_values, values], 2)
        best = values.topk(self.top_k, dim=2).indices  # [2, D, k]
        self.top_values = values.gather(2, best)
        self.top_example = torch.cat([self.top_example, example], 2).gather(2, best)
        self.top_position = torch.cat([self.top_position, position], 2).gather(2, best)
        c = self.context_ids.shape[3]
        at = best[..., None].expand(-1, -1, -1, c)
        self.context_ids = torch.cat([self.context_ids, ids], 2).gather(2, at)
        self.context_acts = torch.cat([self.context_acts, acts], 2).gather(2, at)
        at = best[..., None, None].expand(-1, -1, -1, *self.context_siblings.shape[3:])
        self.context_siblings = torch.cat([self.context_siblings, siblings], 2).gather(2, at)

    def merge(self, other: Tracker) -> None:
        """Fold in another tracker of the same directions (another process, shard or run)."""
        self._merge_moments(other.count, other.mean, other.m2, other.min, other.max)
        self.nonfinite += other.nonfinite
        self.histogram.merge(other.histogram, *self.bounds())
        self._merge_top(
            other.top_values,
            other.top_example,
            other.top_position,
            other.context_ids,
            other.context_acts,
            other.context_siblings,
        )
        self.samples.merge(other.samples)
        self.positions.merge(other.positions)
        if self.tokens is not None and other.tokens is not None:
            self.tokens.merge(other.tokens)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the tracker holds, on the CPU: for checkpoints, shards and processes."""
        state = {name: getattr(self, name).cpu() for name in self.STATE}
        for name in ("exp", "start", "counts"):
            state[f"histogram.{name}"] = getattr(self.histogram, name).cpu()
        parts = {"samples": self.samples, "positions": self.positions, "tokens": self.tokens}
        for prefix, part in parts.items():
            if part is not None:
                state.update({f"{prefix}.{k}": v for k, v in part.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device) -> Tracker:
        _, d, k, c = state["context_ids"].shape
        bins = state["histogram.counts"].shape[1] // OVERSAMPLE
        tracker = cls(d, k, (c - 1) // 2, bins, device, state["siblings"])
        for name in cls.STATE:
            setattr(tracker, name, state[name].to(device))
        for name in ("exp", "start", "counts"):
            setattr(tracker.histogram, name, state[f"histogram.{name}"].to(device))

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix)}

        tracker.samples = QuantileSamples.from_state_dict(part("samples"), device)
        tracker.positions = PositionProfile.from_state_dict(part("positions"), device)
        if "tokens.vocab_size" in state:
            tracker.tokens = TokenProfile.from_state_dict(part("tokens"), device)
        return tracker

    def examples_kept(self) -> set[int]:
        """Indices of the examples the kept top-k and quantile samples come from (a superset
        of those the output shows)."""
        shown = torch.cat([self.top_example.flatten(), self.samples.example.flatten()])
        return {int(i) for i in torch.unique(shown) if i >= 0}

    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp(min=1)).sqrt()

    def top_examples(self, d: int, negative: bool) -> list[Example]:
        """Direction d's top examples on one side, strongest first."""
        side = int(negative)
        kept = int((self.top_values[side, d] > 0).sum())  # -inf fillers and zeros: neither side
        sign = -1.0 if negative else 1.0
        return unpack(
            sign * self.top_values[side, d, :kept],
            self.top_example[side, d, :kept],
            self.top_position[side, d, :kept],
            self.context_ids[side, d, :kept],
            self.context_acts[side, d, :kept],
            self.context_siblings[side, d, :kept],
            self.siblings[d].tolist(),
        )
