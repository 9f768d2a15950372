"""The activations JSON of the data contract: the layout of a run's directions, filled in from
its tracker, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backend import SCHEMA_VERSION
from backend.atomic import write_atomic
from backend.directions import LoraModule, layer_cosines
from backend.tracking import TopExample, Tracker


def layer_layout(
    modules: list[LoraModule], first: dict[str, int], read_sites: dict[str, str]
) -> list[dict[str, Any]]:
    """The document's layers without results: cosines, and per direction its tracker `index`."""
    layers: dict[int, list[LoraModule]] = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)
    return [
        {
            "layer": layer,
            "cosine_similarities": layer_cosines(members),
            "projections": {
                m.module: {
                    "rank": m.rank,
                    "scaling": m.scaling,
                    "read_site": read_sites[m.name],
                    "directions": [
                        {
                            "index": first[m.name] + c,
                            "component": c,
                            "a_norm": float(m.A[c].float().norm()),
                            "b_norm": float(m.B[:, c].float().norm()),
                        }
                        for c in range(m.rank)
                    ],
                }
                for m in members
            },
        }
        for layer, members in sorted(layers.items())
    ]


def example_json(example: TopExample, tokens: dict[int, str]) -> dict[str, Any]:
    return {
        "activation": example.activation,
        "example_index": example.example_index,
        "token_index": example.token_index,
        "tokens": [tokens[i] for i in example.context_ids],
        "activations": example.context_acts,
        "target": example.target,
    }


def direction_json(layout: dict[str, Any], tracker: Tracker, tokens: dict[int, str]) -> dict:
    i = layout["index"]
    lo, hi = float(tracker.min[i]), float(tracker.max[i])
    return {
        **{key: value for key, value in layout.items() if key != "index"},
        "stats": {
            "count": int(tracker.count[i]),
            "min": lo,
            "max": hi,
            "mean": float(tracker.mean[i]),
            "std": float(tracker.std()[i]),
        },
        "histogram": tracker.histogram.export(i, lo, hi),
        "top_positive": [example_json(e, tokens) for e in tracker.top_examples(i, False)],
        "top_negative": [example_json(e, tokens) for e in tracker.top_examples(i, True)],
    }


def build_document(
    metadata: dict[str, Any], layers: list[dict], tracker: Tracker, tokens: dict[int, str]
) -> dict[str, Any]:
    """The contract's document: metadata, and the layout with every direction's results."""
    modules = [name for layer in layers for name in layer["projections"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": {
            **metadata,
            "lora_layers": [layer["layer"] for layer in layers],
            "modules": list(dict.fromkeys(modules)),
        },
        "layers": [
            {
                **layer,
                "projections": {
                    name: {
                        **projection,
                        "directions": [
                            direction_json(d, tracker, tokens) for d in projection["directions"]
                        ],
                    }
                    for name, projection in layer["projections"].items()
                },
            }
            for layer in layers
        ],
    }


def write_json_atomic(document: dict[str, Any], path: Path) -> None:
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
