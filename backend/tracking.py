"""Streaming, mergeable summaries of D directions' activations, updated a batch at a time.

Everything lives on the device as [.., D] tensors and is updated with a handful of batched ops per
batch: no per-token or per-direction Python, no host synchronisation. Memory is fixed by
(D, k, window, bins), whatever the number of tokens.
- top-k: the k largest and the k most negative activations per direction with their context
  window, kept exact by merging the running top-k with each batch's candidates.
- moments: count / mean / M2 in float64, combined with Chan et al.'s parallel formulas.
- histogram: exact counts on a power-of-two grid that coarsens (merging bin pairs) as the range
  grows, so no value is ever re-read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Internal histogram resolution relative to the requested bins: the output groups whole internal
# bins, so a finer grid lets the output's edges hug [min, max] closely.
OVERSAMPLE = 16
_EMPTY_EXP = -(2**20)  # exponent of a direction that has seen no value yet


@dataclass
class TopExample:
    activation: float
    example_index: int
    token_index: int
    context_ids: list[int]  # token ids of the clipped window
    context_acts: list[float]  # this direction's activation at each of them
    target: int  # position of the token itself inside the window


class Histogram:
    """Exact counts of D streams on bins of width 2**exp[d] starting at start[d] * 2**exp[d]."""

    def __init__(self, num_directions: int, bins: int, device: torch.device) -> None:
        self.bins = bins
        self.size = bins * OVERSAMPLE
        self.exp = torch.full((num_directions,), _EMPTY_EXP, dtype=torch.long, device=device)
        self.start = torch.zeros(num_directions, dtype=torch.long, device=device)
        self.counts = torch.zeros(num_directions, self.size, dtype=torch.long, device=device)

    def _fit(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Coarsen/shift each grid so that [lo, hi] (float64, [D]) fits in `size` bins."""
        n = self.size
        magnitude = torch.maximum(lo.abs(), hi.abs())
        # A zero span still needs a positive width; 2**-40 relative keeps indices small.
        span = torch.maximum(hi - lo, torch.clamp(magnitude * 2.0**-40, min=2.0**-100))
        exp = torch.ceil(torch.log2(span / (n - 1))).long()
        exp = torch.maximum(exp, self.exp)
        too_wide = _floor_div(hi, exp) - _floor_div(lo, exp) > n - 1  # log2 rounding
        exp = exp + too_wide.long()
        start = _floor_div(lo, exp)
        # Old bin j (global index start_old + j) lies in new bin (start_old + j) >> shift.
        shift = (exp - self.exp).clamp(max=62)[:, None]
        old = self.start[:, None] + torch.arange(n, device=lo.device)
        index = ((old >> shift) - start[:, None]).clamp(0, n - 1)  # clamps only empty bins
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, index, self.counts)
        self.exp, self.start = exp, start

    def update(self, values: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """Add values [N, D] where valid [N, 1]; lo/hi [D]: the running min/max including them."""
        self._fit(lo, hi)
        n, d = self.size, values.shape[1]
        index = _floor_div(values.double(), self.exp) - self.start  # [N, D] in [0, n)
        index = index.masked_fill(~valid, n)  # padding goes to a spill bin, dropped below
        flat = (index + torch.arange(d, device=values.device) * (n + 1)).flatten()
        self.counts += torch.bincount(flat, minlength=d * (n + 1)).view(d, n + 1)[:, :n]

    def export(self, d: int, lo: float, hi: float) -> dict:
        """Direction d as at most `bins` bins of whole internal bins, edges covering [lo, hi]."""
        width = math.ldexp(1.0, int(self.exp[d]))
        start = int(self.start[d])
        first, last = math.floor(lo / width) - start, math.floor(hi / width) - start
        group = math.ceil((last - first + 1) / self.bins)
        num = math.ceil((last - first + 1) / group)
        counts = self.counts[d, first : first + num * group].cpu()
        counts = torch.nn.functional.pad(counts, (0, num * group - counts.numel()))
        edges = [(start + first + i * group) * width for i in range(num + 1)]
        return {"edges": edges, "counts": counts.view(num, group).sum(1).tolist()}


def _floor_div(x: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """floor(x / 2**exp) as int64; exact, since scaling by a power of two is exact."""
    return torch.floor(torch.ldexp(x, -exp)).long()


class Tracker:
    """Top-k with context, moments and histograms of D directions."""

    def __init__(
        self, num_directions: int, top_k: int, context_window: int, bins: int, device: torch.device
    ) -> None:
        d, k, c = num_directions, top_k, 2 * context_window + 1
        self.num_directions, self.top_k, self.window = d, k, context_window
        f64 = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(d, dtype=torch.long, device=device)
        self.mean = torch.zeros(d, **f64)
        self.m2 = torch.zeros(d, **f64)
        self.min = torch.full((d,), math.inf, **f64)
        self.max = torch.full((d,), -math.inf, **f64)
        self.histogram = Histogram(d, bins, device)
        # Top-k over 2D signed columns: column j < D holds direction j's activations, column
        # D + j its negations, so "most negative" is just the top-k of the second half.
        self.top_values = torch.full((k, 2 * d), -math.inf, device=device)  # [k, 2D]
        self.top_example = torch.full((k, 2 * d), -1, dtype=torch.long, device=device)
        self.top_position = torch.full((k, 2 * d), -1, dtype=torch.long, device=device)
        self.context_ids = torch.full((k, 2 * d, c), -1, dtype=torch.long, device=device)
        self.context_acts = torch.zeros(k, 2 * d, c, device=device)  # [k, 2D, 2W+1]

    def update(
        self,
        acts: torch.Tensor,  # [B, L, D] float32
        input_ids: torch.Tensor,  # [B, L]
        lengths: torch.Tensor,  # [B] real tokens per row (right padding)
        example_index: torch.Tensor,  # [B]
    ) -> None:
        length = acts.shape[1]
        real = torch.arange(length, device=acts.device)[None, :] < lengths[:, None]  # [B, L]
        flat = acts.flatten(0, 1)  # [B*L, D]
        valid = real.flatten()[:, None]  # [B*L, 1]
        self._update_moments(flat, valid)
        self.histogram.update(flat, valid, self.min, self.max)
        self._update_top(acts, input_ids, lengths, example_index, valid)

    def _update_moments(self, flat: torch.Tensor, valid: torch.Tensor) -> None:
        x = flat.double()
        n = valid.sum()
        batch_mean = (x * valid).sum(0) / n
        batch_m2 = (((x - batch_mean) * valid) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total
        self.min = torch.minimum(self.min, x.masked_fill(~valid, math.inf).amin(0))
        self.max = torch.maximum(self.max, x.masked_fill(~valid, -math.inf).amax(0))

    def _update_top(self, acts, input_ids, lengths, example_index, valid) -> None:
        length, d = acts.shape[1:]
        k, device = self.top_k, acts.device
        flat = acts.flatten(0, 1)
        signed = torch.cat([flat, -flat], dim=1).masked_fill(~valid, -math.inf)  # [B*L, 2D]
        values, index = torch.cat([self.top_values, signed]).topk(k, dim=0)  # [k, 2D]
        kept = index < k  # winner was already in the running top-k
        columns = torch.arange(2 * d, device=device)
        # Winners from this batch: their row, position and context window.
        token = (index - k).clamp(min=0)
        row, pos = token // length, token % length
        window = pos[..., None] + torch.arange(-self.window, self.window + 1, device=device)
        inside = (window >= 0) & (window < lengths[row][..., None])  # [k, 2D, 2W+1]
        window = window.clamp(0, length - 1)
        ids = input_ids[row[..., None], window].masked_fill(~inside, -1)
        ctx = acts[row[..., None], window, (columns % d)[None, :, None]]
        # Winners from the running top-k keep what they had.
        old = index.clamp(max=k - 1)
        self.context_ids = torch.where(kept[..., None], self.context_ids[old, columns], ids)
        self.context_acts = torch.where(kept[..., None], self.context_acts[old, columns], ctx)
        self.top_example = torch.where(kept, self.top_example[old, columns], example_index[row])
        self.top_position = torch.where(kept, self.top_position[old, columns], pos)
        self.top_values = values

    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp(min=1)).sqrt()

    def top_examples(self, d: int, negative: bool) -> list[TopExample]:
        """Direction d's top examples on one side, strongest first (one device-to-host copy)."""
        column = d + self.num_directions if negative else d
        sign = -1.0 if negative else 1.0
        values = self.top_values[:, column].cpu()
        ids = self.context_ids[:, column].cpu()
        acts = self.context_acts[:, column].cpu()
        examples = []
        for i in range(self.top_k):
            if not values[i] > 0:  # -inf fillers, and zeros, which are neither side
                break
            inside = ids[i] >= 0
            examples.append(
                TopExample(
                    activation=sign * float(values[i]),
                    example_index=int(self.top_example[i, column]),
                    token_index=int(self.top_position[i, column]),
                    context_ids=ids[i][inside].tolist(),
                    context_acts=acts[i][inside].tolist(),
                    target=self.window - int((~inside[: self.window]).sum()),
                )
            )
        return examples
