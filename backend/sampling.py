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

import torch

from backend.contexts import BatchTokens, unpack

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


class QuantileSamples:
    FIELDS = ("key", "value", "example", "position", "ids", "acts", "siblings")

    def __init__(self, num_directions: int, context: int, siblings: int, device: torch.device):
        d, c, s, slots = num_directions, context, siblings, num_directions * 2 * PER_SIGN
        self.num_directions = d
        self.counts = torch.zeros(d, 2 * PER_SIGN, dtype=torch.long, device=device)
        # One row per (direction, bucket), SAMPLES slots each, smallest key first.
        self.key = torch.full((slots, SAMPLES), EMPTY, dtype=torch.long, device=device)
        self.value = torch.zeros(slots, SAMPLES, device=device)
        self.example = torch.full((slots, SAMPLES), -1, dtype=torch.long, device=device)
        self.position = torch.full((slots, SAMPLES), -1, dtype=torch.long, device=device)
        self.ids = torch.full((slots, SAMPLES, c), -1, dtype=torch.int32, device=device)
        self.acts = torch.zeros(slots, SAMPLES, c, device=device)
        self.siblings = torch.zeros(slots, SAMPLES, s, c, device=device)
        bits = (torch.arange(PER_SIGN - 1, dtype=torch.int32) + FIRST_EDGE) << SHIFT
        self.edges = bits.view(torch.float32).to(device)  # bucket j: edges[j-1] <= |x| < edges[j]

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket of each activation [D, N]: PER_SIGN * (sign bit) + its |activation| bucket."""
        bits = x.view(torch.int32)
        magnitude = ((bits & 0x7FFFFFFF) >> SHIFT).sub_(FIRST_EDGE - 1).clamp_(0, PER_SIGN - 1)
        return magnitude.add_((bits < 0).int() * PER_SIGN).long()

    def update(self, x: torch.Tensor, finite: torch.Tensor, batch: BatchTokens) -> None:
        d = x.shape[0]
        bucket = self.buckets(x)  # [D, N]
        self.counts.scatter_add_(1, bucket, finite.long())
        key = token_keys(batch.example, batch.position)  # [N]
        # Only a token whose key beats the largest kept key of its bucket can enter it: after
        # the first batches these are few, so they are gathered (the one host sync per batch).
        row = bucket + torch.arange(d, device=x.device)[:, None] * (2 * PER_SIGN)  # [D, N]
        enters = finite & (key < self.key[:, -1][row])
        direction, token = enters.nonzero(as_tuple=True)  # [M] each
        row, key = row[direction, token], key[token]
        # By row, then key: each row's candidates in order, of which the first SAMPLES count.
        order = key.argsort(stable=True)
        order = order[row[order].argsort(stable=True)]
        row, key, direction, token = row[order], key[order], direction[order], token[order]
        rank = torch.arange(len(row), device=x.device) - torch.searchsorted(row, row)
        keep = rank < SAMPLES
        row, key, direction, token, rank = (t[keep] for t in (row, key, direction, token, rank))
        rows, slot = torch.unique_consecutive(row, return_inverse=True)  # rows touched: [T]
        ids, acts, siblings = batch.contexts(direction, token)
        candidates = self._empty(len(rows), ids.shape[1], siblings.shape[1], x.device)
        fields = (key, x[direction, token], batch.example[token], batch.position[token])
        for name, value in zip(self.FIELDS, (*fields, ids, acts, siblings), strict=True):
            candidates[name][slot, rank] = value.to(candidates[name].dtype)
        self._merge_rows(rows, candidates)

    def _empty(self, rows: int, c: int, s: int, device: torch.device) -> dict[str, torch.Tensor]:
        shapes = {"ids": (c,), "acts": (c,), "siblings": (s, c)}
        return {
            name: torch.full(
                (rows, SAMPLES, *shapes.get(name, ())),
                {"key": EMPTY, "example": -1, "position": -1, "ids": -1}.get(name, 0),
                dtype=getattr(self, name).dtype,
                device=device,
            )
            for name in self.FIELDS
        }

    def _merge_rows(self, rows: torch.Tensor, candidates: dict[str, torch.Tensor]) -> None:
        """Keep, in each of `rows`, the SAMPLES smallest keys of its slots and the candidates'."""
        keys = torch.cat([self.key[rows], candidates["key"]], 1)  # [T, 2 * SAMPLES]
        best = keys.topk(SAMPLES, dim=1, largest=False).indices  # sorted, smallest first
        for name in self.FIELDS:
            both = torch.cat([getattr(self, name)[rows], candidates[name]], 1)
            at = best.view(*best.shape, *[1] * (both.dim() - 2)).expand(-1, -1, *both.shape[2:])
            getattr(self, name)[rows] = both.gather(1, at)

    def merge(self, other: QuantileSamples) -> None:
        self.counts += other.counts
        rows = torch.arange(self.key.shape[0], device=self.key.device)
        self._merge_rows(rows, {name: getattr(other, name) for name in self.FIELDS})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).cpu() for name in ("counts", *self.FIELDS)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device):
        _, _, s, c = state["siblings"].shape
        samples = cls(state["counts"].shape[0], c, s, device)
        for name in ("counts", *cls.FIELDS):
            setattr(samples, name, state[name].to(device))
        return samples

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
