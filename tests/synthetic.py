"""Contract-valid activations data of any shape, for tests (see shared/design/data-contract.md).

Only the standard library is used, and every number comes from a seeded `random.Random`, so
the same arguments always give the same dict. `check_activations` states the invariants the
builder keeps; it can also be pointed at a real file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
# Quantile ranges over |activation| that the samples are drawn from (one entry per sign), as
# the backend writes them, and where their value bounds sit as fractions of the extreme value.
QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
VALUE_FRACTIONS = (0.0, 0.1, 0.3, 0.6, 0.85, 1.0)
MIN_TOKEN_COUNT = 5
SCALING = 2.0


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
    extras: bool = True,
    samples: int = 2,
) -> dict:
    """Build a schema_version 1 activations dict.

    `layers` gives the layer numbers (default 0..n_layers-1). With `hostile_tokens`, the
    context windows start with every entry of HOSTILE_TOKENS, so all of them appear in the
    first layer when it has enough context slots (the defaults have plenty), and the dataset
    name is hostile too. With `extras` (the default), the file carries the optional fields of
    the contract's second part, `samples` examples per quantile range; without, it is a file
    of an older run.
    """
    rng = random.Random(seed)
    layer_numbers = list(range(n_layers) if layers is None else layers)
    num_examples = rng.randint(50, 500)
    num_tokens = num_examples * rng.randint(20, 200)
    tokens = _token_stream(rng, hostile_tokens)
    vocabulary = WORDS + HOSTILE_TOKENS if hostile_tokens else WORDS
    shape = Shape(k, window, bins, samples if extras else 0, num_examples, num_tokens, vocabulary)
    data = {
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
                "projections": _projections(rng, modules, rank, shape, tokens),
            }
            for number in layer_numbers
        ],
    }
    if extras:
        _add_run_extras(rng, data, modules, rank)
    return data


@dataclass(frozen=True)
class Shape:
    k: int
    window: int
    bins: int
    samples: int  # examples per quantile range; 0: no fields beyond the contract's first part
    num_examples: int
    num_tokens: int
    vocabulary: tuple[str, ...]  # of the token tables and logit effects


def _projections(
    rng: random.Random, modules: Sequence[str], rank: int, shape: Shape, tokens: Iterator[str]
) -> dict:
    projections = {
        name: {
            "rank": rank,
            "scaling": SCALING,
            "read_site": READ_SITES.get(name, "input_layernorm.output"),
            "directions": [_direction(rng, c, shape, tokens) for c in range(rank)],
        }
        for name in modules
    }
    if shape.samples:
        for name, projection in projections.items():
            for direction in projection["directions"]:
                _add_direction_extras(rng, name, direction, projections, shape, tokens)
    return projections


def _token_stream(rng: random.Random, hostile: bool) -> Iterator[str]:
    if hostile:
        yield from HOSTILE_TOKENS
    while True:
        yield rng.choice(WORDS)


def _direction(rng: random.Random, component: int, shape: Shape, tokens: Iterator[str]) -> dict:
    k, window, bins, count = shape.k, shape.window, shape.bins, shape.num_tokens
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
    places = _distinct_places(rng, 2 * k, shape.num_examples)
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
    # and, now and then, at its end (long reasoning traces: mostly the whole window)
    length = target + 1 + (window if rng.random() < 0.9 else rng.randint(0, window))
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


def _add_direction_extras(
    rng: random.Random,
    name: str,
    direction: dict,
    projections: dict,
    shape: Shape,
    tokens: Iterator[str],
) -> None:
    """The fields of the contract's second part, and sibling activations in every example."""
    stats = direction["stats"]
    bounds = (
        direction["top_negative"][-1]["activation"],
        direction["top_positive"][-1]["activation"],
    )
    direction["write_norm_scale"] = SCALING * direction["b_norm"]
    direction["quantile_samples"] = [
        _quantile_range(rng, q, f, sign, bounds, shape, tokens)
        for q, f in zip(pairwise(QUANTILES), pairwise(VALUE_FRACTIONS), strict=True)
        for sign in (1, -1)
    ]
    direction["top_tokens"] = _token_table(rng, stats["max"], shape.vocabulary)
    direction["bottom_tokens"] = _token_table(rng, stats["min"], shape.vocabulary)
    direction["position_profile"] = _position_profile(rng, stats, shape.num_examples)
    if name in RESIDUAL_WRITERS:
        direction["logit_effects"] = {
            "top": _logit_effects(rng, 1, shape.vocabulary),
            "bottom": _logit_effects(rng, -1, shape.vocabulary),
        }
    component = direction["component"]
    siblings = {m: p["directions"][component]["stats"] for m, p in projections.items() if m != name}
    examples = examples_of(direction)
    for example in examples:
        example["sibling_activations"] = {
            m: [rng.uniform(s["min"] / 2, s["max"] / 2) for _ in example["tokens"]]
            for m, s in siblings.items()
        }
    # A few values that were NaN/Inf: left out of the statistics, null in the contexts.
    stats["nonfinite"] = rng.choice((0, 0, 0, 7))
    stats["count"] -= stats["nonfinite"]
    counts = direction["histogram"]["counts"]
    counts[counts.index(max(counts))] -= stats["nonfinite"]
    first = examples[0]
    if stats["nonfinite"] and len(first["tokens"]) > 1:
        j = 1 - first["target"] if first["target"] < 2 else 0  # never the target itself
        first["activations"][j] = None
        for values in first["sibling_activations"].values():
            values[j] = None


def unfixed(values: list) -> list[float | None]:
    """A context's values as the page embeds them ([e, integers in units of 10**-e]), decoded."""
    e, *ints = values
    return [None if v is None else v / 10**e for v in ints]


def examples_of(direction: dict) -> list[dict]:
    """Every Example of a direction: its top lists, then its quantile samples."""
    sampled = [e for r in direction.get("quantile_samples", []) for e in r["examples"]]
    return direction["top_positive"] + direction["top_negative"] + sampled


def _quantile_range(
    rng: random.Random,
    quantiles: tuple[float, float],
    fractions: tuple[float, float],
    sign: int,
    bounds: tuple[float, float],
    shape: Shape,
    tokens: Iterator[str],
) -> dict:
    """One sign of a quantile range over |activation|, below the k-th top value."""
    extreme = bounds[1] if sign > 0 else bounds[0]
    lo, hi = sorted(f * extreme for f in fractions)
    places = _distinct_places(rng, shape.samples, shape.num_examples)
    return {
        "quantile_range": list(quantiles),
        "value_range": [lo, hi],
        "examples": [
            _example(rng, rng.uniform(lo, hi), place, shape.window, bounds, tokens)
            for place in places
        ],
    }


def _token_table(rng: random.Random, extreme: float, vocabulary: Sequence[str]) -> list[dict]:
    """Up to 10 tokens whose activations lean towards `extreme`, strongest mean first."""
    rows = []
    for token in rng.sample(vocabulary, min(10, len(vocabulary))):
        low, high = sorted((rng.uniform(0, extreme), rng.uniform(0, extreme)))
        count = rng.randint(MIN_TOKEN_COUNT, 500)
        rows.append({"token": token, "count": count, "mean": rng.uniform(low, high),
                     "max": high, "min": low})  # fmt: skip
    return sorted(rows, key=lambda row: abs(row["mean"]), reverse=True)


def _position_profile(rng: random.Random, stats: dict, num_examples: int) -> dict:
    """Power-of-two position buckets; fewer sequences reach the later ones, none the last."""
    edges = [0] + [2**i for i in range(11)]  # 0, 1, 2, 4, ..., 1024
    counts = [round(num_examples * (b - a) * max(0.0, 1 - a / 400)) for a, b in pairwise(edges)]
    mean = [rng.uniform(stats["min"] / 4, stats["max"] / 4) if c else None for c in counts]
    return {"edges": edges, "mean": mean, "count": counts}


def _logit_effects(rng: random.Random, sign: int, vocabulary: Sequence[str]) -> list[dict]:
    values = sorted((rng.uniform(0.05, 3.0) for _ in range(10)), reverse=True)
    tokens = rng.sample(vocabulary, min(10, len(vocabulary)))
    return [{"token": t, "value": sign * v} for t, v in zip(tokens, values, strict=False)]


def _add_run_extras(rng: random.Random, data: dict, modules: Sequence[str], rank: int) -> None:
    directions = [
        d
        for layer in data["layers"]
        for p in layer["projections"].values()
        for d in p["directions"]
    ]
    data["metadata"]["min_token_count"] = MIN_TOKEN_COUNT
    data["metadata"]["num_nonfinite"] = sum(d["stats"]["nonfinite"] for d in directions)
    labels = [
        f"L{layer['layer']}.{label}"
        for layer in data["layers"]
        for label in _residual_labels(modules, rank)
    ]
    data["cross_layer_cosine"] = {"labels": labels, "matrix": _random_cosines(rng, len(labels))}


def _residual_labels(modules: Sequence[str], rank: int) -> list[str]:
    """The vectors of one layer living in the residual stream: what is read, what is written."""
    return [
        f"{m}.{'B' if m in RESIDUAL_WRITERS else 'A'}[{c}]" for m in modules for c in range(rank)
    ]


def _cosine_similarities(rng: random.Random, modules: Sequence[str], rank: int) -> list[dict]:
    """Cosines of random unit vectors: symmetric, unit diagonal, within [-1, 1]."""
    mlp = [m for m in MLP_MODULES if m in modules]
    hidden = [f"{m}.{'A' if m == 'down_proj' else 'B'}[{c}]" for m in mlp for c in range(rank)]
    spaces = [("mlp_hidden", hidden), ("residual", _residual_labels(modules, rank))]
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
    """Assert the invariants of data-contract.md that a reader can check on its own; the
    optional fields of its second part are checked where present."""
    meta = data["metadata"]
    assert data["schema_version"] == 1
    assert [layer["layer"] for layer in data["layers"]] == meta["lora_layers"]
    for layer in data["layers"]:
        for space in layer["cosine_similarities"]:
            _check_square(space)
        for name, proj in layer["projections"].items():
            assert name in meta["modules"]
            assert [d["component"] for d in proj["directions"]] == list(range(proj["rank"]))
            for direction in proj["directions"]:
                c = direction["component"]
                siblings = {
                    m: p["directions"][c]["stats"]
                    for m, p in layer["projections"].items()
                    if m != name and c < p["rank"]
                }
                _check_direction(direction, meta)
                _check_direction_extras(name, proj, direction, meta, siblings)
    if "cross_layer_cosine" in data:
        _check_square(data["cross_layer_cosine"])


def _check_square(cosines: dict) -> None:
    n = len(cosines["labels"])
    assert len(cosines["matrix"]) == n and all(len(row) == n for row in cosines["matrix"])
    assert all(-1 <= v <= 1 for row in cosines["matrix"] for v in row)


def _check_direction(direction: dict, meta: dict) -> None:
    stats, hist = direction["stats"], direction["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 == meta["histogram_bins"] + 1
    assert sum(hist["counts"]) == stats["count"]
    assert stats["count"] + stats.get("nonfinite", 0) == meta["num_tokens"]
    assert hist["edges"][0] <= stats["min"] and stats["max"] <= hist["edges"][-1]
    assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
    pos, neg = direction["top_positive"], direction["top_negative"]
    assert len(pos) <= meta["top_k"] and len(neg) <= meta["top_k"]
    assert all(e["activation"] > 0 for e in pos) and all(e["activation"] < 0 for e in neg)
    assert [e["activation"] for e in pos] == sorted((e["activation"] for e in pos), reverse=True)
    assert [e["activation"] for e in neg] == sorted(e["activation"] for e in neg)
    for example in pos + neg:
        _check_example(example, stats, meta)


def _check_example(example: dict, stats: dict, meta: dict) -> None:
    tokens, target = example["tokens"], example["target"]
    assert len(example["activations"]) == len(tokens) <= 2 * meta["context_window"] + 1
    assert 0 <= target < len(tokens) and target <= example["token_index"]
    assert example["activations"][target] == example["activation"]
    assert example["example_index"] >= 0  # a row index: skipped rows keep theirs
    finite = [v for v in example["activations"] if v is not None]  # null: was NaN/Inf
    assert stats["min"] <= min(finite) and max(finite) <= stats["max"]


def _check_direction_extras(
    name: str, projection: dict, direction: dict, meta: dict, siblings: dict[str, dict]
) -> None:
    stats = direction["stats"]
    assert stats.get("nonfinite", 0) >= 0
    if "write_norm_scale" in direction:
        expected = projection["scaling"] * direction["b_norm"]
        assert math.isclose(direction["write_norm_scale"], expected, rel_tol=1e-5)
    for samples in direction.get("quantile_samples", []):
        q0, q1 = samples["quantile_range"]
        lo, hi = samples["value_range"]
        assert 0 <= q0 <= q1 <= 1 and stats["min"] <= lo <= hi <= stats["max"]
        for example in samples["examples"]:
            _check_example(example, stats, meta)
            assert lo <= example["activation"] <= hi
    for example in examples_of(direction):
        for module, values in example.get("sibling_activations", {}).items():
            assert len(values) == len(example["tokens"])
            sibling = siblings[module]
            assert all(sibling["min"] <= v <= sibling["max"] for v in values if v is not None)
    for key, sign in (("top_tokens", 1), ("bottom_tokens", -1)):
        rows = direction.get(key, [])
        assert [sign * r["mean"] for r in rows] == sorted(
            (sign * r["mean"] for r in rows), reverse=True
        )
        for row in rows:
            assert stats["min"] <= row["min"] <= row["mean"] <= row["max"] <= stats["max"]
            assert row["count"] >= meta.get("min_token_count", 1)
    if "position_profile" in direction:
        _check_position_profile(direction["position_profile"], stats)
    if "logit_effects" in direction:
        assert name in RESIDUAL_WRITERS
        top, bottom = direction["logit_effects"]["top"], direction["logit_effects"]["bottom"]
        assert [e["value"] for e in top] == sorted((e["value"] for e in top), reverse=True)
        assert [e["value"] for e in bottom] == sorted(e["value"] for e in bottom)


def _check_position_profile(profile: dict, stats: dict) -> None:
    edges, mean = profile["edges"], profile["mean"]
    assert len(edges) == len(mean) + 1 and edges[0] == 0
    assert all(a < b for a, b in pairwise(edges)) and all(isinstance(e, int) for e in edges)
    assert all(m is None or stats["min"] <= m <= stats["max"] for m in mean)
    if "count" in profile:  # an empty bucket has no mean
        counts = profile["count"]
        assert [m is None for m in mean] == [c == 0 for c in counts] and len(counts) == len(mean)
