"""The activations JSON of the data contract, assembled from the tracker and written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from backend import SCHEMA_VERSION, UserError
from backend.directions import LoraModule, layer_cosines
from backend.tracking import TopExample, Tracker


def short_floats(values: list[float]) -> list[float]:
    """float32 values as the shortest decimals that round-trip them (keeps the file small)."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32)]


def example_json(example: TopExample, decode: Callable[[int], str]) -> dict[str, Any]:
    return {
        "activation": short_floats([example.activation])[0],
        "example_index": example.example_index,
        "token_index": example.token_index,
        "tokens": [decode(i) for i in example.context_ids],
        "activations": short_floats(example.context_acts),
        "target": example.target,
    }


def direction_json(
    tracker: Tracker, index: int, module: LoraModule, component: int, decode: Callable[[int], str]
) -> dict[str, Any]:
    count = int(tracker.count[index])
    lo, hi = float(tracker.min[index]), float(tracker.max[index])
    return {
        "component": component,
        "a_norm": float(module.A[component].float().norm()),
        "b_norm": float(module.B[:, component].float().norm()),
        "stats": {
            "count": count,
            "min": lo,
            "max": hi,
            "mean": float(tracker.mean[index]),
            "std": float(tracker.std()[index]),
        },
        "histogram": tracker.histogram.export(index, lo, hi),
        "top_positive": [example_json(e, decode) for e in tracker.top_examples(index, False)],
        "top_negative": [example_json(e, decode) for e in tracker.top_examples(index, True)],
    }


def build_document(
    metadata: dict[str, Any],
    modules: list[LoraModule],
    first: dict[str, int],  # module name -> tracker index of its component 0
    read_sites: dict[str, str],  # module name -> read site label
    tracker: Tracker,
    decode: Callable[[int], str],
) -> dict[str, Any]:
    layers: dict[int, list[LoraModule]] = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": {
            **metadata,
            "lora_layers": sorted(layers),
            "modules": list(dict.fromkeys(m.module for m in modules)),
        },
        "layers": [
            {
                "layer": layer,
                "cosine_similarities": layer_cosines(members),
                "projections": {
                    m.module: {
                        "rank": m.rank,
                        "scaling": m.scaling,
                        "read_site": read_sites[m.name],
                        "directions": [
                            direction_json(tracker, first[m.name] + c, m, c, decode)
                            for c in range(m.rank)
                        ],
                    }
                    for m in members
                },
            }
            for layer, members in sorted(layers.items())
        ],
    }


def write_json_atomic(document: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, allow_nan=False, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
