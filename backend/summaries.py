"""The protocol of a per-direction summary: what the one pass computes for every direction.

A summary is built from the tracker's `Shape`, reads each batch through the shared
`BatchTokens` view, merges exactly with another of its kind (batches of one process, processes,
shards), saves and loads its tensors (checkpoints, shard files, results sent between processes)
and exports (`fields`) its part of one direction's document entry. The tracker
(backend.tracking) holds one of each registered summary and does nothing else: a summary
registered in `tracking.SUMMARIES` is batched, merged, checkpointed, resumed and written with no
other change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar, Protocol

import torch

from backend.contexts import BatchTokens, Example


@dataclass(frozen=True)
class Shape:
    """What every summary is built from; saved with the state, so that a loaded state rebuilds
    its summaries before loading their tensors."""

    num_directions: int
    top_k: int
    window: int  # context tokens kept on each side of a kept token
    bins: int  # histogram bins
    siblings: torch.Tensor  # [D, S] sibling directions of each direction, -1 where fewer
    vocab_size: int  # 0: no vocabulary known
    device: torch.device
    below_median: int = 0  # contexts shown below each sign's median (0: the quantile samples')

    def options(self) -> dict[str, int]:
        """The plain numbers of the shape, as the state stores them."""
        return {
            "num_directions": self.num_directions,
            "top_k": self.top_k,
            "window": self.window,
            "bins": self.bins,
            "vocab_size": self.vocab_size,
            "below_median": self.below_median,
        }


class Exporter(Protocol):
    """What a summary's export may ask of the document it is written into (backend.output)."""

    tokens: dict[int, str]  # token id -> its string
    min_token_count: int

    def example(self, example: Example) -> dict[str, Any]: ...


class Summary:
    """Base of every summary. `name` prefixes its tensors in the state and must be unique."""

    name: ClassVar[str]
    # The tensor attributes its default state_dict/load save and restore ("range.min": an
    # attribute of an attribute).
    STATE: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def applies(shape: Shape) -> bool:
        """Whether a tracker of this shape keeps the summary (e.g. token profiles need a
        vocabulary)."""
        return True

    def __init__(self, shape: Shape) -> None:
        self.shape = shape

    def update(self, batch: BatchTokens) -> None:
        """Add one batch's tokens."""
        raise NotImplementedError

    def merge(self, other: Summary) -> None:
        """Fold in another summary of the same shape over other tokens, exactly."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything it holds, on the CPU: by default the tensors STATE names."""
        return {name: attrgetter(name)(self).cpu() for name in self.STATE}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take the tensors of `state_dict` (into a summary just built of the same shape),
        copied: summaries update in place, and the state may still be read."""
        for name in self.STATE:
            owner, _, attribute = name.rpartition(".")
            target = attrgetter(owner)(self) if owner else self
            setattr(target, attribute, state[name].to(self.shape.device, copy=True))

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        """Its fields of direction d's entry in the document (the export)."""
        raise NotImplementedError

    def examples(self) -> torch.Tensor:
        """Example indices of the tokens it keeps (-1s allowed): their sequences are stored."""
        return torch.empty(0, dtype=torch.long)

    def token_ids(self) -> torch.Tensor:
        """Token ids its export may name (-1s allowed): their strings go into the state."""
        return torch.empty(0, dtype=torch.long)

    def windows(self) -> torch.Tensor:
        """[M, 2W+1] the context windows its Examples may show (ids, -1 outside the sequence,
        the token in the middle; rows of -1 allowed): their occurrences are counted."""
        return torch.empty(0, 2 * self.shape.window + 1, dtype=torch.long)


class Range:
    """Running least and largest finite value of D directions, float64 (+-inf before any)."""

    def __init__(self, num_directions: int, device: torch.device) -> None:
        self.min = torch.full((num_directions,), math.inf, dtype=torch.float64, device=device)
        self.max = torch.full((num_directions,), -math.inf, dtype=torch.float64, device=device)

    def update(self, batch: BatchTokens) -> None:
        self.min = torch.minimum(self.min, batch.lo)
        self.max = torch.maximum(self.max, batch.hi)

    def merge(self, other: Range) -> None:
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """min and max [D], 0 for a direction that has seen no finite value yet."""
        seen = self.min <= self.max
        return self.min.where(seen, 0.0), self.max.where(seen, 0.0)

    def of(self, d: int) -> tuple[float, float]:
        """Direction d's (min, max), (0, 0) before any finite value."""
        lo, hi = float(self.min[d]), float(self.max[d])
        return (lo, hi) if lo <= hi else (0.0, 0.0)


def occurrences(index: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """[size]: how often each value in [0, size) occurs in `index` (any shape).

    bincount on a CPU is about twice as fast as index_add_; on a GPU bincount waits for the host
    to size its output, which index_add_ does not.
    """
    flat = index.flatten()
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=size).to(dtype)
    ones = torch.ones(1, dtype=dtype, device=flat.device).expand(flat.numel())
    return torch.zeros(size, dtype=dtype, device=flat.device).index_add_(0, flat.long(), ones)
