"""A batch's tokens as the summaries read them, and the context windows they keep of a token.

`BatchTokens` is the one view of a batch that every summary reads: its activations over the real
tokens, direction-major [D, N] and token-major [N, D], with the masked variants the summaries
need. Each is computed on first use and then shared, so a batch costs each copy once whatever the
number of summaries. A batch without NaN or infinity (the usual case, found from the per-direction
min and max the moments need anyway) skips every mask: its masked variants are the activations.

A kept token carries its window of +-W tokens (clipped to its sequence), its direction's
activations there, and the activations there of its siblings: the other adapted modules of the
same layer with the same component (gate_proj's siblings are up_proj and down_proj), so that a
reader can compare a layer's directions on the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

# Odd 64-bit multipliers (int64 arithmetic wraps around) for the window keys below.
_KEY_MIX = (0x9E3779B97F4A7C15 - 2**64, 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)


def window_keys(input_ids: torch.Tensor, lengths: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L] int64: a key of each token's context window, for input_ids [B, L] (right padding,
    lengths [B] real tokens per row); padding positions get keys too, to be ignored.

    The window of position p is the ids at p-W .. p+W clipped to the sequence, with p's place in
    it: two tokens have the same key exactly when those agree (up to a 64-bit hash collision,
    about one in 2**64 per pair), wherever they stand in the data. Positions outside the sequence
    count as id -1, so a clipped window differs from an unclipped one.
    """
    return _mixed(padded_ids(input_ids, lengths, window), window, input_ids.shape[1])


def padded_ids(input_ids: torch.Tensor, lengths: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L + 2W]: each row's ids with W ids of -1 before and after it, -1 on its padding: the
    window of (row b, position p) is row b's ids at p .. p + 2W."""
    inside = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths[:, None]
    ids = input_ids.masked_fill(~inside, -1)
    return torch.nn.functional.pad(ids, (window, window), value=-1)


def context_keys(context_ids: torch.Tensor) -> torch.Tensor:
    """[M] int64: the window keys (`window_keys`) of kept windows context_ids [M, 2W+1] (-1
    outside the sequence, the token in the middle), the key its token had in the data."""
    return _mixed(context_ids, (context_ids.shape[1] - 1) // 2, 1)[:, 0]


def kept_window_keys(windows: torch.Tensor) -> torch.Tensor:
    """[K] sorted: the distinct window keys of kept windows [M, 2W+1] (rows of -1, empty
    slots, left out)."""
    return torch.unique(context_keys(windows[(windows >= 0).any(1)]))


def count_keys(keys: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """[K]: how many of the window keys `found` [N] equal each of the sorted `keys` [K > 0]."""
    at = torch.searchsorted(keys, found).clamp_(max=len(keys) - 1)
    return torch.bincount(at[keys[at] == found], minlength=len(keys))


def _mixed(padded: torch.Tensor, window: int, length: int) -> torch.Tensor:
    """[B, L]: the key of each run of 2W+1 ids of padded [B, L + 2W] (-1: outside)."""
    padded = padded + 2  # >= 1: an id, 1 outside the sequence
    key = torch.zeros(padded.shape[0], length, dtype=torch.long, device=padded.device)
    for j in range(2 * window + 1):  # key = mix(key * M1 + id) per window slot, C small
        key = (key * _KEY_MIX[0] + padded[:, j : j + length]) ^ (key >> 29 & ((1 << 35) - 1))
    key = key * _KEY_MIX[1]
    key = key ^ (key >> 31 & ((1 << 33) - 1))
    return key * _KEY_MIX[2]


EMPTY = 2**62  # the key of an empty slot: every token's key (token_keys) is below it
KEY_BITS = EMPTY - 1


def token_keys(example: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """A pseudo-random key in [0, 2**62) per token, from its example index and position only.

    A bijection of (example, position) for positions below 2**24 and examples below 2**38
    (multiplications by odd numbers and xor-shifts, modulo 2**62): distinct tokens never tie.
    """
    h = (example << 24) | position
    for multiplier, shift in ((0x9E3779B97F4A7C1, 31), (0x3C6EF372FE94F82B, 29)):
        h = (h * multiplier) & KEY_BITS  # int64 wraps around; modulo 2**62 stays exact
        h = h ^ (h >> shift)  # h >= 0: a logical shift
    return h


@dataclass
class BatchTokens:
    acts: torch.Tensor  # [D, B*L] float32, row-major over (sequence, position)
    real: torch.Tensor  # [N] flat positions of the real (non-padding) tokens, N > 0
    input_ids: torch.Tensor  # [B, L]
    lengths: torch.Tensor  # [B] real tokens per row (right padding)
    example_index: torch.Tensor  # [B]
    window: int
    siblings: torch.Tensor  # [D, S] direction indices, -1 where a direction has fewer
    row: torch.Tensor = field(init=False)  # [N] batch row of each real token
    position: torch.Tensor = field(init=False)  # [N] its position in its sequence
    ids: torch.Tensor = field(init=False)  # [N] its token id
    example: torch.Tensor = field(init=False)  # [N] its example index

    def __post_init__(self) -> None:
        length = self.input_ids.shape[1]
        self.row, self.position = self.real // length, self.real % length
        self.ids = self.input_ids.flatten()[self.real]
        self.example = self.example_index[self.row]

    @cached_property
    def _padded_ids(self) -> torch.Tensor:
        """[B, L + 2W] (`padded_ids`)."""
        return padded_ids(self.input_ids, self.lengths, self.window)

    @cached_property
    def key(self) -> torch.Tensor:
        """[N] int64: each real token's sampling key (`token_keys`)."""
        return token_keys(self.example, self.position)

    @cached_property
    def window_key(self) -> torch.Tensor:
        """[N] int64: the key of each real token's context window (`window_keys`)."""
        keys = _mixed(self._padded_ids, self.window, self.input_ids.shape[1])
        return keys.flatten().index_select(0, self.real)

    @cached_property
    def x(self) -> torch.Tensor:
        """[D, N] float32: the activations at the real tokens."""
        return self.acts.index_select(1, self.real)

    @cached_property
    def _extremes(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        # NaN propagates through amin and amax, and an infinity is an extreme: the extremes
        # are all finite exactly when every activation is.
        lo, hi = self.x.amin(1), self.x.amax(1)
        all_finite = bool(torch.isfinite(lo).all() & torch.isfinite(hi).all())
        if not all_finite:
            lo = self.x.masked_fill(~self.finite, math.inf).amin(1)
            hi = self.x.masked_fill(~self.finite, -math.inf).amax(1)
        return lo.double(), hi.double(), all_finite

    @property
    def all_finite(self) -> bool:
        """No NaN or infinity in the batch (one host synchronisation, shared)."""
        return self._extremes[2]

    @property
    def lo(self) -> torch.Tensor:
        """[D] float64: the least finite activation of each direction (+inf: none)."""
        return self._extremes[0]

    @property
    def hi(self) -> torch.Tensor:
        """[D] float64: the largest finite activation (-inf: none)."""
        return self._extremes[1]

    @cached_property
    def finite(self) -> torch.Tensor:
        """[D, N] bool."""
        return torch.isfinite(self.x)

    @cached_property
    def count(self) -> torch.Tensor:
        """[D] int64: finite activations per direction."""
        if self.all_finite:
            return torch.full_like(self.lo, self.x.shape[1], dtype=torch.long)
        return self.finite.sum(1)

    def _masked(self, fill: float) -> torch.Tensor:
        return self.x if self.all_finite else self.x.masked_fill(~self.finite, fill)

    @cached_property
    def zeroed(self) -> torch.Tensor:
        """[D, N] float32, 0 where not finite: for sums."""
        return self._masked(0.0)

    @cached_property
    def high(self) -> torch.Tensor:
        """[D, N] float32, -inf where not finite: for maxima."""
        return self._masked(-math.inf)

    @cached_property
    def low(self) -> torch.Tensor:
        """[D, N] float32, +inf where not finite: for minima."""
        return self._masked(math.inf)

    @cached_property
    def rows(self) -> torch.Tensor:
        """[N, D] float32, token-major: the profiles add a row of D values per token."""
        if self.all_finite:  # float64 to float32 is exact here, and cheaper than a transpose
            return self.rows_zeroed.float()
        return self._transposed(self.x, self.x.dtype)

    @cached_property
    def rows_finite(self) -> torch.Tensor:
        """[N, D] bool."""
        return self.finite.T.contiguous()

    @cached_property
    def rows_zeroed(self) -> torch.Tensor:
        """[N, D] float64 (sums of many tokens), 0 where not finite."""
        return self._transposed(self.zeroed, torch.float64)

    @staticmethod
    def _transposed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x.T as a contiguous tensor of `dtype`: on a CPU, copying [144, 5200] float32 into
        float64 this way took 0.7 ms, x.T.contiguous() 2 to 3.6 ms."""
        return torch.empty(x.shape[::-1], dtype=dtype, device=x.device).copy_(x.T)

    def contexts(
        self, direction: torch.Tensor, n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`windows` of real tokens n [M] for `direction` [M] and its S siblings: ids [M, C] and
        activations [M, 1 + S, C], the direction's first (a sibling of -1 reads direction 0's,
        dropped on export)."""
        rows = torch.cat([direction[:, None], self.siblings[direction].clamp(min=0)], 1)
        return self.windows(rows, n)

    def windows(self, rows: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of real tokens n [M]: their ids [M, C] (-1 outside the sequence) and the
        activations there of directions rows [M, R]: [M, R, C], C = 2W+1; zeros outside the
        sequence, so that a kept window does not depend on how the rows were batched."""
        start = self.row[n] * self._padded_ids.shape[1] + self.position[n]
        ids = self._id_windows.index_select(0, start)  # [M, C]
        flat, c = self.acts.reshape(-1), ids.shape[1]
        if flat.numel() < c:  # a batch smaller than one window
            flat = torch.nn.functional.pad(flat, (0, c - flat.numel()))
        last = flat.numel() - c  # the last whole window's first place in flat
        # Each window's first place in flat, the token's less W: whole windows of C contiguous
        # values gathered at once, several times faster than their C * M * R values one by one.
        at = (rows * self.acts.shape[1] + (self.real[n] - self.window)[:, None]).flatten()
        windows = flat.as_strided((last + 1, c), (1, 1))
        acts = windows.index_select(0, at.clamp(0, last))  # [M * R, C]
        # A window that reaches past either end of flat (the first or last W places) has no
        # whole window there: value by value, clipped (outside the sequence, zeroed below).
        ends = ((at < 0) | (at > last)).nonzero().squeeze(1)
        if len(ends):
            places = at[ends, None] + torch.arange(c, device=at.device)
            acts[ends] = flat[places.clamp_(0, flat.numel() - 1)]
        acts = acts.view(*rows.shape, c)
        clipped = (ids[:, 0] < 0) | (ids[:, -1] < 0)  # the windows that reach outside
        edge = clipped.nonzero().squeeze(1)
        acts[edge] = acts[edge].masked_fill_((ids[edge] < 0)[:, None, :], 0.0)
        return ids, acts

    @cached_property
    def _id_windows(self) -> torch.Tensor:
        """[B * (L + 2W) - 2W, C]: a view of each window of `_padded_ids`, by start."""
        flat, c = self._padded_ids.flatten(), 2 * self.window + 1
        return flat.as_strided((flat.numel() - c + 1, c), (1, 1))


@dataclass
class Example:
    """One kept token: what the contract calls an Example, with ids instead of strings."""

    activation: float
    example_index: int
    token_index: int
    context_ids: list[int]  # token ids of the clipped window
    context_acts: list[float]  # this direction's activation at each of them
    target: int  # position of the token itself inside the window
    siblings: dict[int, list[float]]  # sibling direction -> its activations on the window


def unpack(
    values: torch.Tensor,  # [m] activations (any sign)
    example: torch.Tensor,  # [m]
    position: torch.Tensor,  # [m]
    context_ids: torch.Tensor,  # [m, C]
    context_acts: torch.Tensor,  # [m, C]
    sibling_acts: torch.Tensor,  # [m, S, C]
    siblings: list[int],  # [S] sibling direction indices, -1 for none
) -> list[Example]:
    """Kept tokens as Examples, their windows clipped to the sequence."""
    window = (context_ids.shape[1] - 1) // 2
    examples = []
    for i in range(values.shape[0]):
        inside = context_ids[i] >= 0
        examples.append(
            Example(
                activation=float(values[i]),
                example_index=int(example[i]),
                token_index=int(position[i]),
                context_ids=context_ids[i][inside].tolist(),
                context_acts=context_acts[i][inside].tolist(),
                target=window - int((~inside[:window]).sum()),
                siblings={
                    s: sibling_acts[i, j][inside].tolist() for j, s in enumerate(siblings) if s >= 0
                },
            )
        )
    return examples
