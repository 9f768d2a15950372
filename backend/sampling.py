"""Seeded random samples of tokens from across each direction's distribution, exact and mergeable.

Every token gets a pseudo-random key from (example index, position) alone, distinct for distinct
tokens. Per direction and sign, |activation| falls into BUCKETS buckets of an adaptive grid over
the integer bit pattern of the float32 |x| (in |x| order): bucket = (bits >> shift) - start. The
grid's shift is the least that spans the sign's occupied range, from its least |x| (or from
2**-FOLD_OCTAVES times its largest, whichever is higher) to its largest; when the range outgrows
the grid, the shift rises and adjacent buckets merge, as the histogram coarsens. The grid reaches
down from the largest |x| as far as its buckets do (everything below folds into the bottom
bucket), so that it moves only when the largest |x| rises by ALIGN buckets or the shift rises, not
with each new least |x|. It is a function of the data's extremes alone, so every split of a run
ends on the same one.
A second window, the tail, bins at least the top half-octave below the largest |x| finer
(TAIL_BUCKETS buckets of 2**TAIL_SHIFT bits); above the first grid edge inside it, the export
uses its buckets instead.

Each bucket keeps, of each distinct context window, only its token of smallest key, and the
SAMPLES windows of smallest such key, with their context. The tokens of smallest key in a set are
a uniform random sample of it, whatever order the tokens came in, and the smallest keys of a
union of buckets are found among those of its buckets (a window's best token lies in a bucket
where at most SAMPLES - 1 other windows beat it): so any range of whole buckets has an exact
sample of distinct windows, buckets merge exactly when the grid coarsens, batches and processes
merge exactly, and a resumed run samples what an unbroken one would. Exact counts per bucket turn
ranges of whole buckets into exact quantile ranges on export.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from backend.contexts import EMPTY, BatchTokens, unpack
from backend.contract import QUANTILE_CUTS
from backend.reservoir import Contexts, Reservoir
from backend.summaries import Exporter, Shape, Summary, occurrences

SAMPLES = 2  # windows kept per bucket, and shown per range
# The grid's span: PER_OCTAVE * FOLD_OCTAVES buckets. Its buckets are 2**shift bits (a power of
# two, so that buckets merge in pairs), so where a sign spans up to 20 octaves they are 2**20 bits
# (8 an octave), up to 10 octaves 2**19 (16), and so on. (At 4 an octave, the demo's signs of 17
# to 20 octaves missed the cuts 0.5 and 0.9 by a few hundredths where one bucket held 11%.)
PER_OCTAVE = 8
FOLD_OCTAVES = 20  # |x| below 2**-20 times the sign's largest folds into the bottom bucket
# The grid's start is a multiple of ALIGN buckets, so that it moves (a rebuild of every row of the
# direction) only when the largest |x| rises by ALIGN buckets, not at each new largest |x|.
ALIGN = 16
BUCKETS = PER_OCTAVE * FOLD_OCTAVES + 1 + ALIGN  # per sign: the span, and spare for its alignment
OCTAVE = 1 << 23  # a float32's bit pattern grows by 2**23 per octave
# The tail: at least the top half-octave below each sign's largest |x| again, in buckets of
# 1/64 octave (2**17 bits), where the grid is coarser: the cut 0.999 of a light tail, and the
# few largest values of a small sample, lie a percent or two apart (1/32 octave missed 0.999 on
# 6 of the demo's signs). It depends on the largest |x| alone, and slides up with it by
# TAIL_ALIGN buckets at a time.
TAIL_SHIFT = 17
TAIL_ALIGN = 8
TAIL_BUCKETS = 32 + TAIL_ALIGN
MAGNITUDE = 0x7FFFFFFF  # the bits of |x| in a float32's bits
# Windows the reservoir keeps per below-median context shown (Shape.below_median): a sign with
# half of the tokens has a quarter of them below its median, about 16 times as many as shown.
RESERVOIR_PER_CONTEXT = 64
# Ranges of |activation| shown, as quantiles of each sign; each snaps to a bucket edge near it.
QUANTILES = (*QUANTILE_CUTS, 1.0)


class QuantileSamples(Summary):
    """One row per (direction, sign, bucket), SAMPLES slots each, smallest key first.

    - shift, start [D, 2] int64: each sign's grid; low, high [D, 2] int64: the least and largest
      bits of |x| seen on each sign (low > high: none yet);
    - counts [D, 2 * BUCKETS] int64: tokens per bucket; tail [D, 2 * TAIL_BUCKETS] int64: per
      tail bucket, the first of which is (high >> TAIL_SHIFT) - TAIL_BUCKETS + 1 (`_tail_start`);
    - meta [rows, SAMPLES, 4] int64 (the grid's rows, then the tail's): each slot's key,
      example index, position and window key;
    - slot [rows, SAMPLES] int64: where in the pool its context lies;
    - the pool, one entry per slot: ids [R*SAMPLES, C] int32 (the window's token ids, -1 outside
      the sequence) and floats [R*SAMPLES, (1 + S) * C] (the window's activations, the token's
      own in the middle, then its S siblings' activations there);
    - with Shape.below_median, a Reservoir (backend.reservoir) of RESERVOIR_PER_CONTEXT windows
      per context shown, from which each sign's lowest range takes its samples where it has
      more.
    A kept context never moves in the pool while its row keeps it: one that enters takes the
    pool entry of one that leaves the same row, and a slide of the tail moves pool indices, not
    contexts. Only a regrid (a coarser grid, or a start risen with the top) copies the contexts
    of the rows it rebuilds.
    """

    name = "samples"
    STATE = ("counts", "tail", "meta", "slot", "ids", "floats", "shift", "start", "low", "high")
    EMPTY_SLOT = (EMPTY, -1, -1, 0)  # meta of an empty slot

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        d, device = shape.num_directions, shape.device
        c, s = 2 * shape.window + 1, shape.siblings.shape[1]
        rows = d * 2 * (BUCKETS + TAIL_BUCKETS)
        self.counts = torch.zeros(d, 2 * BUCKETS, dtype=torch.long, device=device)
        self.tail = torch.zeros(d, 2 * TAIL_BUCKETS, dtype=torch.long, device=device)
        self.meta = self._empty_meta(rows)
        self.slot = torch.arange(rows * SAMPLES, device=device).view(rows, SAMPLES)
        self.ids = torch.full((rows * SAMPLES, c), -1, dtype=torch.int32, device=device)
        self.floats = torch.zeros(rows * SAMPLES, (1 + s) * c, device=device)
        self.shift = torch.zeros(d, 2, dtype=torch.long, device=device)
        self.start = torch.zeros(d, 2, dtype=torch.long, device=device)
        self.low = torch.full((d, 2), MAGNITUDE, dtype=torch.long, device=device)
        self.high = torch.full((d, 2), -1, dtype=torch.long, device=device)
        # The first row of each (direction, sign) in the grid, and in the tail: [D, 2].
        self.base = torch.arange(0, d * 2 * BUCKETS, BUCKETS, device=device).view(d, 2)
        self.tail_base = d * 2 * BUCKETS + self.base // BUCKETS * TAIL_BUCKETS
        # More samples of the lowest range than its buckets keep, for scoring explanations.
        self.reservoir = None
        if shape.below_median:
            self.reservoir = Reservoir(shape, RESERVOIR_PER_CONTEXT * shape.below_median)

    def _empty_meta(self, rows: int) -> torch.Tensor:
        empty = torch.tensor(self.EMPTY_SLOT, device=self.shape.device)
        return empty.repeat(rows, SAMPLES, 1)  # [rows, SAMPLES, 4]

    @property
    def key(self) -> torch.Tensor:
        return self.meta[..., 0]

    # ------------------------------------------------------------------ the grid

    def _grid(self, low: torch.Tensor, high: torch.Tensor, shift: torch.Tensor):
        """The finest grid no finer than `shift` [D, 2] that holds bits [low, max(high)].

        Both signs of a direction share it (one shift and start per token row: a third of the
        work of one per sign), and so both columns of low, shift and start are equal. Its span,
        top - max(low, top - FOLD), only grows with the data, and its shift is the least with
        span >> shift <= BUCKETS - 1 - ALIGN: the shift reached is the same whatever order the
        data came in. Its start lies BUCKETS - ALIGN buckets below the top's, aligned down to a
        multiple of ALIGN: at or below the span's bottom bucket, and the top's bucket within
        the grid.
        """
        top = high.amax(1, keepdim=True).expand_as(high)
        bottom = torch.maximum(low, top - FOLD_OCTAVES * OCTAVE)
        span = (top - bottom).clamp(min=0)  # [D, 2]; 0 on a direction with no tokens
        powers = torch.arange(32, device=span.device)
        needed = ((span[..., None] >> powers) > BUCKETS - 1 - ALIGN).sum(-1)  # the least that fits
        new_shift = torch.maximum(shift, needed)
        seen = low <= top
        lowest = ((top >> new_shift) - (BUCKETS - ALIGN)).clamp(min=0) & -ALIGN
        new_start = torch.where(seen, lowest, self.start)
        return torch.where(seen, new_shift, shift), new_start

    def _buckets_to(self, shift: torch.Tensor, start: torch.Tensor, new_shift, new_start):
        """[D * 2 * BUCKETS]: the row that each row of grid (shift, start) falls into on the grid
        (new_shift >= shift, new_start): rows below the new grid fold into its bottom row."""
        j = torch.arange(BUCKETS, device=shift.device)
        code = (start[..., None] + j) >> (new_shift - shift)[..., None]  # [D, 2, BUCKETS]
        bucket = (code - new_start[..., None]).clamp_(0, BUCKETS - 1)
        return (bucket + self.base[..., None]).flatten()

    def _regrid(self, new_shift: torch.Tensor, new_start: torch.Tensor) -> None:
        """Move counts and samples onto the new grid (merging buckets), where it changed."""
        changed = (new_shift != self.shift) | (new_start != self.start)  # [D, 2], equal columns
        if bool(changed.any()):  # the start only rises (with the top) or the shift does
            target = self._buckets_to(self.shift, self.start, new_shift, new_start)  # others stay
            counts = torch.zeros_like(self.counts).view(-1)
            counts.index_add_(0, target, self.counts.flatten())
            self.counts = counts.view_as(self.counts)
            self._move(self.base[changed], target)
        self.shift, self.start = new_shift, new_start

    @staticmethod
    def _tail_start(high: torch.Tensor) -> torch.Tensor:
        """[D, 2]: the tail's first bucket, as (bits >> TAIL_SHIFT) of its lower edge: a multiple
        of TAIL_ALIGN at least TAIL_BUCKETS - TAIL_ALIGN buckets below the largest |x|'s."""
        return ((high >> TAIL_SHIFT) - (TAIL_BUCKETS - TAIL_ALIGN - 1)) & -TAIL_ALIGN

    def _tail_to(self, start: torch.Tensor, new_start: torch.Tensor) -> torch.Tensor:
        """[D * 2 * TAIL_BUCKETS]: the row that each tail row of tail start `start` moves to
        under `new_start` (>= start), -1 for those that fall below the tail."""
        j = torch.arange(TAIL_BUCKETS, device=start.device) + (start - new_start)[..., None]
        return torch.where(j >= 0, j + self.tail_base[..., None], -1).flatten()

    def _slide(self, start: torch.Tensor, new_start: torch.Tensor) -> None:
        """Slide the tail up from tail start `start` to `new_start`: each moved sign's block of
        TAIL_BUCKETS rows shifts down by the difference, with its counts, and the buckets that
        fall below it leave (their tokens are in the grid's buckets too), the ones that come in
        empty. Each row's slots move with their pool entries, so no context is copied and no row
        is ranked again."""
        moved = new_start != start
        firsts, by = self.tail_base[moved], (start - new_start)[moved]  # [B] each
        j = torch.arange(TAIL_BUCKETS, device=firsts.device)
        source = j - by[:, None]  # [B, TAIL_BUCKETS] the row of the block that lands on row j
        out = ((source < 0) | (source >= TAIL_BUCKETS)).flatten()  # rows shifted in
        rows = (firsts[:, None] + j).flatten()
        src = (firsts[:, None] + source % TAIL_BUCKETS).flatten()
        empty = self.meta.new_tensor(self.EMPTY_SLOT)
        self.meta.index_copy_(
            0, rows, self.meta.index_select(0, src).where(~out[:, None, None], empty)
        )
        self.slot.index_copy_(0, rows, self.slot.index_select(0, src))
        flat, offset = self.tail.view(-1), self.counts.numel()  # tail row r counts at r - offset
        flat.index_copy_(0, rows - offset, flat.index_select(0, src - offset).where(~out, 0))

    def _move(self, firsts: torch.Tensor, target: torch.Tensor) -> None:
        """Rebuild the grids whose first rows are `firsts`, each row's slots going to row
        target[row]: the grids are emptied, and their slots admitted again."""
        rows = (firsts[:, None] + torch.arange(BUCKETS, device=firsts.device)).flatten()
        slots = self.meta.index_select(0, rows).flatten(0, 1)  # [rows * SAMPLES, 4]
        ref = self.slot.index_select(0, rows).flatten()
        valid = slots[:, 0] < EMPTY
        row, slots, ref = target[rows].repeat_interleave(SAMPLES)[valid], slots[valid], ref[valid]
        self.meta.index_copy_(0, rows, self._empty_meta(len(rows)))
        self._admit(row, slots, lambda i: (self.ids[ref[i]], self.floats[ref[i]]))

    def _fit(self, low: torch.Tensor, high: torch.Tensor, shift: torch.Tensor) -> None:
        """Extend the extremes to low, high [D, 2]; refit the grid (no finer than `shift`) and
        the tail to them where they change (one host sync where neither does)."""
        tail_start = self._tail_start(self.high)
        self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        new_shift, new_start = self._grid(self.low, self.high, shift)
        new_tail = self._tail_start(self.high)
        moved = (new_shift != self.shift) | (new_start != self.start) | (new_tail != tail_start)
        if bool(moved.any()):
            self._regrid(new_shift, new_start)
            self._slide(tail_start, new_tail)

    # ------------------------------------------------------------------ updates

    def update(self, batch: BatchTokens) -> None:
        if self.reservoir is not None:
            self.reservoir.update(batch)
        x = batch.x
        bits = x.view(torch.int32)  # [D, N]
        row = bits & MAGNITUDE  # [D, N] the bits of |x|, in |x| order; then each token's row
        low, high = self._extremes(row, batch)
        if bool(((low < self.low) | (high > self.high)).any()):  # else the grid stays
            self._fit(low, high, self.shift)
        # Each token's row: its bucket, the fold's below the grid, in its sign's rows. The grid
        # holds the largest |x| (just fitted), so only the fold clamps (a clamp to both bounds
        # costs several times one to a lower bound). A non-finite token is counted with weight
        # 0 and never sampled, in its direction's first row.
        # In place: each pass over [D, N] that allocates costs twice one that does not.
        shift, start, base = (t[:, :1].int() for t in (self.shift, self.start, self.base))
        row.bitwise_right_shift_(shift).clamp_(min=start)
        row += base - start
        row.sub_(bits >> 31, alpha=BUCKETS)  # bits >> 31 is -1 on a negative
        if batch.all_finite:
            per_row = occurrences(row, self.counts.numel(), torch.long)
        else:
            row = row.where(batch.finite, base)
            per_row = torch.zeros(self.counts.numel(), dtype=torch.long, device=x.device)
            per_row.index_add_(0, row.flatten(), batch.finite.flatten().long())
        self.counts += per_row.view_as(self.counts)
        key = batch.key  # [N]
        n = key.shape[0]
        # Only a token whose key beats the largest kept key of its bucket can enter it (a token
        # of a kept window with a larger key cannot replace it either): after the first batches
        # these are few, so they are gathered (a host sync). The test runs on the keys' top 31
        # bits (int32, half the memory traffic of int64; an empty row's limit is the largest
        # int32) and is made exact on the few tokens that pass.
        # The tail's tokens are candidates too, and all of them are counted there: the grid rows
        # that reach into the tail let every token pass, so one pass over [D, N] finds both.
        tail = self._tail_start(self.high)  # [D, 2]
        edge = tail.clamp(min=0) << TAIL_SHIFT  # [D, 2] the tail's lower edge, in bits
        limit = self.key[:, -1]  # [rows]
        coarse = (limit >> 31).clamp_(max=2**31 - 1).int()
        reach = ((edge >> self.shift) - self.start).clamp_(0, BUCKETS - 1)  # [D, 2]
        j = torch.arange(BUCKETS, device=x.device)
        grid = coarse[: self.counts.numel()].view(-1, BUCKETS)  # [D * 2, BUCKETS]
        grid.masked_fill_((j >= reach[..., None]).view_as(grid), 2**31 - 1)
        enters = (key >> 31).int() <= coarse.index_select(0, row.flatten()).view_as(row)
        if not batch.all_finite:
            enters &= batch.finite
        flat = enters.flatten().nonzero().squeeze(1)  # [M] indices into [D * N]
        direction = flat // n
        token = flat - direction * n
        row = row.flatten().index_select(0, flat).long()
        # Of those, the tail's tokens, at or above their sign's tail edge, with their tail rows.
        fine = bits.flatten().index_select(0, flat)  # [M]
        sign = direction * 2 + (fine < 0)  # [M] into [D * 2]
        fine &= MAGNITUDE
        inside = (fine >= edge.view(-1).index_select(0, sign)).nonzero().squeeze(1)  # [M']
        first = (self.tail_base - tail).view(-1)  # [D * 2] the row of tail bucket 0
        in_row = first.index_select(0, sign[inside]) + (fine[inside] >> TAIL_SHIFT)
        counts = torch.ones_like(in_row)
        self.tail.view(-1).index_add_(0, in_row - self.counts.numel(), counts)
        row = torch.cat([row, in_row])
        direction = torch.cat([direction, direction[inside]])
        token = torch.cat([token, token[inside]])
        exact = (key.index_select(0, token) < limit.index_select(0, row)).nonzero().squeeze(1)
        row, direction, token = (t.index_select(0, exact) for t in (row, direction, token))
        meta = torch.stack(
            [key[token], batch.example[token], batch.position[token], batch.window_key[token]], 1
        )  # [M, 4]

        def contexts(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids, acts = batch.contexts(direction[i], token[i])  # acts [M, 1 + S, C]
            return ids, acts.flatten(1)

        self._admit(row, meta, contexts)

    @staticmethod
    def _extremes(magnitude: torch.Tensor, batch: BatchTokens):
        """The least bits of |x| per direction (both columns: the grid's), and the largest per
        sign, from the batch's extremes: ([D, 2], [D, 2]) int64, -1 for a sign without tokens.
        """
        if not batch.all_finite:  # non-finite tokens count as absent
            magnitude = magnitude.masked_fill(~batch.finite, MAGNITUDE)
        low = magnitude.amin(1).long()[:, None].expand(-1, 2)

        def bits(value: torch.Tensor) -> torch.Tensor:
            return (value.float().view(torch.int32) & MAGNITUDE).long()

        # -0.0 and +0.0 compare equal: a zero extreme counts for both signs, harmlessly.
        lo, hi = batch.lo, batch.hi
        high = torch.stack([bits(hi).where(hi >= 0, -1), bits(lo).where(lo <= 0, -1)], 1)
        return low, high

    def _admit(self, row: torch.Tensor, meta: torch.Tensor, contexts: Contexts) -> None:
        """Admit candidates, in rows `row` [M] with meta [M, 4], to the rows' slots: each row
        keeps the SAMPLES windows of smallest key among its slots and its candidates, each
        window at its token of smallest key (a slot before a candidate of the same key: a token
        fed twice stays). contexts(i) gives candidates i's ids and floats in the pool's form,
        read for the entering ones only.

        A row's candidates are first ranked on their own (`_best`); its slots are SAMPLES
        distinct windows already, so its kept windows are among theirs and those ranked: a
        sort of 2 * SAMPLES entries a row. A kept slot keeps its pool entry; an entering
        candidate takes that of a slot that leaves (as many of one as of the other).
        """
        mask = torch.zeros(self.meta.shape[0], dtype=torch.bool, device=row.device)
        rows = mask.index_fill_(0, row, True).nonzero().squeeze(1)  # [T] touched, sorted
        among = torch.empty(self.meta.shape[0], dtype=torch.long, device=row.device)
        among[rows] = torch.arange(len(rows), device=row.device)
        at = among.index_select(0, row)  # [M] each candidate's row among `rows` (no sort)
        best, rank = self._best(at, meta, len(rows))
        chosen = torch.full((len(rows), SAMPLES), -1, dtype=torch.long, device=row.device)
        chosen[at[best], rank] = best  # [T, SAMPLES] each row's ranked candidates (-1: none)
        ranked = meta.index_select(0, chosen.clamp(min=0).flatten()).view(len(rows), SAMPLES, 4)
        ranked[chosen < 0] = ranked.new_tensor(self.EMPTY_SLOT)
        entries = torch.cat([self.meta.index_select(0, rows), ranked], 1)  # [T, 2 * SAMPLES, 4]
        # By key (stable: slots first), then per row the first entry of each new window.
        order = entries[..., 0].argsort(dim=1, stable=True)  # [T, 2 * SAMPLES]
        window = entries[..., 3].gather(1, order)
        fresh = entries[..., 0].gather(1, order) < EMPTY
        picks = []
        for _ in range(SAMPLES):
            first = fresh.int().argmax(1)  # the first fresh entry (0 where none is)
            found = fresh.gather(1, first[:, None]).squeeze(1)
            picks.append(order.gather(1, first[:, None]).squeeze(1).where(found, -1))
            fresh &= window != window.gather(1, first[:, None])
        pick = torch.stack(picks, 1)  # [T, SAMPLES] entry kept in each slot, -1: empty
        new_meta = entries.gather(1, pick.clamp(min=0)[..., None].expand(-1, -1, 4))
        new_meta[pick < 0] = new_meta.new_tensor(self.EMPTY_SLOT)
        pool = self.slot.index_select(0, rows)  # [T, SAMPLES]
        kept = (pick >= 0) & (pick < SAMPLES)  # a slot that stays, with its pool entry
        new_pool = pool.gather(1, pick.clamp(0, SAMPLES - 1))
        slots = torch.arange(SAMPLES, device=pick.device)
        stays = (pick[..., None] == slots).any(1)  # [T, SAMPLES] the slots kept
        new_pool[~kept] = pool[~stays]  # row by row, as many of one as of the other
        self.meta.index_copy_(0, rows, new_meta)
        self.slot.index_copy_(0, rows, new_pool)
        entering = pick >= SAMPLES
        if bool(entering.any()):
            free = new_pool[entering]
            ids, floats = contexts(chosen.gather(1, (pick - SAMPLES).clamp(min=0))[entering])
            self.ids.index_copy_(0, free, ids.to(self.ids.dtype))
            self.floats.index_copy_(0, free, floats)

    @staticmethod
    def _best(
        where: torch.Tensor, meta: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Of entries in rows `where` [E] (numbered in [0, rows)) with meta [E, 4]: per row,
        the SAMPLES windows of smallest key, each at its token of smallest key. Returns their
        indices [K] and each one's rank in its row [K].

        Rank r is the row's entry of least key whose window is none of ranks < r: the window
        whose best token has the least key holds the row's least key, and so on. SAMPLES
        scatters of least keys, no sort (a sort of a few thousand entries costs as much as
        the whole batch's passes over [D, N]).
        """
        key, window = meta[:, 0], meta[:, 3]
        shown = window.new_zeros(rows, SAMPLES)  # each row's windows ranked so far
        found = torch.zeros(rows, SAMPLES, dtype=torch.bool, device=key.device)
        chosen, ranks = [], []
        left = key
        for r in range(SAMPLES):
            for j in range(r):  # a window ranked already is out of this rank's race
                taken = found[:, j].index_select(0, where)
                left = left.where(~taken | (window != shown[:, j].index_select(0, where)), EMPTY)
            first = QuantileSamples._first_least(where, left, rows)  # [<= rows]
            row = where.index_select(0, first)
            shown[row, r] = window.index_select(0, first)
            found[row, r] = True
            chosen.append(first)
            ranks.append(torch.full_like(first, r))
        return torch.cat(chosen), torch.cat(ranks)

    @staticmethod
    def _first_least(group: torch.Tensor, key: torch.Tensor, groups: int) -> torch.Tensor:
        """Per group in [0, groups) of entries `group` [E], the entry of least key [E] below
        EMPTY, the first by index where keys tie (a token fed twice): indices [<= groups]."""
        least = key.new_full((groups,), EMPTY).scatter_reduce_(0, group, key, "amin")
        hit = ((key == least.index_select(0, group)) & (key < EMPTY)).nonzero().squeeze(1)
        first = hit.new_full((groups,), len(key)).scatter_reduce_(0, group[hit], hit, "amin")
        return first[first < len(key)]

    def merge(self, other: QuantileSamples) -> None:
        if self.reservoir is not None:
            self.reservoir.merge(other.reservoir)
        # Both onto the grid of the union's extremes, no finer than either: the one a single
        # run over both would reach; and onto the tail of the union's largest |x|.
        self._fit(other.low, other.high, torch.maximum(self.shift, other.shift))
        target = other._buckets_to(other.shift, other.start, self.shift, self.start)
        self.counts.view(-1).index_add_(0, target, other.counts.flatten())
        tail_target = other._tail_to(other._tail_start(other.high), self._tail_start(self.high))
        into = (tail_target - self.counts.numel()).clamp(min=0)
        self.tail.view(-1).index_add_(0, into, other.tail.flatten() * (tail_target >= 0))
        slots = other.meta.flatten(0, 1)  # [R * SAMPLES, 4]
        row = torch.cat([target, tail_target]).repeat_interleave(SAMPLES)
        valid = (slots[:, 0] < EMPTY) & (row >= 0)
        ref = other.slot.flatten()[valid]
        self._admit(row[valid], slots[valid], lambda i: (other.ids[ref[i]], other.floats[ref[i]]))

    # ------------------------------------------------------------------ export

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        ranges = self.export(d, self.shape.siblings[d].tolist())
        return {
            "quantile_samples": [
                {**r, "examples": [doc.example(e) for e in r["examples"]]} for r in ranges
            ]
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.reservoir is not None:
            state |= {f"reservoir.{k}": v for k, v in self.reservoir.state_dict().items()}
        return state

    def load(self, state: dict[str, torch.Tensor]) -> None:
        super().load(state)
        if self.reservoir is not None:
            self.reservoir.load({k: state[f"reservoir.{k}"] for k in self.reservoir.STATE})

    def _kept(self) -> list[Summary]:
        return [self] if self.reservoir is None else [self, self.reservoir]

    def examples(self) -> torch.Tensor:
        return torch.cat([s.meta[..., 1].flatten() for s in self._kept()])

    def token_ids(self) -> torch.Tensor:
        return torch.cat([s.ids.flatten() for s in self._kept()])

    def windows(self) -> torch.Tensor:
        return torch.cat([s.ids.long() for s in self._kept()])

    def export(self, d: int, siblings: list[int]) -> list[dict]:
        """Direction d's samples by range of |activation|: per sign (positive first), ranges of
        whole buckets whose edges lie near QUANTILES of that sign's |activation|, each with the
        exact fractions of the sign's tokens below its bounds."""
        ranges = []
        for side, sign in ((0, 1.0), (1, -1.0)):
            rows, counts, edges = self._buckets(d, side)
            total = int(counts.sum())
            if total == 0:
                continue
            below = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            fraction = (below.double() / total).tolist()  # of the sign's tokens below each edge
            for (first, stop), cut in self._cuts(fraction):
                bounds = [edges[first], edges[stop]]
                examples = self._sample(rows[first:stop], siblings)
                if first == 0 and self.reservoir is not None:
                    top = edges[stop] if stop < len(rows) else math.inf  # the last: inclusive
                    below = self.reservoir.sample(
                        d, int(sign), 0.0, top, self.shape.below_median, siblings
                    )
                    examples = below if len(below) > len(examples) else examples
                ranges.append(
                    {
                        "sign": int(sign),
                        "cut": cut,
                        "quantile_range": [fraction[first], fraction[stop]],
                        "value_range": bounds if sign > 0 else [-bounds[1], -bounds[0]],
                        "examples": examples,
                    }
                )
        return ranges

    def _buckets(self, d: int, side: int) -> tuple[list[int], torch.Tensor, list[float]]:
        """One sign's buckets as the export sees them: the grid's, and above the first of its
        edges in the tail, the tail's where they are finer. Returns each one's row, its count
        and the bounds of |x| [n + 1]: 0, the edges, the sign's largest."""
        shift, start, top = (int(t[d, side]) for t in (self.shift, self.start, self.high))
        first = int(self.base[d, side])
        bits = [0, *((start + j) << shift for j in range(1, BUCKETS))]  # lower edges
        rows, counts = list(range(first, first + BUCKETS)), self.counts[d, side * BUCKETS :]
        counts = counts[:BUCKETS].cpu()
        tail = int(self._tail_start(self.high)[d, side])
        into = [j for j in range(1, BUCKETS) if tail << TAIL_SHIFT <= bits[j] <= top]
        if shift > TAIL_SHIFT and into:  # every grid edge is a tail edge: they join exactly
            e = into[0]
            f = (bits[e] >> TAIL_SHIFT) - tail
            tail_rows = int(self.tail_base[d, side]) + torch.arange(f, TAIL_BUCKETS)
            fine = self.tail[d, side * TAIL_BUCKETS : (side + 1) * TAIL_BUCKETS].cpu()
            bits = bits[:e] + [(tail + j) << TAIL_SHIFT for j in range(f, TAIL_BUCKETS)]
            rows = rows[:e] + tail_rows.tolist()
            counts = torch.cat([counts[:e], fine[f:]])
        edges = torch.tensor([*bits, top], dtype=torch.long).clamp(max=top).int()
        return rows, counts, edges.view(torch.float32).tolist()

    @staticmethod
    def _cuts(fraction: list[float]) -> list[tuple[tuple[int, int], float]]:
        """Ranges of whole buckets, [first, stop) each, from edges near the QUANTILES, each with
        the cut its lower edge stands for: for each cut q, the edge whose fraction of tokens
        above it is nearest in ratio to 1 - q, among those that leave tokens on both sides in
        the ranges left; where buckets are coarse, two quantiles share a range (the lower cut
        names it) rather than leave one empty."""
        buckets = len(fraction) - 1
        cuts, names = [0], [QUANTILES[0]]
        for q in QUANTILES[1:-1]:
            inside = [
                e for e in range(cuts[-1] + 1, buckets) if fraction[cuts[-1]] < fraction[e] < 1
            ]
            if inside:
                cuts.append(min(inside, key=lambda e: abs(math.log((1 - fraction[e]) / (1 - q)))))
                names.append(q)
        return list(zip(itertools.pairwise([*cuts, buckets]), names, strict=True))

    def _sample(self, rows: list[int], siblings: list[int]):
        """The SAMPLES distinct windows of smallest key in buckets `rows`, each at its token of
        smallest key."""
        index = torch.tensor(rows, dtype=torch.long)
        meta = self.meta[index].flatten(0, 1).cpu()  # [m, 4]
        pool = self.slot[index].flatten().cpu()
        chosen, windows = [], set()
        for i in meta[:, 0].argsort().tolist():
            key, _, _, window = meta[i].tolist()
            if key == EMPTY or len(chosen) == SAMPLES:
                break
            if window not in windows:
                chosen.append(i)
                windows.add(window)
        chosen_t = torch.tensor(chosen, dtype=torch.long)
        meta, pool = meta[chosen_t], pool[chosen_t]
        acts = self.floats[pool].unflatten(1, (-1, self.ids.shape[1]))  # [m, 1 + S, C]
        return unpack(
            acts[:, 0, self.shape.window],
            meta[:, 1],
            meta[:, 2],
            self.ids[pool],
            acts[:, 0],
            acts[:, 1:],
            siblings,
        )
