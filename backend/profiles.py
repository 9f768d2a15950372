"""Activation profiles of D directions by token position and by token id, exact and mergeable.

- PositionProfile: the mean activation in position buckets 0, 1, 2-3, 4-7, ... (powers of two),
  which shows start-of-sequence (attention sink) artefacts at a glance.
- TokenProfile: count, sum, min and max of the activation per token id, so that the token
  strings that drive a direction can be ranked by their mean, not by one lucky occurrence.
  Token-major tables [V, D]: a batch adds whole rows of D values per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from backend.contexts import BatchTokens
from backend.summaries import Exporter, Shape, Summary, occurrences

POSITION_BUCKETS = 22  # 0, 1, [2, 4), ..., [2**19, 2**20), then everything from 2**20 on
TOP_TOKENS = 10  # token strings listed per direction and side


class PositionProfile(Summary):
    name = "positions"
    STATE = ("sum", "count")

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        size, device = (POSITION_BUCKETS, shape.num_directions), shape.device
        self.sum = torch.zeros(size, dtype=torch.float64, device=device)
        self.count = torch.zeros(size, dtype=torch.long, device=device)
        # bucket b > 0 holds positions [2**(b-1), 2**b)
        self.edges = torch.tensor([2**b for b in range(POSITION_BUCKETS - 1)], device=device)

    def update(self, batch: BatchTokens) -> None:
        bucket = torch.bucketize(batch.position, self.edges, right=True)  # [N]
        self.sum.index_add_(0, bucket, batch.rows_zeroed)
        if batch.all_finite:  # every direction counts every token
            self.count += occurrences(bucket, POSITION_BUCKETS, torch.long)[:, None]
        else:
            self.count.index_add_(0, bucket, batch.rows_finite.long())

    def merge(self, other: PositionProfile) -> None:
        self.sum += other.sum
        self.count += other.count

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        return {"position_profile": self.export(d)}

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


class TokenProfile(Summary):
    """Per token id and direction: sum, min, max, and the count of finite activations, kept as
    the tokens of that id seen minus the non-finite ones (so a batch of finite activations adds
    one number per token to the counts, not a row of D)."""

    name = "tokens"
    STATE = ("sum", "min", "max", "seen", "nonfinite")

    @staticmethod
    def applies(shape: Shape) -> bool:
        return shape.vocab_size > 0

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        size, device = (shape.vocab_size, shape.num_directions), shape.device
        self.sum = torch.zeros(size, dtype=torch.float64, device=device)
        self.min = torch.full(size, math.inf, device=device)
        self.max = torch.full(size, -math.inf, device=device)
        self.seen = torch.zeros(shape.vocab_size, dtype=torch.int32, device=device)  # [V]
        self.nonfinite = torch.zeros(size, dtype=torch.int32, device=device)

    def update(self, batch: BatchTokens) -> None:
        ids, rows = batch.ids, batch.rows  # [N], [N, D]
        self.sum.index_add_(0, ids, batch.rows_zeroed)
        self.seen += occurrences(ids, self.seen.numel(), torch.int32)
        index = ids[:, None].expand_as(rows)
        if batch.all_finite:
            self.min.scatter_reduce_(0, index, rows, "amin")
            self.max.scatter_reduce_(0, index, rows, "amax")
            return
        finite = batch.rows_finite
        self.nonfinite.index_add_(0, ids, (~finite).int())
        self.min.scatter_reduce_(0, index, rows.masked_fill(~finite, math.inf), "amin")
        self.max.scatter_reduce_(0, index, rows.masked_fill(~finite, -math.inf), "amax")

    def merge(self, other: TokenProfile) -> None:
        self.sum += other.sum
        self.seen += other.seen
        self.nonfinite += other.nonfinite
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)

    @property
    def count(self) -> torch.Tensor:
        """[V, D]: finite activations per token id and direction."""
        return self.seen[:, None] - self.nonfinite

    def ids_seen(self) -> torch.Tensor:
        """Ids of the tokens seen at least once."""
        return self.seen.nonzero().squeeze(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rows of the tokens seen only: a vocabulary is mostly unseen."""
        ids = self.ids_seen()
        return {"ids": ids.cpu(), **{name: getattr(self, name)[ids].cpu() for name in self.STATE}}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        ids = state["ids"].to(self.shape.device)
        for name in self.STATE:
            getattr(self, name)[ids] = state[name].to(self.shape.device)

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        top, bottom = self.export(d, doc.min_token_count, TOP_TOKENS)
        return {
            key: [{"token": doc.tokens[r.pop("id")], **r} for r in rows]
            for key, rows in (("top_tokens", top), ("bottom_tokens", bottom))
        }

    def token_ids(self) -> torch.Tensor:
        """Every token seen: the profiles rank them only once merged with other processes' or
        shards'."""
        return self.ids_seen()

    def export(self, d: int, min_count: int, n: int) -> tuple[list[dict], list[dict]]:
        """The n tokens of highest and of lowest mean among those seen min_count times or more.

        Each as {"id", "count", "mean", "min", "max"}; highest first, then lowest first.
        """
        count = self.seen - self.nonfinite[:, d]
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
