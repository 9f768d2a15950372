"""Contract-valid activations data of any shape, for tests (see shared/design/data-contract.md).

Only the standard library is used, and every number comes from a seeded `random.Random`, so
the same arguments always give the same dict. `check_activations` states the invariants the
builder keeps; it can also be pointed at a real file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from itertools import pairwise

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

# Token text a dashboard must show as text and never interpret. Lone surrogates are left out:
# they are valid in JSON but cannot travel through UTF-8; tests that need one add it themselves.
HOSTILE_TOKENS = (
    "</script><img src=x onerror=alert(1)>",
    "<img src=x onerror=alert(2)>",
    "<!--",
    "</style>",
    "{{ 7*7 }}",
    "{% raw %}",
    "${alert(3)}",
    "&amp;&lt;",
    "\"'`\\",
    "\x00\x01\x1b[31m",
    "\u202eevil\u202c",
    "\u200f\u200b",
    "line\u2028sep\u2029",
    "😀👍🏽",
    "\n\n",
    "\t ",
    "",
)

WORDS = (
    " the", " model", " learned", " to", " attend", "ing", ",", ".", "\n", " of", " a", "\t",
    " LoRA", "  ", " 42", " café", "日本", " data", "(", ")", " gate", " value", "'s", " is",
)  # fmt: skip

# Where each module reads from in a Qwen2/Llama decoder layer, for realistic metadata.
READ_SITES = {
    "gate_proj": "post_attention_layernorm.output",
    "up_proj": "post_attention_layernorm.output",
    "down_proj": "down_proj.input",
    "o_proj": "o_proj.input",
}
# Modules whose write vector B lives in the residual stream; the others read from it.
RESIDUAL_WRITERS = ("down_proj", "o_proj")


def make_activations(
    n_layers: int = 2,
    modules: Sequence[str] = MLP_MODULES,
    rank: int = 1,
    k: int = 4,
    window: int = 3,
    bins: int = 10,
    seed: int = 0,
    hostile_tokens: bool = False,
    layers: Sequence[int] | None = None,
) -> dict:
    """Build a schema_version 1 activations dict.

    `layers` gives the layer numbers (default 0..n_layers-1). With `hostile_tokens`, the
    context windows start with every entry of HOSTILE_TOKENS, so all of them appear in the
    first layer when it has enough context slots (the defaults have plenty), and the dataset
    name is hostile too.
    """
    rng = random.Random(seed)
    layer_numbers = list(range(n_layers) if layers is None else layers)
    num_examples = rng.randint(50, 500)
    num_tokens = num_examples * rng.randint(20, 200)
    tokens = _token_stream(rng, hostile_tokens)
    return {
        "schema_version": 1,
        "metadata": {
            "base_model": "synthetic/Qwen2-like",
            "adapter": "synthetic/rank-1-adapter",
            "dataset": "<script>alert(4)</script>" if hostile_tokens else "synthetic:train",
            "num_examples": num_examples,
            "num_tokens": num_tokens,
            "num_processes": 1,
            "top_k": k,
            "context_window": window,
            "histogram_bins": bins,
            "dtype": "bfloat16",
            "created_at": "2025-01-01T00:00:00Z",
            "lora_layers": layer_numbers,
            "modules": list(modules),
        },
        "layers": [
            {
                "layer": number,
                "cosine_similarities": _cosine_similarities(rng, modules, rank),
                "projections": {
                    name: {
                        "rank": rank,
                        "scaling": 2.0,
                        "read_site": READ_SITES.get(name, "input_layernorm.output"),
                        "directions": [
                            _direction(rng, c, k, window, bins, num_examples, num_tokens, tokens)
                            for c in range(rank)
                        ],
                    }
                    for name in modules
                },
            }
            for number in layer_numbers
        ],
    }


def _token_stream(rng: random.Random, hostile: bool) -> Iterator[str]:
    if hostile:
        yield from HOSTILE_TOKENS
    while True:
        yield rng.choice(WORDS)


def _direction(
    rng: random.Random,
    component: int,
    k: int,
    window: int,
    bins: int,
    num_examples: int,
    count: int,
    tokens: Iterator[str],
) -> dict:
    lo, hi = -rng.uniform(0.5, 5.0), rng.uniform(0.5, 5.0)
    edges = [lo + (hi - lo) * i / bins for i in range(bins)] + [hi]
    centers = [(a + b) / 2 for a, b in pairwise(edges)]
    counts = _bell_counts(centers, width=(hi - lo) / 6, count=count)
    mean = sum(c * x for c, x in zip(counts, centers, strict=True)) / count
    var = sum(c * (x - mean) ** 2 for c, x in zip(counts, centers, strict=True)) / count
    # The k-th values bound every context activation, so no context token outranks a top-k one.
    positive = sorted([hi] + [rng.uniform(hi / 2, hi) for _ in range(k - 1)], reverse=True)
    negative = sorted([lo] + [rng.uniform(lo, lo / 2) for _ in range(k - 1)])
    bounds = (negative[-1], positive[-1])
    places = _distinct_places(rng, 2 * k, num_examples)
    return {
        "component": component,
        "a_norm": rng.uniform(0.1, 2.0),
        "b_norm": rng.uniform(0.001, 0.1),
        "stats": {"count": count, "min": lo, "max": hi, "mean": mean, "std": math.sqrt(var)},
        "histogram": {"edges": edges, "counts": counts},
        "top_positive": [
            _example(rng, v, place, window, bounds, tokens)
            for v, place in zip(positive, places[:k], strict=True)
        ],
        "top_negative": [
            _example(rng, v, place, window, bounds, tokens)
            for v, place in zip(negative, places[k:], strict=True)
        ],
    }


def _bell_counts(centers: list[float], width: float, count: int) -> list[int]:
    """Counts summing to `count`, peaked at 0, with the end bins (which hold min and max) >= 1."""
    weights = [math.exp(-((x / width) ** 2)) + 1e-3 for x in centers]
    counts = [int(count * w / sum(weights)) for w in weights]
    counts[0], counts[-1] = max(counts[0], 1), max(counts[-1], 1)
    peak = max(range(len(counts)), key=counts.__getitem__)
    counts[peak] += count - sum(counts)
    return counts


def _distinct_places(rng: random.Random, n: int, num_examples: int) -> list[tuple[int, int]]:
    """n distinct (example_index, token_index) pairs: one token is one top example at most."""
    places: set[tuple[int, int]] = set()
    while len(places) < n:
        places.add((rng.randrange(num_examples), rng.randrange(512)))
    return sorted(places, key=lambda _: rng.random())


def _example(
    rng: random.Random,
    activation: float,
    place: tuple[int, int],
    window: int,
    bounds: tuple[float, float],
    tokens: Iterator[str],
) -> dict:
    example_index, token_index = place
    target = min(token_index, window)  # clipped at the start of the sequence
    length = target + 1 + rng.randint(0, window)  # and, sometimes, at its end
    activations = [rng.uniform(*bounds) for _ in range(length)]
    activations[target] = activation
    return {
        "activation": activation,
        "example_index": example_index,
        "token_index": token_index,
        "tokens": [next(tokens) for _ in range(length)],
        "activations": activations,
        "target": target,
    }


def _cosine_similarities(rng: random.Random, modules: Sequence[str], rank: int) -> list[dict]:
    """Cosines of random unit vectors: symmetric, unit diagonal, within [-1, 1]."""
    mlp = [m for m in MLP_MODULES if m in modules]
    hidden = [f"{m}.{'A' if m == 'down_proj' else 'B'}[{c}]" for m in mlp for c in range(rank)]
    residual = [
        f"{m}.{'B' if m in RESIDUAL_WRITERS else 'A'}[{c}]" for m in modules for c in range(rank)
    ]
    spaces = [("mlp_hidden", hidden), ("residual", residual)]
    return [
        {"space": space, "labels": labels, "matrix": _random_cosines(rng, len(labels))}
        for space, labels in spaces
        if labels
    ]


def _random_cosines(rng: random.Random, n: int, dim: int = 8) -> list[list[float]]:
    vectors = [[rng.gauss(0, 1) for _ in range(dim)] for _ in range(n)]
    units = [[x / math.hypot(*v) for x in v] for v in vectors]
    return [
        [max(-1.0, min(1.0, sum(a * b for a, b in zip(u, w, strict=True)))) for w in units]
        for u in units
    ]


def check_activations(data: dict) -> None:
    """Assert the invariants of data-contract.md that a reader can check on its own."""
    meta = data["metadata"]
    assert data["schema_version"] == 1
    assert [layer["layer"] for layer in data["layers"]] == meta["lora_layers"]
    for layer in data["layers"]:
        for space in layer["cosine_similarities"]:
            n = len(space["labels"])
            assert len(space["matrix"]) == n and all(len(row) == n for row in space["matrix"])
        for name, proj in layer["projections"].items():
            assert name in meta["modules"]
            assert [d["component"] for d in proj["directions"]] == list(range(proj["rank"]))
            for direction in proj["directions"]:
                _check_direction(direction, meta)


def _check_direction(direction: dict, meta: dict) -> None:
    stats, hist = direction["stats"], direction["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 == meta["histogram_bins"] + 1
    assert sum(hist["counts"]) == stats["count"] == meta["num_tokens"]
    assert hist["edges"][0] <= stats["min"] and stats["max"] <= hist["edges"][-1]
    assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
    pos, neg = direction["top_positive"], direction["top_negative"]
    assert len(pos) <= meta["top_k"] and len(neg) <= meta["top_k"]
    assert all(e["activation"] > 0 for e in pos) and all(e["activation"] < 0 for e in neg)
    assert [e["activation"] for e in pos] == sorted((e["activation"] for e in pos), reverse=True)
    assert [e["activation"] for e in neg] == sorted(e["activation"] for e in neg)
    for example in pos + neg:
        tokens, target = example["tokens"], example["target"]
        assert len(example["activations"]) == len(tokens) <= 2 * meta["context_window"] + 1
        assert 0 <= target < len(tokens) and target <= example["token_index"]
        assert example["activations"][target] == example["activation"]
        assert example["example_index"] >= 0  # a row index: skipped rows keep theirs
        assert stats["min"] <= min(example["activations"])
        assert max(example["activations"]) <= stats["max"]
