"""Activation profiles of D directions by token position and by token id, exact and mergeable.

- PositionProfile: the mean activation in position buckets 0, 1, 2-3, 4-7, ... (powers of two),
  which shows start-of-sequence (attention sink) artefacts at a glance.
- TokenProfile: count, sum, min and max of the activation per token id, so that the token
  strings that drive a direction can be ranked by their mean, not by one lucky occurrence.
  Token-major tables [V, D]: a batch adds whole rows of D values per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

POSITION_BUCKETS = 22  # 0, 1, [2, 4), ..., [2**19, 2**20), then everything from 2**20 on


@dataclass
class TokenRows:
    """A batch's activations token-major, as the profiles add them up."""

    x: torch.Tensor  # [N, D] float32
    finite: torch.Tensor  # [N, D] bool

    @cached_property
    def zeroed(self) -> torch.Tensor:
        """float64 (sums of many tokens), 0 where not finite."""
        return self.x.double().masked_fill_(~self.finite, 0.0)


class PositionProfile:
    def __init__(self, num_directions: int, device: torch.device) -> None:
        shape = (POSITION_BUCKETS, num_directions)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(shape, dtype=torch.long, device=device)
        # bucket b > 0 holds positions [2**(b-1), 2**b)
        self.edges = torch.tensor([2**b for b in range(POSITION_BUCKETS - 1)], device=device)

    def update(self, rows: TokenRows, position: torch.Tensor) -> None:
        """position [N]: each token's position in its sequence."""
        bucket = torch.bucketize(position, self.edges, right=True)  # [N]
        self.sum.index_add_(0, bucket, rows.zeroed)
        self.count.index_add_(0, bucket, rows.finite.long())

    def merge(self, other: PositionProfile) -> None:
        self.sum += other.sum
        self.count += other.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum.cpu(), "count": self.count.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device):
        profile = cls(state["sum"].shape[1], device)
        profile.sum, profile.count = state["sum"].to(device), state["count"].to(device)
        return profile

    def export(self, d: int) -> dict:
        """Buckets up to the last one with tokens: edges [0, 1, 2, 4, ...], mean per bucket."""
        count = self.count[:, d].tolist()
        used = max((b + 1 for b, n in enumerate(count) if n), default=0)
        sums = self.sum[:used, d].tolist()
        return {
            "edges": [0] + [2**b for b in range(used)],
            "mean": [s / n if n else None for s, n in zip(sums, count, strict=False)],
            "count": count[:used],
        }


class TokenProfile:
    def __init__(self, num_directions: int, vocab_size: int, device: torch.device) -> None:
        shape = (vocab_size, num_directions)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(shape, dtype=torch.int32, device=device)
        self.min = torch.full(shape, math.inf, device=device)
        self.max = torch.full(shape, -math.inf, device=device)

    def update(self, rows: TokenRows, ids: torch.Tensor) -> None:
        """ids [N]: each token's id."""
        self.sum.index_add_(0, ids, rows.zeroed)
        self.count.index_add_(0, ids, rows.finite.int())
        index = ids[:, None].expand_as(rows.x)
        self.min.scatter_reduce_(0, index, rows.x.masked_fill(~rows.finite, math.inf), "amin")
        self.max.scatter_reduce_(0, index, rows.x.masked_fill(~rows.finite, -math.inf), "amax")

    def merge(self, other: TokenProfile) -> None:
        self.sum += other.sum
        self.count += other.count
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)

    def seen(self) -> torch.Tensor:
        """Ids of the tokens seen at least once."""
        return (self.count > 0).any(1).nonzero().squeeze(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rows of the tokens seen only: a vocabulary is mostly unseen."""
        ids = self.seen()
        state = {name: getattr(self, name)[ids].cpu() for name in ("sum", "count", "min", "max")}
        return {**state, "ids": ids.cpu(), "vocab_size": torch.tensor(self.sum.shape[0])}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device):
        profile = cls(state["sum"].shape[1], int(state["vocab_size"]), device)
        ids = state["ids"].to(device)
        for name in ("sum", "count", "min", "max"):
            getattr(profile, name)[ids] = state[name].to(device)
        return profile

    def export(self, d: int, min_count: int, n: int) -> tuple[list[dict], list[dict]]:
        """The n tokens of highest and of lowest mean among those seen min_count times or more.

        Each as {"id", "count", "mean", "min", "max"}; highest first, then lowest first.
        """
        count = self.count[:, d]
        ids = (count >= max(min_count, 1)).nonzero().squeeze(1)
        mean = self.sum[ids, d] / count[ids]
        order = mean.argsort(descending=True, stable=True)

        def rows(chosen: torch.Tensor) -> list[dict]:
            return [
                {
                    "id": int(ids[i]),
                    "count": int(count[ids[i]]),
                    "mean": float(mean[i]),
                    "min": float(self.min[ids[i], d]),
                    "max": float(self.max[ids[i], d]),
                }
                for i in chosen.tolist()
            ]

        return rows(order[:n]), rows(order.flip(0)[:n])
