"""A run's causal effects (--effects N): the rows they run on, what those rows add up to, the
pinned samples, and their part of the document.

backend.effects computes one row exactly (ablations, KL against the base, attribution);
backend.steering generates one pinned continuation. Here the first N rows with at least 2
tokens go through it, this slot taking rows j with j % slots == slot, and `EffectsState` keeps
their float64 sums, each row's KL per position, and the top and bottom attribution windows
(the top-k summary of backend.tracking, over attr, carrying the activations along). States of
disjoint rows merge exactly (float64 sums may round differently). The pinned samples need the
ranking over all rows, so they come last, on the process that holds the merged state (`pin`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from backend import UserError
from backend.contexts import BatchTokens, Example
from backend.contract import CLAMPS
from backend.data import Sequence
from backend.directions import LoraModule
from backend.output import finite_or_none
from backend.summaries import Exporter, Shape
from backend.tracking import TopK

# Per-row float64 sums (backend.effects.RowEffects fields), by group: direction, layer, module.
SUMS = ("ablation_kl", "ablation_dloss", "layer_kl", "layer_dloss", "module_kl", "module_dloss")
MEANS = ("ablation_kl", "ablation_dloss", "attribution")  # a direction's effects, per position
NEW_TOKENS = 48  # the longest pinned continuation


def effects_rows(
    sequences: Iterable[Sequence], count: int, max_length: int
) -> Iterator[tuple[int, Sequence, torch.Tensor]]:
    """The first `count` sequences with at least 2 tokens: (ordinal, sequence, its token ids cut
    to max_length [n]). Raises once the data runs out before `count`."""
    found = 0
    for sequence in sequences:
        if len(sequence.input_ids) >= 2:
            yield found, sequence, torch.tensor(sequence.input_ids[:max_length])
            found += 1
        if found == count:
            return
    if found < count:
        raise UserError(
            f"--effects {count}: the data has only {found} rows with at least 2 tokens "
            "(within --num-examples)"
        )


def attribution_siblings(num_directions: int) -> torch.Tensor:
    """[2D, 1]: the attribution top-k tracks rows 0..D-1 (attr) and carries, for each, its
    direction's activation row D + d as its one sibling (rows D.. carry none)."""
    d = num_directions
    carried = torch.cat([torch.arange(d, 2 * d), torch.full((d,), -1)])
    return carried[:, None]


class EffectsState:
    """What the effects' rows add up to, for D directions in `layers` and `modules` groups."""

    def __init__(
        self, num_directions: int, layers: list[int], modules: list[str], top: Shape
    ) -> None:
        """top: the tracker's shape, whose top_k and window the attribution lists take."""
        d = num_directions
        sizes = {"ablation": d, "attribution": d, "layer": len(layers), "module": len(modules)}
        self.layers, self.modules = layers, modules
        # float64 sums over the positions: SUMS, and "attribution" (Σ attr per direction)
        self.sums = {
            name: torch.zeros(sizes[name.split("_")[0]], dtype=torch.float64)
            for name in (*SUMS, "attribution")
        }
        self.kl_tokens: dict[int, list[float]] = {}  # example index -> KL vs base per position
        self.rows_done = 0  # rows of the effects passed, this slot's and others': for resume
        self.prompts: list[tuple[int, list[int]]] = []  # (example index, ids), once pinned
        self.steering: list[dict[str, Any]] = []  # pinned samples, continuation ids in "ids"
        shape = Shape(
            2 * d, top.top_k, top.window, 1, attribution_siblings(d), 0, torch.device("cpu")
        )
        self.top = TopK(shape)

    def update(self, row: Any, ids: torch.Tensor, example: int, whole: bool) -> None:
        """Add one row's effects (backend.effects.RowEffects) on its tokens ids [n]. whole:
        the row was not cut for the effects; where it was, its last W tokens enter no list
        (their window would reach past the cut, and a shown window is one of the data)."""
        for name in SUMS:
            self.sums[name] += getattr(row, name).cpu()
        attr, acts = row.attribution.cpu(), row.activations.cpu()  # [D, n] float32
        self.sums["attribution"] += attr.double().sum(1)
        self.kl_tokens[example] = row.kl_tokens.tolist()
        n, window = len(ids), self.top.shape.window
        candidates = n if whole else n - window
        if candidates > 0:
            batch = BatchTokens(
                torch.cat([attr, acts]),  # [2D, n]
                torch.arange(candidates),
                ids.cpu()[None],
                torch.tensor([n]),
                torch.tensor([example]),
                window,
                self.top.shape.siblings,
            )
            self.top.update(batch)

    def merge(self, other: EffectsState) -> None:
        for name, total in other.sums.items():
            self.sums[name] += total
        self.kl_tokens.update(other.kl_tokens)
        self.top.merge(other.top)

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "modules": self.modules,
            "sums": self.sums,
            "kl_tokens": self.kl_tokens,
            "rows_done": self.rows_done,
            "prompts": self.prompts,
            "steering": self.steering,
            "top": self.top.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], top: Shape) -> EffectsState:
        """A copy of a state_dict's effects (it may still be read or merged into)."""
        found = cls(len(state["sums"]["attribution"]), state["layers"], state["modules"], top)
        found.sums = {name: total.clone() for name, total in state["sums"].items()}
        found.kl_tokens = dict(state["kl_tokens"])
        found.rows_done, found.prompts = state["rows_done"], list(state["prompts"])
        found.steering = list(state["steering"])
        found.top.load(state["top"])
        return found

    # ---- the document ---------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """The positions of every row: a row of n tokens has n - 1."""
        return sum(map(len, self.kl_tokens.values()))

    def means(self, name: str) -> torch.Tensor:
        """A sum per position: mean over every position of every row."""
        return self.sums[name] / max(self.num_tokens, 1)

    def ranking(self) -> list[int]:
        """Direction indices by ablation_kl, largest first (ties: lower index first)."""
        return self.means("ablation_kl").argsort(descending=True, stable=True).tolist()

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        """Direction d's `effects` entry."""
        found = {name: float(self.means(name)[d]) for name in MEANS}
        for side, negative in (("top_attribution", False), ("bottom_attribution", True)):
            found[side] = [self.example(e, d, doc) for e in self.top.top_examples(d, negative)]
        return {"effects": found}

    def example(self, example: Example, d: int, doc: Exporter) -> dict[str, Any]:
        """An attribution Example: the top-k's Example of attr, shown with direction d's
        activations (the sibling it carries) as activation(s), and attr as attribution(s)."""
        acts = example.siblings[d + self.top.shape.num_directions // 2]
        found = doc.example(
            replace(example, activation=acts[example.target], context_acts=acts, siblings={})
        )
        found["attribution"] = example.activation
        found["attributions"] = finite_or_none(example.context_acts)
        return found

    def document(self, tokens: dict[int, str], max_length: int) -> dict[str, Any]:
        """The top-level `effects` entry; tokens: id -> string."""

        def groups(key: str, names: list) -> list[dict[str, Any]]:
            kl, dloss = self.means(f"{key}_kl"), self.means(f"{key}_dloss")
            return [
                {key: name, "ablation_kl": float(kl[i]), "ablation_dloss": float(dloss[i])}
                for i, name in enumerate(names)
            ]

        # summed in row order: the same however the rows were split
        kl_sum = math.fsum(v for i in sorted(self.kl_tokens) for v in self.kl_tokens[i])
        return {
            "num_examples": len(self.kl_tokens),
            "num_tokens": self.num_tokens,
            "max_length": max_length,
            "kl_vs_base": kl_sum / max(self.num_tokens, 1),
            "attribution_spearman": spearman(
                self.means("attribution"), self.means("ablation_dloss")
            ),
            "layers": groups("layer", self.layers),
            "modules": groups("module", self.modules),
            "kl_tokens": {str(i): self.kl_tokens[i] for i in sorted(self.kl_tokens)},
            "prompts": [
                {"example_index": i, "tokens": [tokens[t] for t in ids]} for i, ids in self.prompts
            ],
            "steering": [
                {
                    **{k: v for k, v in s.items() if k != "ids"},
                    "tokens": [tokens[t] for t in s["ids"]],
                }
                for s in self.steering
            ],
        }

    def token_ids(self) -> set[int]:
        """Ids the document names: attribution contexts, prompts and continuations."""
        ids = {int(i) for i in self.top.token_ids().unique() if i >= 0}
        ids.update(t for _, prompt in self.prompts for t in prompt)
        ids.update(t for s in self.steering for t in s["ids"])
        return ids

    def windows(self) -> torch.Tensor:
        """[M, 2W+1] the attribution lists' windows (their occurrences are counted)."""
        return self.top.windows()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of a and b [D] (average ranks for ties); None below 3
    values or where either is constant."""
    if len(a) < 3:
        return None
    ra, rb = average_ranks(a.double()), average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / scale if scale > 0 else None


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """[D] ranks 1..D of x, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of each distinct value's last occurrence
    return (last - (counts.double() - 1) / 2)[inverse]


def clamp_values(lo: float, hi: float) -> list[tuple[str, float | None]]:
    """What each clamp holds the activation at, from its observed min and max."""
    values = {"min": lo, "zero": 0.0, "max": hi, "none": None}
    return [(clamp, values[clamp]) for clamp in CLAMPS]


def pin(
    effects: EffectsState,
    directions: list[tuple[int, LoraModule, int, float, float]],
    prompts: list[tuple[int, list[int]]],
    generate: Callable[[list[tuple[LoraModule, int, float | None]], list[int]], list[list[int]]],
    decode: Callable[[list[int]], str],
) -> None:
    """The pinned samples: for each (direction index, module, component, min, max) and each
    (example index, prompt ids), a continuation under every clamp. generate(pins, prompt) gives
    one continuation per pin (module, component, value; None: left as is) in one batch; the
    continuation left as is is the same for every direction, so it is made once a prompt."""
    effects.prompts, effects.steering = prompts, []
    made = []  # per prompt: {(direction's place, clamp): continuation ids}
    for _, prompt in prompts:
        keys = [
            (j, clamp, (module, component, value))
            for j, (_, module, component, lo, hi) in enumerate(directions)
            for clamp, value in clamp_values(lo, hi)
            if value is not None
        ]
        _, module, component, _, _ = directions[0]
        pins = [pin for _, _, pin in keys] + [(module, component, None)]
        *clamped, plain = generate(pins, prompt)
        found = {(j, clamp): ids for (j, clamp, _), ids in zip(keys, clamped, strict=True)}
        made.append(found | {(j, "none"): plain for j in range(len(directions))})
    for j, (_, module, component, lo, hi) in enumerate(directions):
        for p, found in enumerate(made):
            for clamp, value in clamp_values(lo, hi):
                ids = found[j, clamp]
                effects.steering.append(
                    {
                        "layer": module.layer,
                        "module": module.module,
                        "component": component,
                        "prompt_index": p,
                        "clamp": clamp,
                        "value": value,
                        "text": decode(ids),
                        "ids": ids,
                    }
                )
