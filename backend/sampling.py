"""Seeded random samples of tokens from across each direction's distribution, exact and mergeable.

Every token gets a pseudo-random key from (example index, position) alone. Per direction, the
activations fall into buckets by sign and |activation|, four per octave (edges 1, 1.25, 1.5,
1.75, 2, 2.5, ... times a power of two: the top bits of the float32 itself, so that a narrow
distribution still spans several buckets); each bucket keeps the
SAMPLES tokens of smallest key, with their context. The tokens of smallest key in a set are a
uniform random sample of it, whatever order the tokens came in, and the smallest keys of a union
of buckets are found among those of its buckets: so any range made of whole buckets has an exact
uniform sample, batches and processes merge exactly, and a resumed run samples what an unbroken
one would. Exact counts per bucket turn ranges of whole buckets into quantile ranges on export.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from backend.contexts import EMPTY, BatchTokens, token_keys, unpack
from backend.contract import QUANTILE_CUTS
from backend.reservoir import Reservoir
from backend.summaries import Exporter, Range, Shape, Summary, occurrences

SAMPLES = 2  # tokens kept per bucket, and shown per range
# |activation| buckets: below 2**-12, four per octave up to 2**12, and from 2**12 on. A float32's
# bits shifted right by 21 keep its exponent and first two mantissa bits, in |value| order.
SHIFT = 21
FIRST_EDGE = (127 - 12) << 2  # the bits of 2**-12, shifted
PER_SIGN = 4 * 24 + 2
# Windows the reservoir keeps per below-median context shown (Shape.below_median): a sign with
# half of the tokens has a quarter of them below its median, about 16 times as many as shown.
RESERVOIR_PER_CONTEXT = 64
# Ranges of |activation| shown, as quantiles; each snaps to the nearest bucket edge.
QUANTILES = (*QUANTILE_CUTS, 1.0)


class QuantileSamples(Summary):
    """One row per (direction, bucket), SAMPLES slots each, smallest key first.

    - meta [rows, SAMPLES, 3] int64: each slot's key, example index and position;
    - slot [rows, SAMPLES] int64: where in the pool its context lies;
    - the pool, one entry per slot: ids [R*SAMPLES, C] int32 (the window's token ids, -1 outside
      the sequence) and floats [R*SAMPLES, 1 + C + S*C] (the activation, the window's
      activations, and its S siblings' activations there);
    - with Shape.below_median, a Reservoir (backend.reservoir) of RESERVOIR_PER_CONTEXT windows
      per context shown, from which the lowest range takes its samples where it has more.
    The slots of a row reorder, but a context never moves: one that enters takes the pool entry
    of the one it evicts, so a merge rewrites keys and pool indices, and reads and writes the
    contexts of the entering tokens only.
    """

    name = "samples"
    STATE = ("counts", "meta", "slot", "ids", "floats", "range.min", "range.max")
    EMPTY_SLOT = (EMPTY, -1, -1)  # meta of an empty slot

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        d, device = shape.num_directions, shape.device
        c, s, rows = 2 * shape.window + 1, shape.siblings.shape[1], d * 2 * PER_SIGN
        self.counts = torch.zeros(d, 2 * PER_SIGN, dtype=torch.long, device=device)
        self.meta = self._empty_meta(rows)
        self.slot = torch.arange(rows * SAMPLES, device=device).view(rows, SAMPLES)
        self.ids = torch.full((rows * SAMPLES, c), -1, dtype=torch.int32, device=device)
        self.floats = torch.zeros(rows * SAMPLES, 1 + c + s * c, device=device)
        self.range = Range(d, device)  # the extremes bound the outer ranges on export
        # More samples of the lowest range than its buckets keep, for scoring explanations.
        self.reservoir = None
        if shape.below_median:
            self.reservoir = Reservoir(shape, RESERVOIR_PER_CONTEXT * shape.below_median)
        bits = (torch.arange(PER_SIGN - 1, dtype=torch.int32) + FIRST_EDGE) << SHIFT
        self.edges = bits.view(torch.float32).to(device)  # bucket j: edges[j-1] <= |x| < edges[j]
        # A float32's top 11 bits (sign, exponent, 2 mantissa bits) give its bucket. Per
        # direction d, code d * 2048 + 1024 + (bits >> 21) names them; row_of maps a code to
        # its row: PER_SIGN * (sign bit) + its |activation| bucket, in direction d's rows.
        top = torch.arange(2048, dtype=torch.int32)
        magnitude = (top & 1023).sub_(FIRST_EDGE - 1).clamp_(0, PER_SIGN - 1)
        bucket = magnitude.add_((top < 1024).int() * PER_SIGN)  # [2048]
        first = torch.arange(0, d * 2 * PER_SIGN, 2 * PER_SIGN, dtype=torch.int32)
        self.row_of = (first[:, None] + bucket).flatten().to(device)  # [D * 2048]

    def _empty_meta(self, rows: int) -> torch.Tensor:
        empty = torch.tensor(self.EMPTY_SLOT, device=self.shape.device)
        return empty.repeat(rows, SAMPLES, 1)  # [rows, SAMPLES, 3]

    @property
    def key(self) -> torch.Tensor:
        return self.meta[..., 0]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """[D, N] int32: each activation's code (see row_of)."""
        code = x.view(torch.int32) >> SHIFT  # [-1024, 1024)
        base = torch.arange(1024, x.shape[0] * 2048, 2048, dtype=torch.int32, device=x.device)
        return code.add_(base[:, None])

    def update(self, batch: BatchTokens) -> None:
        x = batch.x
        self.range.update(batch)
        if self.reservoir is not None:
            self.reservoir.update(batch)
        # Work per code, not per row, over [D, N]: the counts and limits of the few thousand
        # codes map to rows afterwards, so no [D, N] tensor of rows is ever made.
        code = self.codes(x)  # [D, N]
        if batch.all_finite:
            per_code = occurrences(code, self.row_of.numel(), torch.long)
        else:
            weights = batch.finite.flatten().long()
            per_code = torch.zeros_like(self.row_of, dtype=torch.long)
            per_code.index_add_(0, code.flatten(), weights)
        self.counts.view(-1).index_add_(0, self.row_of, per_code)
        key = token_keys(batch.example, batch.position)  # [N]
        # Only a token whose key beats the largest kept key of its bucket can enter it: after
        # the first batches these are few, so they are gathered (a host sync). The test runs on
        # the keys' top 31 bits (int32, half the memory traffic of int64; an empty row's limit
        # is the largest int32) and is made exact on the few tokens that pass.
        limit = self.key[:, -1]  # [rows]
        high = (key >> 31).int()  # [N]
        coarse = (limit >> 31).clamp_(max=2**31 - 1).int().index_select(0, self.row_of)
        enters = high <= coarse.index_select(0, code.flatten()).view_as(code)  # [D, N]
        if not batch.all_finite:
            enters &= batch.finite
        direction, token = enters.nonzero(as_tuple=True)  # [M] each
        row, key = self.row_of[code[direction, token]].long(), key[token]
        exact = key < limit[row]
        row, key, direction, token = row[exact], key[exact], direction[exact], token[exact]
        # By row, then key: each row's candidates in order, of which the first SAMPLES count.
        order = key.argsort(stable=True)
        order = order[row[order].argsort(stable=True)]
        row, key, direction, token = row[order], key[order], direction[order], token[order]
        rank = torch.arange(len(row), device=x.device) - torch.searchsorted(row, row)
        keep = rank < SAMPLES
        row, key, direction, token, rank = (t[keep] for t in (row, key, direction, token, rank))
        rows, at = torch.unique_consecutive(row, return_inverse=True)  # rows touched: [T]
        meta = self._empty_meta(len(rows))  # [T, SAMPLES, 3]: the candidates, empty slots after
        meta[at, rank] = torch.stack([key, batch.example[token], batch.position[token]], 1)
        ref = torch.full((len(rows), SAMPLES), -1, dtype=torch.long, device=x.device)
        ref[at, rank] = torch.arange(len(row), device=x.device)  # candidate i: (direction, token)

        def contexts(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            d, n = direction[i], token[i]
            ids, acts, siblings = batch.contexts(d, n)
            return ids, torch.cat([x[d, n, None], acts, siblings.flatten(1)], 1)

        self._merge_rows(rows, meta, ref, contexts)

    def _merge_rows(self, rows: torch.Tensor, meta: torch.Tensor, ref: torch.Tensor, contexts):
        """Keep, in each of `rows` [T], the SAMPLES smallest keys of its slots and of the
        candidates `meta` [T, SAMPLES, 3]. ref [T, SAMPLES]: each candidate's reference (-1:
        none), and contexts(refs) its ids and floats in the pool's form."""
        old = self.meta.index_select(0, rows)  # [T, SAMPLES, 3]
        keys = torch.cat([old[..., 0], meta[..., 0]], 1)  # [T, 2 * SAMPLES]
        best = keys.topk(SAMPLES, dim=1, largest=False).indices  # [T, SAMPLES], smallest first
        merged = torch.cat([old, meta], 1).gather(1, best[..., None].expand(-1, -1, 3))
        self.meta.index_copy_(0, rows, merged)
        # Each entering candidate takes the pool entry of an evicted slot of its row: a row has
        # as many of one as of the other, and nonzero lists both by row.
        slot = self.slot.index_select(0, rows)  # [T, SAMPLES]
        chosen = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, best, True)
        free = slot[~chosen[:, :SAMPLES]]  # [E] pool entries of the evicted
        entering = (best >= SAMPLES).nonzero(as_tuple=True)  # [E] output places of the entering
        moved = slot.gather(1, best.clamp(max=SAMPLES - 1))
        moved[entering] = free
        self.slot.index_copy_(0, rows, moved)
        which = ref.gather(1, (best - SAMPLES).clamp(min=0))[entering]  # [E]
        real = which >= 0
        ids, floats = contexts(which[real])
        self.ids.index_copy_(0, free[real], ids.to(self.ids.dtype))
        self.floats.index_copy_(0, free[real], floats)

    def merge(self, other: QuantileSamples) -> None:
        self.counts += other.counts
        self.range.merge(other.range)
        if self.reservoir is not None:
            self.reservoir.merge(other.reservoir)
        rows = torch.arange(self.meta.shape[0], device=self.meta.device)
        ref = other.slot.where(other.key < EMPTY, -1)  # a candidate's reference: its pool entry
        contexts = lambda i: (other.ids[i], other.floats[i])  # noqa: E731
        self._merge_rows(rows, other.meta, ref, contexts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.reservoir is not None:
            state |= {f"reservoir.{k}": v for k, v in self.reservoir.state_dict().items()}
        return state

    def load(self, state: dict[str, torch.Tensor]) -> None:
        super().load(state)
        if self.reservoir is not None:
            self.reservoir.load({k: state[f"reservoir.{k}"] for k in self.reservoir.STATE})

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        lo, hi = self.range.of(d)
        ranges = self.export(d, lo, hi, self.shape.siblings[d].tolist())
        return {
            "quantile_samples": [
                {**r, "examples": [doc.example(e) for e in r["examples"]]} for r in ranges
            ]
        }

    def _kept(self) -> list[Summary]:
        return [self] if self.reservoir is None else [self, self.reservoir]

    def examples(self) -> torch.Tensor:
        return torch.cat([s.meta[..., 1].flatten() for s in self._kept()])

    def token_ids(self) -> torch.Tensor:
        return torch.cat([s.ids.flatten() for s in self._kept()])

    def windows(self) -> torch.Tensor:
        return torch.cat([s.ids.long() for s in self._kept()])

    def export(self, d: int, lo: float, hi: float, siblings: list[int]) -> list[dict]:
        """Direction d's samples by range of |activation|: one entry per range and sign.

        Each range's bounds are the bucket edges nearest to QUANTILES; its quantile_range gives
        the exact fractions of |activation| below them. lo/hi: the direction's min and max.
        """
        counts = self.counts[d].view(2, PER_SIGN)
        below = torch.cat([torch.zeros(1, dtype=torch.long), counts.sum(0).cumsum(0).cpu()])
        total = int(below[-1])
        if total == 0:
            return []
        fraction = (below.double() / total).tolist()  # of |activation| below each bucket edge
        cuts, names = [0], [QUANTILES[0]]
        for q in QUANTILES[1:-1]:
            # The edge nearest to q that leaves tokens on both sides of it in the ranges left:
            # where buckets are coarse, two quantiles share a range (the lower names it) rather
            # than leave one empty.
            inside = [
                e for e in range(cuts[-1] + 1, PER_SIGN) if fraction[cuts[-1]] < fraction[e] < 1
            ]
            if inside:
                cuts.append(min(inside, key=lambda e: abs(fraction[e] - q)))
                names.append(q)
        cuts.append(PER_SIGN)
        ranges = []
        for (first, stop), cut in zip(itertools.pairwise(cuts), names, strict=True):
            for sign in (1, -1):
                examples = self._sample(d, 0 if sign > 0 else 1, first, stop, siblings)
                if first == 0 and self.reservoir is not None:
                    top = float(self.edges[stop - 1]) if stop < PER_SIGN else math.inf
                    below = self.reservoir.sample(
                        d, sign, 0.0, top, self.shape.below_median, siblings
                    )
                    examples = below if len(below) > len(examples) else examples
                if not examples:
                    continue
                bottom = 0.0 if first == 0 else float(self.edges[first - 1])
                extreme = hi if sign > 0 else -lo
                top = min(float(self.edges[stop - 1]), extreme) if stop < PER_SIGN else extreme
                bounds = [bottom, top] if sign > 0 else [-top, -bottom]
                ranges.append(
                    {
                        "sign": sign,
                        "cut": cut,
                        "quantile_range": [float(fraction[first]), float(fraction[stop])],
                        "value_range": bounds,
                        "examples": examples,
                    }
                )
        return ranges

    def _sample(self, d: int, side: int, first: int, stop: int, siblings: list[int]):
        """The SAMPLES tokens of smallest key in buckets [first, stop) of one sign."""
        start = (d * 2 + side) * PER_SIGN
        rows = slice(start + first, start + stop)
        keys = self.key[rows].flatten()
        chosen = keys.argsort()[: min(SAMPLES, int((keys < EMPTY).sum()))]
        meta = self.meta[rows].flatten(0, 1)[chosen]  # [m, 3]
        pool = self.slot[rows].flatten()[chosen]  # [m]
        floats, c = self.floats[pool], self.ids.shape[1]
        return unpack(
            floats[:, 0],
            meta[:, 1],
            meta[:, 2],
            self.ids[pool],
            floats[:, 1 : 1 + c],
            floats[:, 1 + c :].unflatten(1, (-1, c)),
            siblings,
        )
