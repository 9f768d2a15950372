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
from typing import Any

import torch

from backend.contexts import BatchTokens, unpack
from backend.summaries import Exporter, Range, Shape, Summary, load_tensors, occurrences, tensors_of

SAMPLES = 2  # tokens kept per bucket, and shown per range
# |activation| buckets: below 2**-12, four per octave up to 2**12, and from 2**12 on. A float32's
# bits shifted right by 21 keep its exponent and first two mantissa bits, in |value| order.
SHIFT = 21
FIRST_EDGE = (127 - 12) << 2  # the bits of 2**-12, shifted
PER_SIGN = 4 * 24 + 2
EMPTY = 2**62  # key of an empty slot: every real key is below it
# Ranges of |activation| shown, as quantiles; each snaps to the nearest bucket edge.
QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)


def token_keys(example: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """A pseudo-random key in [0, 2**62) per token, from its example index and position only."""
    h = (example << 24) ^ position  # int64; the multiplications below wrap around
    for multiplier, shift in ((0x9E3779B97F4A7C1, 31), (0x3C6EF372FE94F82B, 29)):
        h = h * multiplier
        h = h ^ ((h >> shift) & ((1 << (64 - shift)) - 1))  # a logical shift right
    return h & (EMPTY - 1)


class QuantileSamples(Summary):
    """One row per (direction, bucket), SAMPLES slots each, smallest key first. A slot's fields
    are packed by type into three tables (a merge then moves three tensors, not seven):
    - meta [rows, SAMPLES, 3] int64: key, example index, position;
    - ids [rows, SAMPLES, C] int32: the context window's token ids (-1 outside the sequence);
    - floats [rows, SAMPLES, 1 + C + S*C]: the activation, the window's activations, and its
      S siblings' activations there.
    """

    name = "samples"
    TABLES = ("meta", "ids", "floats")
    EMPTY_SLOT = (EMPTY, -1, -1)  # meta of an empty slot

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        d, device = shape.num_directions, shape.device
        slots = d * 2 * PER_SIGN
        self.counts = torch.zeros(d, 2 * PER_SIGN, dtype=torch.long, device=device)
        for name in self.TABLES:
            setattr(self, name, self._blank(name, slots))
        self.range = Range(d, device)  # the extremes bound the outer ranges on export
        bits = (torch.arange(PER_SIGN - 1, dtype=torch.int32) + FIRST_EDGE) << SHIFT
        self.edges = bits.view(torch.float32).to(device)  # bucket j: edges[j-1] <= |x| < edges[j]
        # The bucket of a float32 by its top 11 bits (plus 1024): PER_SIGN * (sign bit) + its
        # |activation| bucket. A lookup costs less than the shifts and masks it replaces.
        top = torch.arange(2048, dtype=torch.int32)
        magnitude = (top & 1023).sub_(FIRST_EDGE - 1).clamp_(0, PER_SIGN - 1)
        self.bucket_of = magnitude.add_((top < 1024).int() * PER_SIGN).to(device)

    def _blank(self, name: str, rows: int) -> torch.Tensor:
        """Table `name` of `rows` rows of empty slots."""
        c, s, device = 2 * self.shape.window + 1, self.shape.siblings.shape[1], self.shape.device
        if name == "meta":
            return torch.tensor(self.EMPTY_SLOT, device=device).repeat(rows, SAMPLES, 1)
        if name == "ids":
            return torch.full((rows, SAMPLES, c), -1, dtype=torch.int32, device=device)
        return torch.zeros(rows, SAMPLES, 1 + c + s * c, device=device)

    @property
    def key(self) -> torch.Tensor:
        return self.meta[..., 0]

    @property
    def example(self) -> torch.Tensor:
        return self.meta[..., 1]

    @property
    def position(self) -> torch.Tensor:
        return self.meta[..., 2]

    @property
    def value(self) -> torch.Tensor:
        return self.floats[..., 0]

    @property
    def acts(self) -> torch.Tensor:
        return self.floats[..., 1 : 1 + self.ids.shape[2]]

    @property
    def siblings(self) -> torch.Tensor:
        c = self.ids.shape[2]
        return self.floats[..., 1 + c :].unflatten(2, (-1, c))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Row of each activation [D, N] (int32): its direction's, at its bucket."""
        top = x.view(torch.int32) >> SHIFT  # sign, exponent, 2 mantissa bits: [-1024, 1024)
        top += 1024
        first = torch.arange(0, x.shape[0] * 2 * PER_SIGN, 2 * PER_SIGN, device=x.device)
        return self.bucket_of.index_select(0, top.flatten()).view_as(top).add_(first.int()[:, None])

    def update(self, batch: BatchTokens) -> None:
        x = batch.x
        self.range.update(batch)
        row = self.rows(x)  # [D, N]
        if batch.all_finite:
            self.counts += occurrences(row, self.counts.numel(), torch.long).view_as(self.counts)
        else:
            self.counts.view(-1).index_add_(0, row.flatten(), batch.finite.flatten().long())
        key = token_keys(batch.example, batch.position)  # [N]
        # Only a token whose key beats the largest kept key of its bucket can enter it: after
        # the first batches these are few, so they are gathered (a host sync). The test runs on
        # the keys' top 31 bits (int32, half the memory traffic of int64; an empty row's limit
        # is the largest int32) and is made exact on the few tokens that pass.
        limit = self.key[:, -1]  # [rows]
        high = (key >> 31).int()  # [N]
        coarse = (limit >> 31).clamp_(max=2**31 - 1).int()  # [rows]
        enters = high <= coarse.index_select(0, row.flatten()).view_as(row)  # [D, N]
        if not batch.all_finite:
            enters &= batch.finite
        direction, token = enters.nonzero(as_tuple=True)  # [M] each
        row, key = row[direction, token].long(), key[token]
        exact = key < limit[row]
        row, key, direction, token = row[exact], key[exact], direction[exact], token[exact]
        # By row, then key: each row's candidates in order, of which the first SAMPLES count.
        order = key.argsort(stable=True)
        order = order[row[order].argsort(stable=True)]
        row, key, direction, token = row[order], key[order], direction[order], token[order]
        rank = torch.arange(len(row), device=x.device) - torch.searchsorted(row, row)
        keep = rank < SAMPLES
        row, key, direction, token, rank = (t[keep] for t in (row, key, direction, token, rank))
        rows, slot = torch.unique_consecutive(row, return_inverse=True)  # rows touched: [T]
        ids, acts, siblings = batch.contexts(direction, token)
        found = {
            "meta": torch.stack([key, batch.example[token], batch.position[token]], 1),
            "ids": ids,
            "floats": torch.cat([x[direction, token, None], acts, siblings.flatten(1)], 1),
        }
        candidates = {}  # [T, SAMPLES, ...]: each touched row's candidates, empty slots after
        for name, value in found.items():
            candidates[name] = self._blank(name, len(rows))
            candidates[name][slot, rank] = value.to(candidates[name].dtype)
        self._merge_rows(rows, candidates)

    def _merge_rows(self, rows: torch.Tensor, candidates: dict[str, torch.Tensor]) -> None:
        """Keep, in each of `rows`, the SAMPLES smallest keys of its slots and the candidates'."""
        keys = torch.cat([self.key.index_select(0, rows), candidates["meta"][..., 0]], 1)
        best = keys.topk(SAMPLES, dim=1, largest=False).indices  # [T, SAMPLES], smallest first
        at = best[..., None]
        for name in self.TABLES:
            table = getattr(self, name)
            both = torch.cat([table.index_select(0, rows), candidates[name]], 1)
            table.index_copy_(0, rows, both.gather(1, at.expand(-1, -1, table.shape[2])))

    def merge(self, other: QuantileSamples) -> None:
        self.counts += other.counts
        self.range.merge(other.range)
        rows = torch.arange(self.meta.shape[0], device=self.meta.device)
        self._merge_rows(rows, {name: getattr(other, name) for name in self.TABLES})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**tensors_of(self, ("counts", *self.TABLES)), **self.range.state_dict()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_tensors(self, state, ("counts", *self.TABLES), self.shape.device)
        self.range.load(state, self.shape.device)

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        lo, hi = self.range.of(d)
        ranges = self.export(d, lo, hi, self.shape.siblings[d].tolist())
        return {
            "quantile_samples": [
                {**r, "examples": [doc.example(e) for e in r["examples"]]} for r in ranges
            ]
        }

    def examples(self) -> torch.Tensor:
        return self.example.flatten()

    def token_ids(self) -> torch.Tensor:
        return self.ids.flatten()

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
        cuts = [0]
        for q in QUANTILES[1:-1]:
            # The edge nearest to q that leaves tokens on both sides of it in the ranges left:
            # where buckets are coarse, two quantiles share a range rather than leave one empty.
            inside = [
                e for e in range(cuts[-1] + 1, PER_SIGN) if fraction[cuts[-1]] < fraction[e] < 1
            ]
            if inside:
                cuts.append(min(inside, key=lambda e: abs(fraction[e] - q)))
        cuts.append(PER_SIGN)
        ranges = []
        for first, stop in itertools.pairwise(cuts):
            for sign in (1, -1):
                examples = self._sample(d, 0 if sign > 0 else 1, first, stop, siblings)
                if not examples:
                    continue
                bottom = 0.0 if first == 0 else float(self.edges[first - 1])
                extreme = hi if sign > 0 else -lo
                top = min(float(self.edges[stop - 1]), extreme) if stop < PER_SIGN else extreme
                bounds = [bottom, top] if sign > 0 else [-top, -bottom]
                ranges.append(
                    {
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
        c = self.ids.shape[2]

        def pick(name: str, *shape: int) -> torch.Tensor:
            return getattr(self, name)[rows].reshape(-1, *shape)[chosen]

        return unpack(
            pick("value"),
            pick("example"),
            pick("position"),
            pick("ids", c),
            pick("acts", c),
            pick("siblings", self.siblings.shape[2], c),
            siblings,
        )
