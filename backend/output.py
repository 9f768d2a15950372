"""The activations JSON of the data contract: the layout of a run's directions, filled in from
its tracker, written atomically."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from backend.atomic import write_atomic
from backend.contexts import Example, context_keys
from backend.contract import (
    SCHEMA_VERSION,
    ContractError,
    example_holders,
    iter_examples,
    validate,
)
from backend.directions import LoraModule, layer_cosines
from backend.tracking import Tracker

if TYPE_CHECKING:  # backend.state needs this module's layout_token_ids, causal finite_or_none
    from backend.causal import EffectsState
    from backend.state import RunState


def layer_layout(
    modules: list[LoraModule],
    first: dict[str, int],
    read_sites: dict[str, str],
    effects: dict[str, list[dict]],
) -> list[dict[str, Any]]:
    """The document's layers without results: cosines, and per direction its tracker `index`
    (and, for modules writing into the residual stream, its logit effects as token ids)."""
    layers: dict[int, list[LoraModule]] = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)

    def direction(m: LoraModule, c: int) -> dict[str, Any]:
        b_norm = float(m.B[:, c].float().norm())
        found = {
            "index": first[m.name] + c,
            "component": c,
            "a_norm": float(m.A[c].float().norm()),
            "b_norm": b_norm,
            "write_norm_scale": m.scaling * b_norm,
        }
        if m.name in effects:
            found["logit_effects"] = effects[m.name][c]
        return found

    return [
        {
            "layer": layer,
            "cosine_similarities": layer_cosines(members),
            "projections": {
                m.module: {
                    "rank": m.rank,
                    "scaling": m.scaling,
                    "read_site": read_sites[m.name],
                    "directions": [direction(m, c) for c in range(m.rank)],
                }
                for m in members
            },
        }
        for layer, members in sorted(layers.items())
    ]


def layout_token_ids(layers: list[dict[str, Any]]) -> set[int]:
    """Token ids the layout names (logit effects): their strings go into the output too."""
    return {
        token
        for layer in layers
        for projection in layer["projections"].values()
        for d in projection["directions"]
        for side in d.get("logit_effects", {}).values()
        for token, _ in side
    }


def finite_or_none(values: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity: a value that is not finite becomes null."""
    return [v if math.isfinite(v) else None for v in values]


class Document:
    """Turns a finished tracker into the contract's direction entries; the summaries' export
    reads the token strings, the options and the Examples' form from it (summaries.Exporter).

    Each Example's `occurrences` is filled in once every entry is built (`count`), from the
    keys of all the Examples' windows at once, whichever summary made them.
    """

    def __init__(
        self,
        layers: list[dict],
        tracker: Tracker,
        tokens: dict[int, str],
        min_token_count: int,
        effects: EffectsState | None = None,
    ) -> None:
        self.tracker, self.tokens, self.min_token_count = tracker, tokens, min_token_count
        self.effects = effects
        self.window = tracker.shape.window
        self.shown: list[tuple[dict[str, Any], Example]] = []  # every Example made, in order
        self.module_of = {
            d["index"]: name
            for layer in layers
            for name, projection in layer["projections"].items()
            for d in projection["directions"]
        }

    def example(self, example: Example) -> dict[str, Any]:
        found = {
            "activation": example.activation,
            "example_index": example.example_index,
            "token_index": example.token_index,
            "tokens": [self.tokens[i] for i in example.context_ids],
            "activations": finite_or_none(example.context_acts),
            "target": example.target,
        }
        if example.siblings:
            found["sibling_activations"] = {
                self.module_of[d]: finite_or_none(acts) for d, acts in example.siblings.items()
            }
        self.shown.append((found, example))
        return found

    def window_keys(self) -> torch.Tensor:
        """[M] the window keys of the Examples made so far (backend.contexts.context_keys)."""
        ids = torch.full((len(self.shown), 2 * self.window + 1), -1, dtype=torch.long)
        for row, (_, example) in enumerate(self.shown):
            first = self.window - example.target
            ids[row, first : first + len(example.context_ids)] = torch.tensor(example.context_ids)
        return context_keys(ids)

    def count(self, occurrences: dict[int, int]) -> None:
        """Give every Example made its window's number of occurrences (window key -> count)."""
        for (found, _), key in zip(self.shown, self.window_keys().tolist(), strict=True):
            if key not in occurrences:
                raise ValueError(
                    "a shown window was not counted: count the windows of a merged or partial "
                    "state with backend.analysis.count_windows before building its document"
                )
            found["occurrences"] = occurrences[key]

    def direction(self, layout: dict[str, Any]) -> dict:
        """A direction's entry: its layout, then every summary's fields (backend.tracking)."""
        found = {key: value for key, value in layout.items() if key not in ("index",)}
        if "logit_effects" in layout:
            found["logit_effects"] = {
                side: [{"token": self.tokens[token], "value": v} for token, v in effects]
                for side, effects in layout["logit_effects"].items()
            }
        found.update(self.tracker.fields(layout["index"], self))
        if self.effects is not None:
            found.update(self.effects.fields(layout["index"], self))
        return found

    def neuron(self, neuron: dict[str, int]) -> dict:
        """A baseline neuron's entry: its layer and coordinate, then every summary's fields."""
        return {
            "layer": neuron["layer"],
            "neuron": neuron["neuron"],
            **self.tracker.fields(neuron["index"], self),
        }


# The run's options that the metadata records under their own names.
METADATA_OPTIONS = (
    "top_k", "context_window", "histogram_bins", "min_token_count", "dtype", "max_length",
    "below_median_contexts",
)  # fmt: skip


def build_document(state: RunState) -> dict[str, Any]:
    """The contract's document of a finished run: metadata (the run's options and counters, and
    when it was written), the layout with every direction's results, and the stored sequences
    of the examples shown (if any were stored)."""
    run, layers, tracker, tokens = state.run, state.layers, state.tracker, state.tokens
    modules = [name for layer in layers for name in layer["projections"]]
    document = Document(layers, tracker, tokens, run["min_token_count"], state.effects)
    found = {
        "schema_version": SCHEMA_VERSION,
        "metadata": {
            "base_model": run["base_model"],
            "adapter": run["lora_path"],
            "dataset": run["dataset"],
            **state.counters,
            "num_processes": state.num_processes,
            **{key: run[key] for key in METADATA_OPTIONS},
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "lora_layers": [layer["layer"] for layer in layers],
            "modules": list(dict.fromkeys(modules)),
            "num_nonfinite": int(tracker.moments.nonfinite.sum()),
        },
        "layers": entries(layers, document),
        "cross_layer_cosine": state.cross_layer_cosine,
    }
    if state.neurons:
        found["baseline_neurons"] = [document.neuron(n) for n in state.neurons]
    if state.sae is not None:
        found["sae"] = state.sae
    document.count(state.occurrences)
    # The examples shown (where their sequences were stored) and the effects' rows.
    stored = examples_shown(found) & state.sequences.keys()
    if state.effects is not None:
        found["effects"] = state.effects.document(tokens, run["effects_max_length"])
        stored |= state.effects.kl_tokens.keys()
    if stored:
        found["examples"] = {
            str(i): {"tokens": [tokens[t] for t in state.sequences[i]], "source": run["dataset"]}
            for i in sorted(stored)
        }
    return found


def entries(layers: list[dict[str, Any]], document: Document) -> list[dict[str, Any]]:
    """The document's layers: the layout with every direction's results."""
    return [
        {
            **layer,
            "projections": {
                name: {
                    **projection,
                    "directions": [document.direction(d) for d in projection["directions"]],
                }
                for name, projection in layer["projections"].items()
            },
        }
        for layer in layers
    ]


def examples_shown(document: dict[str, Any]) -> set[int]:
    """The example indices of every Example of the document's directions and neurons."""
    return {e["example_index"] for d in example_holders(document) for e in iter_examples(d)}


def write_json_atomic(document: dict[str, Any], path: Path) -> None:
    """Write the document, once it is valid: a bug that breaks the format fails here, naming
    the field, rather than leaving a file that no reader can trust."""
    try:
        validate(document)
    except ContractError as e:
        raise ContractError(
            f"{path} not written, the output breaks its format (a bug): {e}"
        ) from None
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
