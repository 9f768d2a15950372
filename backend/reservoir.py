"""A seeded reservoir of context windows shared by every direction: the K distinct windows of
smallest key over the whole run, each with every direction's activations on it.

A token's key (backend.contexts.token_keys) depends on its example index and position alone,
not on any direction. So the K distinct context windows of smallest key (a window's key: that of
its token of smallest key, the one it is kept at) are one set for all directions, kept once. For
any direction, sign and range of |activation|, the kept windows whose token falls in the range,
in key order, are exactly the range's windows of smallest key, all of those whose key is at most
the reservoir's `limit`: an exact, seeded sample of the range, about K times the range's share
of windows in size. The set is the same whatever the batches, their order, the processes and
shards merged, or where a run was resumed: a window that can still enter has a key below the
limit, and the limit only falls.

It also holds the whole adapter state (all D directions' activations) at K sampled tokens.

Non-finite activations are kept as they are; `sample` never returns a token for a direction on
which its activation is not finite (its window may still be kept, and sampled for the others).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.contexts import EMPTY, BatchTokens, Example, unpack
from backend.summaries import Shape, Summary

EMPTY_SLOT = (EMPTY, -1, -1, 0)  # meta of an empty slot: key, example, position, window key
# contexts(i) of the candidates i [E]: their window ids [E, C] and activations, in the form the
# keeper stores them (here [E, D, C])
Contexts = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Reservoir(Summary):
    """K slots, each a kept window at its token of smallest key:

    - meta [K, 4] int64: the token's key, example index, position, and its window key
      (backend.contexts.window_keys); an empty slot's key is EMPTY;
    - ids [K, C] int32: the window's token ids, -1 outside the sequence;
    - acts [K, D, C] float32: every direction's activations on the window, 0 outside the
      sequence (NaN and infinities as they came).

    The filled slots are always the first ones; their order is the order they entered in, and
    `state_dict` sorts them by key, so that the saved state is the same however the run went.
    Not a registered summary: QuantileSamples embeds it and saves it through state_dict/load.
    """

    name = "reservoir"
    STATE = ("meta", "ids", "acts")

    def __init__(self, shape: Shape, size: int) -> None:
        super().__init__(shape)
        c, device = 2 * shape.window + 1, shape.device
        self.meta = torch.tensor(EMPTY_SLOT, device=device).repeat(size, 1)  # [K, 4]
        self.ids = torch.full((size, c), -1, dtype=torch.int32, device=device)
        self.acts = torch.zeros(size, shape.num_directions, c, device=device)

    @property
    def limit(self) -> torch.Tensor:
        """The largest kept key, EMPTY while a slot is empty: a token enters only below it."""
        return self.meta[:, 0].max()

    def update(self, batch: BatchTokens) -> None:
        key = batch.key  # [N]
        # After the first batches almost no key passes: the test on [N] keys is all the work.
        passing = (key < self.limit).nonzero().squeeze(1)  # [M] (a host sync)
        if len(passing) == 0:
            return
        meta = torch.stack(
            [
                key[passing],
                batch.example[passing],
                batch.position[passing],
                batch.window_key[passing],
            ],
            1,
        )  # [M, 4]
        self._keep(meta, lambda i: self._windows(batch, passing[i]))

    def _windows(self, batch: BatchTokens, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of real tokens n [E]: ids [E, C] and every direction's acts [E, D, C]."""
        every = torch.arange(self.shape.num_directions, device=n.device)
        return batch.windows(every.expand(len(n), -1), n)

    def _keep(self, meta: torch.Tensor, contexts: Contexts) -> None:
        """Keep the K distinct windows of smallest key among the kept ones and the candidates
        meta [M, 4], each window at its token of smallest key; contexts(i) are the windows of
        candidates i, read for the entering ones only."""
        size = self.meta.shape[0]
        both = torch.cat([self.meta, meta])  # [K + M, 4]
        index = (both[:, 0] < EMPTY).nonzero().squeeze(1)
        # By key; stable, so that a token fed again (a key and window both already kept) stays.
        index = index[both[index, 0].argsort(stable=True)]
        _, window = torch.unique(both[index, 3], return_inverse=True)  # [V] window of each
        first = torch.full((int(window.max()) + 1,), len(index), device=index.device)
        first.scatter_reduce_(0, window, torch.arange(len(index), device=index.device), "amin")
        chosen = index[first.sort().values[:size]]  # each window's least key, the K least
        stays, entering = chosen[chosen < size], chosen[chosen >= size] - size
        if len(entering) == 0:
            return
        # The filled slots are the first ones, so the free ones are the evicted, then the empty
        # ones; at least as many enter as leave, and so the filled ones stay first.
        free = torch.ones(size, dtype=torch.bool, device=index.device)
        free[stays] = False
        slots = free.nonzero().squeeze(1)[: len(entering)]
        ids, acts = contexts(entering)
        self.meta[slots] = meta[entering]
        self.ids[slots] = ids.to(self.ids.dtype)
        self.acts[slots] = acts

    def merge(self, other: Reservoir) -> None:
        """The union's K distinct windows of smallest key, exactly: a window's token of least
        key lies in one of the two, which keeps it there unless K windows of smaller key beat
        it, and those it keeps."""
        index = (other.meta[:, 0] < EMPTY).nonzero().squeeze(1)
        if len(index):
            self._keep(other.meta[index], lambda i: (other.ids[index[i]], other.acts[index[i]]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        order = self.meta[:, 0].argsort(stable=True)  # by key, the empty slots last
        return {name: getattr(self, name)[order].cpu() for name in self.STATE}

    def sample(
        self, d: int, sign: int, lo: float, hi: float, n: int, siblings: list[int]
    ) -> list[Example]:
        """The first n kept windows, in key order, whose token's activation on direction d has
        sign `sign` (its sign bit: +0.0 is positive, -0.0 negative) and |activation| in
        [lo, hi) (compared exactly, in float64), which no NaN or infinity is in, whatever the
        bounds. siblings [S]: direction d's siblings (-1 for none), whose activations on the
        windows come with them."""
        order = self.meta[:, 0].argsort()
        x = self.acts[order, d, self.shape.window].double()  # [K] each token's own activation
        inside = (x.abs() >= lo) & (x.abs() < hi) & (x.signbit() == (sign < 0))
        inside &= self.meta[order, 0] < EMPTY
        chosen = order[inside][:n]  # [m]
        acts = self.acts[chosen]  # [m, D, C]
        others = torch.tensor(siblings, dtype=torch.long, device=acts.device).clamp(min=0)
        return unpack(
            acts[:, d, self.shape.window],
            self.meta[chosen, 1],
            self.meta[chosen, 2],
            self.ids[chosen],
            acts[:, d],
            acts[:, others],  # [m, S, C]; unpack drops the -1s
            siblings,
        )

    def examples(self) -> torch.Tensor:
        return self.meta[:, 1]

    def token_ids(self) -> torch.Tensor:
        return self.ids.flatten()

    def windows(self) -> torch.Tensor:
        return self.ids.long()
