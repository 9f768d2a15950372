"""Activations data of any shape, valid by backend.contract.validate, for tests (the format:
docs/data-format.md).

Besides the contract, only the standard library is used, and every number comes from a seeded
`random.Random`, so the same arguments always give the same dict. `assert_consistent` states the
invariants between the numbers that the builder keeps beyond the format; it can also be pointed
at a real file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from backend.contract import (
    ATTRIBUTION_LISTS,
    CLAMPS,
    COMPOSITION_SIZE,
    MODULE_ORDER,
    NEURON_SUMMARIES,
    QUANTILE_CUTS,
    SIGNS,
    iter_directions,
    iter_examples,
    spaces,
    vector_label,
    writes_residual,
)
from backend.scoring import difference_ci, mean_ci

MLP_MODULES = MODULE_ORDER[:3]

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
# Quantile ranges over |activation| that the samples are drawn from (one entry per sign), as
# the backend writes them, and where their value bounds sit as fractions of the extreme value.
QUANTILES = (*QUANTILE_CUTS, 1.0)
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
    samples: int = 2,
    effects: bool = False,
    explanations: bool = False,
    baseline_neurons: int = 0,
    sae: int = 0,
) -> dict:
    """Build a schema_version 1 activations dict with every field of the format, `samples`
    examples per quantile range.

    With `effects`, the file also has the causal effects of --effects (`_add_effects`), drawn
    from a generator of their own: the rest of the dict is the same as without them. Likewise
    `baseline_neurons` N adds N baseline neurons per layer (`_add_baseline_neurons`), and
    `explanations` the scored explanations of --explain (`_add_explanations`) for every
    direction, every baseline neuron and both signs, with the run's summary.

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
    vocabulary = WORDS + HOSTILE_TOKENS if hostile_tokens else WORDS
    shape = Shape(k, window, bins, samples, num_examples, num_tokens, vocabulary)
    data = {
        "schema_version": 1,
        "metadata": {
            "base_model": "synthetic/Qwen2-like",
            "adapter": "synthetic/rank-1-adapter",
            "dataset": "<script>alert(4)</script>" if hostile_tokens else "synthetic:train",
            "num_examples": num_examples,
            "num_tokens": num_tokens,
            "num_truncated": 0,
            "num_skipped_rows": 0,
            "num_processes": 1,
            "top_k": k,
            "context_window": window,
            "histogram_bins": bins,
            "dtype": "bfloat16",
            "max_length": None,
            "below_median_contexts": 0,
            "created_at": "2025-01-01T00:00:00Z",
            "lora_layers": layer_numbers,
            "modules": list(modules) if layer_numbers else [],  # the modules of the layers
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
    _add_run_extras(rng, data, modules, rank)
    if effects:
        _add_effects(random.Random(f"effects-{seed}"), data, window)
    if baseline_neurons:
        _add_baseline_neurons(random.Random(f"neurons-{seed}"), data, baseline_neurons, shape)
    if explanations:
        _add_explanations(random.Random(f"explanations-{seed}"), data, hostile_tokens)
    if sae:
        _add_sae(random.Random(f"sae-{seed}"), data, sae, shape, explanations)
    return data


@dataclass(frozen=True)
class Shape:
    k: int
    window: int
    bins: int
    samples: int  # examples per quantile range
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
        "occurrences": 1 + token_index % 3,  # a window seen once, or repeated
    }


def _add_direction_extras(
    rng: random.Random,
    name: str,
    direction: dict,
    projections: dict,
    shape: Shape,
    tokens: Iterator[str],
) -> None:
    """The fields of the analyses beyond top-k, and sibling activations in every example."""
    stats = direction["stats"]
    direction["write_norm_scale"] = SCALING * direction["b_norm"]
    _add_summaries(rng, direction, shape, tokens)
    if writes_residual(name):
        direction["logit_effects"] = {
            "top": _logit_effects(rng, 1, shape.vocabulary),
            "bottom": _logit_effects(rng, -1, shape.vocabulary),
        }
    siblings = _sibling_stats(name, direction["component"], projections)
    examples = list(iter_examples(direction))
    _add_siblings(rng, examples, siblings)
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


def _add_summaries(
    rng: random.Random, direction: dict, shape: Shape, tokens: Iterator[str]
) -> None:
    """The quantile samples, token tables and position profile of a direction (or neuron)."""
    stats = direction["stats"]
    bounds = (
        direction["top_negative"][-1]["activation"],
        direction["top_positive"][-1]["activation"],
    )
    direction["quantile_samples"] = [
        _quantile_range(rng, q, f, sign, bounds, shape, tokens)
        for sign in (1, -1)
        for q, f in zip(pairwise(QUANTILES), pairwise(VALUE_FRACTIONS), strict=True)
    ]
    direction["top_tokens"] = _token_table(rng, stats["max"], shape.vocabulary)
    direction["bottom_tokens"] = _token_table(rng, stats["min"], shape.vocabulary)
    direction["position_profile"] = _position_profile(rng, stats, shape.num_examples)


def _sibling_stats(module: str, component: int, projections: dict) -> dict[str, dict]:
    """The stats of the same component of the layer's other modules."""
    return {m: p["directions"][component]["stats"] for m, p in projections.items() if m != module}


def _add_siblings(rng: random.Random, examples: list[dict], siblings: dict[str, dict]) -> None:
    for example in examples:
        example["sibling_activations"] = {
            m: [rng.uniform(s["min"] / 2, s["max"] / 2) for _ in example["tokens"]]
            for m, s in siblings.items()
        }


def unfixed(values: list) -> list[float | None]:
    """A context's values as the page embeds them ([e, integers in units of 10**-e]), decoded."""
    e, *ints = values
    return [None if v is None else v / 10**e for v in ints]


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
        "sign": sign,
        "cut": quantiles[0],
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
    directions = [ref.direction for ref in iter_directions(data)]
    data["metadata"]["min_token_count"] = MIN_TOKEN_COUNT
    data["metadata"]["num_nonfinite"] = sum(d["stats"]["nonfinite"] for d in directions)
    labels = [
        label
        for layer in data["layers"]
        for label in _residual_labels(modules, rank, layer["layer"])
    ]
    data["cross_layer_cosine"] = {"labels": labels, "matrix": _random_cosines(rng, len(labels))}


def _residual_labels(modules: Sequence[str], rank: int, layer: int | None = None) -> list[str]:
    """The vectors of one layer living in the residual stream: what is read, what is written
    (labelled with their layer when `layer` is given)."""
    return [
        vector_label(m, "B" if writes_residual(m) else "A", c, layer)
        for m in modules
        for c in range(rank)
    ]


def _cosine_similarities(rng: random.Random, modules: Sequence[str], rank: int) -> list[dict]:
    """Cosines of random unit vectors: symmetric, unit diagonal, within [-1, 1]."""
    mlp = [m for m in MLP_MODULES if m in modules]
    hidden = [
        vector_label(m, "A" if spaces(m)[0] == "mlp_hidden" else "B", c)
        for m in mlp
        for c in range(rank)
    ]
    by_space = [("mlp_hidden", hidden), ("residual", _residual_labels(modules, rank))]
    return [
        {"space": space, "labels": labels, "matrix": _random_cosines(rng, len(labels))}
        for space, labels in by_space
        if labels
    ]


def _random_cosines(rng: random.Random, n: int, dim: int = 8) -> list[list[float]]:
    vectors = [[rng.gauss(0, 1) for _ in range(dim)] for _ in range(n)]
    units = [[x / math.hypot(*v) for x in v] for v in vectors]
    return [
        [max(-1.0, min(1.0, sum(a * b for a, b in zip(u, w, strict=True)))) for w in units]
        for u in units
    ]


# --effects: rows the effects ran on, the directions pinned, the prompts of their samples.
EFFECT_ROWS = 3
EFFECTS_MAX_LENGTH = 2048
PINNED = 3
PROMPTS = 2
PROMPT_LENGTH = 8


def _add_effects(rng: random.Random, data: dict, window: int) -> None:
    """The top-level and per-direction effects of a run with --effects: rows 0..EFFECT_ROWS-1,
    stored in `examples`; every direction's ablation and attribution, its attribution examples
    taken from those rows; the PINNED directions of largest ablation_kl steered on the first
    PROMPTS rows with every clamp, some continuations diverging from the plain one."""
    rows = [[rng.choice(WORDS) for _ in range(rng.randint(24, 40))] for _ in range(EFFECT_ROWS)]
    data["examples"] = {str(i): {"tokens": row, "source": "synthetic:train"} for i, row in
                        enumerate(rows)}  # fmt: skip
    refs = list(iter_directions(data))
    projections = {layer["layer"]: layer["projections"] for layer in data["layers"]}
    k = data["metadata"]["top_k"]
    for ref in refs:
        kl = rng.lognormvariate(-6, 1.5)
        dloss = kl * rng.uniform(-0.5, 1.5)
        effects = {
            "ablation_kl": kl,
            "ablation_dloss": dloss,
            "attribution": dloss * rng.uniform(0.6, 1.4) + rng.gauss(0, kl / 10),
        }
        places = sorted(
            {(rng.randrange(EFFECT_ROWS), rng.randrange(20)) for _ in range(2 * k)},
            key=lambda _: rng.random(),
        )
        stats = ref.direction["stats"]
        examples = [_attribution_example(rng, rows, place, window, stats) for place in places]
        effects["top_attribution"] = sorted(
            (e for e in examples if e["attribution"] > 0), key=lambda e: -e["attribution"]
        )[:k]
        effects["bottom_attribution"] = sorted(
            (e for e in examples if e["attribution"] < 0), key=lambda e: e["attribution"]
        )[:k]
        siblings = _sibling_stats(ref.module, ref.component, projections[ref.layer])
        _add_siblings(rng, [e for side in ATTRIBUTION_LISTS for e in effects[side]], siblings)
        ref.direction["effects"] = effects
    kl_tokens = {str(i): [rng.expovariate(50.0) for _ in row[1:]] for i, row in enumerate(rows)}
    positions = [v for values in kl_tokens.values() for v in values]
    data["effects"] = {
        "num_examples": EFFECT_ROWS,
        "num_tokens": len(positions),
        "max_length": EFFECTS_MAX_LENGTH,
        "kl_vs_base": sum(positions) / len(positions),
        "attribution_spearman": spearman(
            [ref.direction["effects"]["attribution"] for ref in refs],
            [ref.direction["effects"]["ablation_dloss"] for ref in refs],
        ),
        "layers": [
            _group_effect(
                rng, "layer", layer["layer"], [r for r in refs if r.layer == layer["layer"]]
            )
            for layer in data["layers"]
        ],
        "modules": [
            _group_effect(rng, "module", module, [r for r in refs if r.module == module])
            for module in data["metadata"]["modules"]
        ],
        "kl_tokens": kl_tokens,
        "prompts": [
            {"example_index": i, "tokens": rows[i][:PROMPT_LENGTH]} for i in range(PROMPTS)
        ],
        "steering": _steering(rng, refs),
    }


def _attribution_example(
    rng: random.Random, rows: list[list[str]], place: tuple[int, int], window: int, stats: dict
) -> dict:
    """The window of a row around a position t < n - 1 (the last token predicts nothing), with
    activations inside the direction's range and attributions below the target's in size."""
    row, position = place
    tokens = rows[row]
    target = min(position, window)
    context = tokens[position - target : position + window + 1]
    attribution = rng.choice((1, -1)) * rng.uniform(1e-3, 1e-2)
    attributions = [rng.uniform(-1, 1) * abs(attribution) / 2 for _ in context]
    attributions[target] = attribution
    activations = [rng.uniform(stats["min"] / 2, stats["max"] / 2) for _ in context]
    return {
        "activation": activations[target],
        "example_index": row,
        "token_index": position,
        "tokens": context,
        "activations": activations,
        "target": target,
        "occurrences": 1,
        "attribution": attribution,
        "attributions": attributions,
    }


def _group_effect(rng: random.Random, key: str, name: object, refs: list) -> dict:
    """A group's ablation: near the sum of its directions' (they interact)."""
    return {key: name} | {
        measure: sum(r.direction["effects"][measure] for r in refs) * rng.uniform(0.9, 1.3)
        for measure in ("ablation_kl", "ablation_dloss")
    }


def _steering(rng: random.Random, refs: list) -> list[dict]:
    """Each pinned direction's continuation of each prompt under each clamp: the plain one
    ("none"), and the others either equal to it or diverging from it at some token."""
    pinned = sorted(refs, key=lambda r: -r.direction["effects"]["ablation_kl"])[:PINNED]
    entries = []
    for ref in pinned:
        stats = ref.direction["stats"]
        values = {"min": stats["min"], "zero": 0.0, "max": stats["max"], "none": None}
        for prompt in range(PROMPTS):
            plain = [rng.choice(WORDS) for _ in range(12)]
            for clamp in CLAMPS:
                diverges = rng.randint(0, len(plain)) if clamp != "none" else len(plain)
                tokens = plain[:diverges] + [rng.choice(WORDS) for _ in plain[diverges:]]
                entries.append({
                    "layer": ref.layer,
                    "module": ref.module,
                    "component": ref.component,
                    "prompt_index": prompt,
                    "clamp": clamp,
                    "value": values[clamp],
                    "text": "".join(tokens),
                    "tokens": tokens,
                })  # fmt: skip
    return entries


# --baseline-neurons: the width of the MLP hidden space they are drawn from.
MLP_HIDDEN = 4864


def _add_baseline_neurons(rng: random.Random, data: dict, per_layer: int, shape: Shape) -> None:
    """`per_layer` seeded coordinates of each layer's MLP hidden space, summarised as
    directions are (their own token stream; no NaN among them)."""
    tokens = _token_stream(rng, hostile=False)
    neurons = []
    for layer in data["metadata"]["lora_layers"]:
        for index in sorted(rng.sample(range(MLP_HIDDEN), per_layer)):
            neuron = _direction(rng, 0, shape, tokens)
            _add_summaries(rng, neuron, shape, tokens)
            neuron["stats"]["nonfinite"] = 0
            summaries = {key: neuron[key] for key in NEURON_SUMMARIES}
            tables = {key: neuron[key] for key in ("top_tokens", "bottom_tokens")}
            neurons.append({"layer": layer, "neuron": index, **summaries, **tables})
    data["baseline_neurons"] = neurons


# --explain: scoring contexts per class (activating, not), the bootstrap's resamples.
CONTEXTS_PER_CLASS = 4
RESAMPLES = 200
HOSTILE_EXPLANATION = "<img src=x onerror=alert(5)> {{ 7*7 }} & tokens"


def _add_explanations(rng: random.Random, data: dict, hostile: bool) -> None:
    """An explanation for each sign of every direction and baseline neuron, each scored with
    an interval, a direction's shuffled baseline scoring lower (a neuron has none); the run's
    summary computed from them. With `hostile`, the first explanation's text is markup. The
    last direction's negative shuffled fuzzing has no context scored: a null score."""
    lora = [ref.direction for ref in iter_directions(data)]
    neurons = data.get("baseline_neurons", [])
    for i, feature in enumerate(lora + neurons):  # with `hostile`, the first text is
        feature["explanations"] = {sign: _explanation(rng, hostile and i == 0) for sign in SIGNS}
    for neuron in neurons:
        for entry in neuron["explanations"].values():
            del entry["shuffled"]
    if lora:
        last = lora[-1]["explanations"]["negative"]["shuffled"]
        last["fuzzing"] = {"score": None, "ci": None, "n": 0}
    summary = {
        "lora": _group(rng, [e for d in lora for e in d["explanations"].values()]),
        "shuffled": _group(rng, [e["shuffled"] for d in lora for e in d["explanations"].values()]),
    }
    if neurons:
        explained = [e for d in neurons for e in d["explanations"].values()]
        summary["neurons"] = _group(rng, explained)
        summary["lora_minus_neurons"] = {
            measure: _difference(rng, _scores(lora, measure), _scores(neurons, measure))
            for measure in ("detection", "fuzzing")
        }
    features = len(lora) + len(neurons)
    data["explanations"] = {
        "explainer": "synthetic/explainer",
        "scorer": "synthetic/scorer",
        "num_prompts": features * (1 + 8 * CONTEXTS_PER_CLASS),
        "num_tokens": features * rng.randint(2000, 30000),
        "seconds": round(rng.uniform(1, 1000), 1),
        "summary": summary,
        "settings": {
            "contexts_per_class": CONTEXTS_PER_CLASS,
            "context_tokens": 3,
            "bootstrap_resamples": RESAMPLES,
            "seed": 0,
        },
    }


# --sae: one latent in DEAD_EVERY never fires; the demo explains its most frequent features.
DEAD_EVERY = 40
EXPLAINED_FEATURES = 32
SPARSITY = 0.75  # the share of a feature's context tokens where it is 0


def _add_sae(
    rng: random.Random, data: dict, n_features: int, shape: Shape, explained: bool
) -> None:
    """An SAE of `n_features` live latents (and a dead one after every DEAD_EVERY - 1), each
    summarised as a direction is but >= 0 and sparse in its contexts, composed of
    COMPOSITION_SIZE random directions of the layers; its own token stream."""
    tokens = _token_stream(rng, hostile=False)
    refs = list(iter_directions(data))
    num_latents = n_features + n_features // (DEAD_EVERY - 1)
    dead = list(range(DEAD_EVERY - 1, num_latents, DEAD_EVERY))[: num_latents - n_features]
    live = sorted(set(range(num_latents)) - set(dead))
    residual = any(writes_residual(ref.module) for ref in refs)
    features = [_feature(rng, index, refs, shape, tokens, residual) for index in live]
    if explained:
        frequent = sorted(features, key=lambda f: -f["frequency"])[:EXPLAINED_FEATURES]
        for feature in frequent:
            explanation = _explanation(rng, hostile=False)
            del explanation["shuffled"]
            feature["explanations"] = {"positive": explanation}
    modules = data["metadata"]["modules"]
    weights = [rng.uniform(0.1, 1.0) for _ in modules]
    fvu = rng.uniform(0.05, 0.3)
    data["sae"] = {
        "num_latents": num_latents,
        "k": min(16, num_latents - 1),
        "threshold": rng.uniform(0.01, 0.5),
        "fvu": fvu,
        "fvu_heldout": fvu * rng.uniform(1.0, 1.2),
        "l0": rng.uniform(8, 24),
        "dead_fraction": len(dead) / num_latents,
        "num_tokens": shape.num_tokens,
        "path": "synthetic.sae.safetensors",
        "features": features,
        "dead": dead,
        "error_share": {m: w / sum(weights) for m, w in zip(modules, weights, strict=True)},
        "training": {
            "steps": shape.num_tokens // 512,
            "batch_size": 512,
            "learning_rate": 5e-4,
            "seed": 0,
            "seconds": round(rng.uniform(1, 100), 1),
        },
    }


def _feature(
    rng: random.Random, index: int, refs: list, shape: Shape, tokens: Iterator[str], residual: bool
) -> dict:
    """One latent: 0 on all but `frequency` of the tokens, its top examples and quantile
    samples on the positive side only."""
    k, bins, count = shape.k, shape.bins, shape.num_tokens
    frequency = 10 ** rng.uniform(-4, -0.5)
    hi = rng.uniform(0.5, 20.0)
    edges = [hi * i / bins for i in range(bins)] + [hi]
    fired = max(bins, round(frequency * count))
    decay = [math.exp(-3 * i / bins) for i in range(bins)]
    counts = [max(1, int(fired * w / sum(decay))) for w in decay]
    counts[0] += count - sum(counts)  # the zeros
    centers = [(a + b) / 2 for a, b in pairwise(edges)]
    centers[0] = 0.0
    mean = sum(c * x for c, x in zip(counts, centers, strict=True)) / count
    var = sum(c * (x - mean) ** 2 for c, x in zip(counts, centers, strict=True)) / count
    top = sorted([hi] + [rng.uniform(hi / 2, hi) for _ in range(k - 1)], reverse=True)
    bounds = (0.0, top[-1])
    places = _distinct_places(rng, k, shape.num_examples)
    feature = {
        "index": index,
        "frequency": frequency,
        "stats": {
            "count": count,
            "min": 0.0,
            "max": hi,
            "mean": mean,
            "std": math.sqrt(var),
            "nonfinite": 0,
        },
        "histogram": {"edges": edges, "counts": counts},
        "top_positive": [
            _example(rng, v, place, shape.window, bounds, tokens)
            for v, place in zip(top, places, strict=True)
        ],
        "quantile_samples": [
            _quantile_range(rng, q, f, 1, bounds, shape, tokens)
            for q, f in zip(pairwise(QUANTILES), pairwise(VALUE_FRACTIONS), strict=True)
        ],
        "top_tokens": _token_table(rng, hi, shape.vocabulary),
        "position_profile": _position_profile(rng, {"min": 0.0, "max": hi}, shape.num_examples),
        "composition": _composition(rng, refs),
    }
    for example in iter_examples(feature):  # sparse: mostly 0 around its token
        values = example["activations"]
        for j in range(len(values)):
            if j != example["target"] and rng.random() < SPARSITY:
                values[j] = 0.0
    if residual:
        feature["logit_effects"] = {
            "top": _logit_effects(rng, 1, shape.vocabulary),
            "bottom": _logit_effects(rng, -1, shape.vocabulary),
        }
    return feature


def _composition(rng: random.Random, refs: list) -> list[dict]:
    """COMPOSITION_SIZE distinct directions (all, where there are fewer) with signed weights,
    largest |weight| first."""
    chosen = rng.sample(refs, min(COMPOSITION_SIZE, len(refs)))
    entries = [
        {"layer": r.layer, "module": r.module, "component": r.component,
         "weight": rng.choice((1, -1)) * rng.uniform(0.01, 1.0)}
        for r in chosen
    ]  # fmt: skip
    return sorted(entries, key=lambda e: -abs(e["weight"]))


def _explanation(rng: random.Random, hostile: bool) -> dict:
    words = [w.strip() or "space" for w in rng.sample(WORDS, 3)]
    text = HOSTILE_EXPLANATION if hostile else f'"{words[0]}" after {words[1]} and {words[2]}'
    return {
        "text": text,
        "detection": _score(rng, 0.5, 1.0) | {"auroc": rng.uniform(0.4, 1.0)},
        "fuzzing": _score(rng, 0.5, 1.0),
        "shuffled": {
            "detection": _score(rng, 0.25, 0.75) | {"auroc": rng.uniform(0.3, 0.7)},
            "fuzzing": _score(rng, 0.25, 0.75),
        },
    }


def _score(rng: random.Random, low: float, high: float) -> dict:
    """A balanced accuracy over CONTEXTS_PER_CLASS contexts of each class, near [low, high],
    with an interval around it."""
    n = CONTEXTS_PER_CLASS
    hits = [rng.randint(round(low * n), round(high * n)) for _ in range(2)]
    score = sum(hits) / (2 * n)
    return {"score": score, "ci": _interval(rng, score), "n": 2 * n}


def _interval(rng: random.Random, value: float, low: float = 0.0) -> list[float]:
    return [max(low, value - rng.uniform(0, 0.3)), min(1.0, value + rng.uniform(0, 0.3))]


def _scores(features: list[dict], measure: str) -> list[float]:
    """Every non-null score of `measure` over both signs of `features`."""
    return [
        e[measure]["score"]
        for d in features
        for e in d["explanations"].values()
        if e[measure]["score"] is not None
    ]


def _group(rng: random.Random, explanations: list[dict]) -> dict:
    """Per measure, the mean of the scores that are not null, with its bootstrap interval."""
    group = {}
    for measure in ("detection", "fuzzing"):
        values = [e[measure]["score"] for e in explanations if e[measure]["score"] is not None]
        group[measure] = mean_ci(values, RESAMPLES, rng.randrange(2**31))
    return group


def _difference(rng: random.Random, a: list[float], b: list[float]) -> dict:
    return difference_ci(a, b, RESAMPLES, rng.randrange(2**31))


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's correlation with average ranks for ties; None below 3 values or where either
    is constant."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in order[i : j + 1]:
            ranks[m] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def assert_consistent(data: dict) -> None:
    """Assert what the numbers of a valid file (backend.contract.validate) must also agree on,
    beyond its format: orders, signs and ranges, against the direction's own statistics."""
    meta = data["metadata"]
    for cosines in (
        data["cross_layer_cosine"],
        *(c for layer in data["layers"] for c in layer["cosine_similarities"]),
    ):
        assert all(-1 <= v <= 1 for row in cosines["matrix"] for v in row)
    layers = {layer["layer"]: layer["projections"] for layer in data["layers"]}
    for ref in iter_directions(data):
        direction, stats = ref.direction, ref.direction["stats"]
        siblings = {
            m: p["directions"][ref.component]["stats"]
            for m, p in layers[ref.layer].items()
            if m != ref.module and ref.component < p["rank"]
        }
        assert stats["count"] + stats["nonfinite"] == meta["num_tokens"]
        assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
        edges = direction["histogram"]["edges"]
        assert edges[0] <= stats["min"] and stats["max"] <= edges[-1]
        assert math.isclose(
            direction["write_norm_scale"],
            ref.projection["scaling"] * direction["b_norm"],
            rel_tol=1e-5,
        )
        _assert_top_lists(direction)
        for example in iter_examples(direction):
            _assert_within(example["activations"], stats)
            for module, values in example.get("sibling_activations", {}).items():
                _assert_within(values, siblings[module])
        _assert_samples(direction)
        _assert_token_tables(direction, meta)
        _assert_position_profile(direction["position_profile"], stats)
    for feature in data.get("sae", {}).get("features", []):  # >= 0: positive lists only
        stats = feature["stats"]
        assert 0 <= stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
        top = [e["activation"] for e in feature["top_positive"]]
        assert all(v > 0 for v in top) and top == sorted(top, reverse=True)
        for example in iter_examples(feature):
            _assert_within(example["activations"], stats)
        _assert_samples(feature)
        _assert_token_tables(feature, meta)
        _assert_position_profile(feature["position_profile"], stats)


def _assert_samples(direction: dict) -> None:
    """Each quantile range's examples lie within its values, and those within the stats."""
    stats = direction["stats"]
    for samples in direction["quantile_samples"]:
        lo, hi = samples["value_range"]
        assert stats["min"] <= lo <= hi <= stats["max"]
        assert all(lo <= e["activation"] <= hi for e in samples["examples"])


def _assert_within(values: list[float | None], stats: dict) -> None:
    """Values of a context (null: was NaN/Inf) lie within the direction's min and max."""
    assert all(stats["min"] <= v <= stats["max"] for v in values if v is not None)


def _assert_top_lists(direction: dict) -> None:
    """Largest first, most negative first; logit effects likewise."""
    pos = [e["activation"] for e in direction["top_positive"]]
    neg = [e["activation"] for e in direction["top_negative"]]
    assert all(v > 0 for v in pos) and all(v < 0 for v in neg)
    assert pos == sorted(pos, reverse=True) and neg == sorted(neg)
    if "logit_effects" in direction:
        top = [e["value"] for e in direction["logit_effects"]["top"]]
        bottom = [e["value"] for e in direction["logit_effects"]["bottom"]]
        assert top == sorted(top, reverse=True) and bottom == sorted(bottom)


def _assert_token_tables(direction: dict, meta: dict) -> None:
    stats = direction["stats"]
    for key, sign in (("top_tokens", 1), ("bottom_tokens", -1)):
        means = [sign * r["mean"] for r in direction.get(key, [])]
        assert means == sorted(means, reverse=True)
        for row in direction.get(key, []):
            assert stats["min"] <= row["min"] <= row["mean"] <= row["max"] <= stats["max"]
            assert row["count"] >= meta["min_token_count"]


def _assert_position_profile(profile: dict, stats: dict) -> None:
    edges, mean, counts = profile["edges"], profile["mean"], profile["count"]
    assert edges[0] == 0 and all(a < b for a, b in pairwise(edges))
    assert all(m is None or stats["min"] <= m <= stats["max"] for m in mean)
    assert [m is None for m in mean] == [c == 0 for c in counts]  # an empty bucket has no mean
