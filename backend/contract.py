"""The activations JSON's contract in code: every fact about the format that more than one part
of the project needs (the writer, the dashboard, the page, the tests) lives here once.

The format itself is described field by field in docs/data-format.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn

from backend import UserError

SCHEMA_VERSION = 1

# Display and analysis order within a layer: the MLP in data-flow order, then attention in
# q, k, v, o order, then any other adapted module by name.
MODULE_ORDER = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")

# The space each known module reads from (A) and writes to (B). Cosines are only taken between
# vectors of one space; an unknown module gets spaces of its own.
SPACES = {
    "gate_proj": ("residual", "mlp_hidden"),
    "up_proj": ("residual", "mlp_hidden"),
    "down_proj": ("mlp_hidden", "residual"),
    "q_proj": ("residual", "attn_query"),
    "k_proj": ("residual", "attn_key"),
    "v_proj": ("residual", "attn_value"),
    "o_proj": ("attn_output", "residual"),
}

# The lists of Examples a direction carries, besides those inside its quantile samples.
EXAMPLE_LISTS = ("top_positive", "top_negative")
# The lists of attribution Examples inside a direction's `effects` (runs with --effects).
ATTRIBUTION_LISTS = ("top_attribution", "bottom_attribution")
# What a pinned direction's activation is clamped to in effects.steering: its observed minimum,
# zero, its observed maximum, or nothing (the plain continuation, to compare against).
CLAMPS = ("min", "zero", "max", "none")
# The nominal quantiles of |activation| at which a sign's quantile ranges start (QuantileRange.cut).
QUANTILE_CUTS = (0.0, 0.5, 0.9, 0.99, 0.999)


def module_order(module: str) -> tuple[int, str]:
    """Sort key of a module's short name (e.g. "gate_proj") in MODULE_ORDER."""
    if module in MODULE_ORDER:
        return MODULE_ORDER.index(module), ""
    return len(MODULE_ORDER), module


def spaces(module: str) -> tuple[str, str]:
    """(read space, write space) of a module: where its A rows and its B columns live."""
    return SPACES.get(module, (f"{module}.input", f"{module}.output"))


def writes_residual(module: str) -> bool:
    return spaces(module)[1] == "residual"


def direction_key(layer: int, module: str, component: int) -> str:
    """A direction's name in every file of one adapter (notes, links): "L12.gate_proj[0]"."""
    return f"L{layer}.{module}[{component}]"


def direction_name(module: str, component: int, rank: int) -> str:
    """A direction's name within its layer: "gate_proj", or "gate_proj[1]" where rank > 1."""
    return f"{module}[{component}]" if rank > 1 else module


def neuron_key(layer: int, neuron: int) -> str:
    """A baseline neuron's name, as a direction's key names a direction: "L12.neuron[4096]"
    (coordinate 4096 of layer 12's MLP hidden space)."""
    return f"L{layer}.neuron[{neuron}]"


def feature_key(index: int) -> str:
    """An SAE feature's name in every file of one run (links): "SAE.feature[17]" (latent 17)."""
    return f"SAE.feature[{index}]"


def vector_label(module: str, side: str, component: int, layer: int | None = None) -> str:
    """A read (side "A") or write ("B") vector: "gate_proj.A[0]", or "L3.gate_proj.A[0]"
    across layers."""
    label = f"{module}.{side}[{component}]"
    return label if layer is None else f"L{layer}.{label}"


@dataclass(frozen=True)
class DirectionRef:
    """One direction of a document, with where it sits."""

    layer: int
    module: str
    projection: dict[str, Any]
    direction: dict[str, Any]

    @property
    def component(self) -> int:
        return self.direction["component"]

    @property
    def key(self) -> str:
        return direction_key(self.layer, self.module, self.component)

    @property
    def name(self) -> str:
        return direction_name(self.module, self.component, self.projection["rank"])


def iter_directions(document: dict[str, Any]) -> Iterator[DirectionRef]:
    """Every direction of the document, by layer, then module in MODULE_ORDER, then component."""
    for layer in document["layers"]:
        modules = sorted(layer["projections"].items(), key=lambda item: module_order(item[0]))
        for module, projection in modules:
            for direction in projection["directions"]:
                yield DirectionRef(layer["layer"], module, projection, direction)


def example_holders(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Everything of the document that carries Examples (what iter_examples reads): every
    direction (iter_directions' order), then every baseline neuron (--baseline-neurons), then
    every SAE feature (--sae)."""
    for ref in iter_directions(document):
        yield ref.direction
    yield from document.get("baseline_neurons", ())
    yield from iter_features(document)


def iter_features(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every SAE feature of the document (runs with --sae), by index."""
    yield from document.get("sae", {}).get("features", ())


def iter_examples(direction: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every Example a direction (or a neuron, or an SAE feature) carries: its top lists (a
    feature has no top_negative), its quantile samples, then its attribution lists (runs with
    --effects)."""
    for _, example in examples_at(direction):
        yield example


def examples_at(direction: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """iter_examples with each Example's path below the direction's `path`."""
    for side in EXAMPLE_LISTS:
        for j, example in enumerate(direction.get(side, ())):
            yield f"{path}.{side}[{j}]", example
    for r, samples in enumerate(direction["quantile_samples"]):
        for j, example in enumerate(samples["examples"]):
            yield f"{path}.quantile_samples[{r}].examples[{j}]", example
    for side in ATTRIBUTION_LISTS if "effects" in direction else ():
        for j, example in enumerate(direction["effects"][side]):
            yield f"{path}.effects.{side}[{j}]", example


# ---- validate(): the format of docs/data-format.md, field by field ------------------------
#
# A spec checks one value at a path and raises ContractError naming it. Objects are tables of
# their fields (required, then optional: the format grows by adding fields, so keys a table does
# not name are accepted), each with rules for the fields that must agree; `_agreements` then
# checks what ties the whole document together (metadata against the layers).


class ContractError(UserError):
    """A document that breaks the format: the message starts with the path of the first bad
    field, e.g. `layers[3].projections.gate_proj.directions[0].stats.count: expected ...`."""


Spec = Callable[[Any, str], None]


def _fail(path: str, problem: str) -> NoReturn:
    raise ContractError(f"{path or 'the document'}: {problem}")


def _show(value: Any) -> str:
    """A value as JSON, cut short: an error message is one line."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(path: str, key: str) -> str:
    """The path of an object's field: "a.b", or 'a["12"]' for a key that is not a name."""
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


@dataclass(frozen=True)
class Scalar:
    """A JSON scalar. `accepts_all` (optional) tells at C speed whether a whole list is
    accepted: a large file holds millions of numbers. Where it says no, or is absent, `accepts`
    is tried value by value."""

    expected: str
    accepts: Callable[[Any], bool]
    accepts_all: Callable[[list], bool] | None = None

    def __call__(self, value: Any, path: str) -> None:
        if not self.accepts(value):
            _fail(path, f"expected {self.expected}, got {_show(value)}")


def _is_number(value: Any) -> bool:  # bool is an int in Python, not a number in JSON
    return type(value) is int or (type(value) is float and math.isfinite(value))


NUMBER_TYPES = frozenset((int, float))


def _all_numbers(values: list, nulls: bool = False) -> bool:
    types = set(map(type, values))
    if not types <= ((NUMBER_TYPES | {type(None)}) if nulls else NUMBER_TYPES):
        return False
    if type(None) in types:
        values = [v for v in values if v is not None]
    try:
        return all(map(math.isfinite, values))
    except OverflowError:  # an int too large for a float: finite all the same, but not here
        return False


def _is_timestamp(value: Any) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    except ValueError:
        return False


COUNT = Scalar("a non-negative integer", lambda v: type(v) is int and v >= 0)
POSITIVE = Scalar("a positive integer", lambda v: type(v) is int and v > 0)
NUMBER = Scalar("a finite number", _is_number, _all_numbers)
NUMBER_OR_NULL = Scalar(
    "a finite number or null",
    lambda v: v is None or _is_number(v),
    lambda values: _all_numbers(values, nulls=True),
)
STRING = Scalar("a string", lambda v: isinstance(v, str))
POSITIVE_OR_NULL = Scalar("a positive integer or null", lambda v: v is None or POSITIVE.accepts(v))
TIMESTAMP = Scalar("an ISO 8601 time", _is_timestamp)
SCHEMA = Scalar(str(SCHEMA_VERSION), lambda v: type(v) is int and v == SCHEMA_VERSION)


def list_of(item: Spec) -> Spec:
    def check(value: Any, path: str) -> None:
        if type(value) is not list:
            _fail(path, f"expected a list, got {_show(value)}")
        if isinstance(item, Scalar):  # no path is built unless a value is bad
            if item.accepts_all is not None and item.accepts_all(value):
                return
            bad = next((i for i, v in enumerate(value) if not item.accepts(v)), None)
            if bad is not None:
                item(value[bad], f"{path}[{bad}]")
            return
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]")

    return check


def map_of(item: Spec, key: Scalar = STRING) -> Spec:
    """An object whose keys are names (modules, example indices), every value an `item`."""

    def check(value: Any, path: str) -> None:
        if type(value) is not dict:
            _fail(path, f"expected an object, got {_show(value)}")
        for k, v in value.items():
            if not (isinstance(k, str) and key.accepts(k)):  # a writer's dict may hold any key
                _fail(
                    f"{path}[{_show(k)}]", f"expected a key that is {key.expected}, got {_show(k)}"
                )
            item(v, _field(path, k))

    return check


Rule = Callable[[dict, str], None]


@dataclass(frozen=True)
class Obj:
    """A JSON object: its required and optional fields, then the rules that tie them."""

    fields: dict[str, Spec]
    optional: dict[str, Spec] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    def __call__(self, value: Any, path: str) -> None:
        if type(value) is not dict:
            _fail(path, f"expected an object, got {_show(value)}")
        for key, spec in self.fields.items():
            if key not in value:
                _fail(_field(path, key), "missing")
            spec(value[key], _field(path, key))
        for key, spec in self.optional.items():
            if key in value:
                spec(value[key], _field(path, key))
        for rule in self.rules:
            rule(value, path)


def _same_length(key: str, like: str, more: int = 0) -> Rule:
    """Rule: list `key` has as many entries as list `like` (plus `more`)."""

    def rule(value: dict, path: str) -> None:
        want = len(value[like]) + more
        if len(value[key]) != want:
            plus = f" + {more}" if more else ""
            _fail(
                _field(path, key), f"expected {want} entries ({like}{plus}), got {len(value[key])}"
            )

    return rule


def _range_of(key: str, low: float = -math.inf, high: float = math.inf) -> Rule:
    """Rule: `key` is a pair [lo, hi] with low <= lo <= hi <= high."""

    def rule(value: dict, path: str) -> None:
        pair = value[key]
        if not (len(pair) == 2 and low <= pair[0] <= pair[1] <= high):
            bounds = "" if math.isinf(low) else f" inside [{low:g}, {high:g}]"
            _fail(
                _field(path, key),
                f"expected a range [lo, hi] with lo <= hi{bounds}, got {_show(pair)}",
            )

    return rule


def _within(key: str, low: float, high: float) -> Rule:
    """Rule: `key`, where it is present and not null, lies in [low, high]."""

    def rule(value: dict, path: str) -> None:
        x = value.get(key)
        if x is not None and not low <= x <= high:
            _fail(_field(path, key), f"expected a value inside [{low:g}, {high:g}], got {_show(x)}")

    return rule


def _interval_around(key: str, low: float, high: float) -> Rule:
    """Rule: `ci` is null where `key` is, else null or a range [lo, hi] inside [low, high]. (A
    percentile bootstrap interval usually holds the value, but of a skewed statistic on a few
    contexts need not, so that is not a rule.)"""

    def rule(value: dict, path: str) -> None:
        x, pair = value[key], value["ci"]
        if pair is None:
            return
        if x is None:
            _fail(_field(path, "ci"), f"expected null where {key} is null, got {_show(pair)}")
        if not low <= pair[0] <= pair[1] <= high:
            _fail(
                _field(path, "ci"),
                f"expected a range [lo, hi] inside [{low:g}, {high:g}], got {_show(pair)}",
            )

    return rule


def _differences_with_neurons(summary: dict, path: str) -> None:
    if ("lora_minus_neurons" in summary) != ("neurons" in summary):
        _fail(_field(path, "lora_minus_neurons"), "expected exactly where neurons is")


def _example_target(example: dict, path: str) -> None:
    target, n = example["target"], len(example["tokens"])
    if not target < n:
        _fail(_field(path, "target"), f"expected an index into its {n} tokens, got {target}")
    if target > example["token_index"]:
        _fail(_field(path, "target"), f"expected at most token_index {example['token_index']}")
    at_target = example["activations"][target]
    if at_target != example["activation"]:
        _fail(
            _field(path, "activation"),
            f"expected activations[target] {_show(at_target)}, got {_show(example['activation'])}",
        )


def _siblings_like_tokens(example: dict, path: str) -> None:
    n = len(example["tokens"])
    for module, values in example.get("sibling_activations", {}).items():
        if len(values) != n:
            where = _field(_field(path, "sibling_activations"), module)
            _fail(where, f"expected {n} entries (tokens), got {len(values)}")


def _square(cosines: dict, path: str) -> None:
    n = len(cosines["labels"])
    matrix = cosines["matrix"]
    if len(matrix) != n:
        _fail(_field(path, "matrix"), f"expected {n} rows (labels), got {len(matrix)}")
    for i, row in enumerate(matrix):
        if len(row) != n:
            _fail(
                f"{_field(path, 'matrix')}[{i}]", f"expected {n} entries (labels), got {len(row)}"
            )


def _counts_sum_to_count(direction: dict, path: str) -> None:
    counts, count = direction["histogram"]["counts"], direction["stats"]["count"]
    if sum(counts) != count:
        _fail(
            _field(_field(path, "histogram"), "counts"),
            f"expected a sum of stats.count {count}, got {sum(counts)}",
        )


def _non_negative(feature: dict, path: str) -> None:
    """An SAE feature is relu(...) >= 0: never below 0, sampled on the positive side only."""
    if feature["stats"]["min"] < 0:
        _fail(f"{path}.stats.min", f"expected >= 0, got {_show(feature['stats']['min'])}")
    for r, samples in enumerate(feature["quantile_samples"]):
        if samples["sign"] != 1:
            _fail(f"{path}.quantile_samples[{r}].sign", "expected 1 (a feature is >= 0)")
    if "negative" in feature.get("explanations", {}):
        _fail(f"{path}.explanations.negative", "unexpected: a feature is >= 0")


def _by_weight(feature: dict, path: str) -> None:
    """The composition: by decreasing |weight|, each direction once."""
    entries = feature["composition"]
    for j in range(1, len(entries)):
        if abs(entries[j]["weight"]) > abs(entries[j - 1]["weight"]):
            _fail(f"{path}.composition[{j}].weight", "expected |weight| at most the one before")
    named = {(e["layer"], e["module"], e["component"]) for e in entries}
    if len(named) != len(entries):
        _fail(f"{path}.composition", "expected each direction once")


def _latents_once(sae: dict, path: str) -> None:
    """features (by index) and dead (ascending) are latents of the SAE, each in one of them;
    dead_fraction is the dead's share."""
    n, indices = sae["num_latents"], [f["index"] for f in sae["features"]]
    if sae["k"] >= n:
        _fail(_field(path, "k"), f"expected less than num_latents {n}, got {sae['k']}")
    for key, values in (("features", indices), ("dead", sae["dead"])):
        for j, index in enumerate(values):
            where = f"{_field(path, key)}[{j}]" + (".index" if key == "features" else "")
            if index >= n:
                _fail(where, f"expected a latent below num_latents {n}, got {index}")
            if j and index <= values[j - 1]:
                _fail(where, f"expected after {values[j - 1]}, in ascending order, each once")
    both = set(indices) & set(sae["dead"])
    if both:
        _fail(_field(path, "dead"), f"expected no latent of features, got {min(both)}")
    share = len(sae["dead"]) / n
    if not math.isclose(sae["dead_fraction"], share, rel_tol=1e-6, abs_tol=1e-9):
        _fail(_field(path, "dead_fraction"), f"expected len(dead) / num_latents {share:g}")


def _shares_sum_to_one(sae: dict, path: str) -> None:
    shares = sae.get("error_share", {})
    if shares and not math.isclose(sum(shares.values()), 1.0, abs_tol=1e-6):
        _fail(_field(path, "error_share"), f"expected a sum of 1, got {sum(shares.values()):g}")


def _components(projection: dict, path: str) -> None:
    directions = projection["directions"]
    if len(directions) != projection["rank"]:
        _fail(
            _field(path, "directions"),
            f"expected {projection['rank']} entries (rank), got {len(directions)}",
        )
    for c, direction in enumerate(directions):
        if direction["component"] != c:
            _fail(
                f"{_field(path, 'directions')}[{c}].component",
                f"expected {c}, got {direction['component']}",
            )


def _attribution_target(example: dict, path: str) -> None:
    at_target, given = example["attributions"][example["target"]], example["attribution"]
    if at_target != given:
        _fail(
            _field(path, "attribution"),
            f"expected attributions[target] {_show(at_target)}, got {_show(given)}",
        )


def _value_with_clamp(entry: dict, path: str) -> None:
    if (entry["value"] is None) != (entry["clamp"] == "none"):
        _fail(
            _field(path, "value"),
            f"expected null exactly where clamp is none, got {_show(entry['value'])}",
        )


def _tokens_counted(effects: dict, path: str) -> None:
    rows, positions = effects["kl_tokens"], sum(map(len, effects["kl_tokens"].values()))
    if len(rows) != effects["num_examples"]:
        _fail(_field(path, "kl_tokens"), f"expected {effects['num_examples']} rows (num_examples)")
    if positions != effects["num_tokens"]:
        _fail(
            _field(path, "kl_tokens"),
            f"expected {effects['num_tokens']} values (num_tokens), got {positions}",
        )


EXAMPLE = Obj(
    {
        "activation": NUMBER,
        "example_index": COUNT,
        "token_index": COUNT,
        "tokens": list_of(STRING),
        "activations": list_of(NUMBER_OR_NULL),
        "target": COUNT,
        "occurrences": POSITIVE,  # tokens in the data with this same window
    },
    optional={"sibling_activations": map_of(list_of(NUMBER_OR_NULL))},
    rules=(_same_length("activations", "tokens"), _example_target, _siblings_like_tokens),
)
ATTRIBUTION_EXAMPLE = Obj(
    {**EXAMPLE.fields, "attribution": NUMBER, "attributions": list_of(NUMBER_OR_NULL)},
    EXAMPLE.optional,
    rules=(*EXAMPLE.rules, _same_length("attributions", "tokens"), _attribution_target),
)
DIRECTION_EFFECTS = Obj(
    {
        "ablation_kl": NUMBER,
        "ablation_dloss": NUMBER,
        "attribution": NUMBER,
        **dict.fromkeys(ATTRIBUTION_LISTS, list_of(ATTRIBUTION_EXAMPLE)),
    }
)
COSINES = Obj({"labels": list_of(STRING), "matrix": list_of(list_of(NUMBER))}, rules=(_square,))
TOKEN_ROW = Obj({"token": STRING, "count": POSITIVE, "mean": NUMBER, "min": NUMBER, "max": NUMBER})
LOGIT_EFFECT = Obj({"token": STRING, "value": NUMBER})
LOGIT_EFFECTS = Obj({"top": list_of(LOGIT_EFFECT), "bottom": list_of(LOGIT_EFFECT)})
STATS = Obj(
    {
        "count": COUNT,
        "min": NUMBER,
        "max": NUMBER,
        "mean": NUMBER,
        "std": NUMBER,
        "nonfinite": COUNT,
    }
)
HISTOGRAM = Obj(
    {"edges": list_of(NUMBER), "counts": list_of(COUNT)},
    rules=(_same_length("edges", "counts", more=1),),
)
QUANTILE_RANGE = Obj(
    {
        "sign": Scalar("1 or -1", lambda v: type(v) is int and v in (1, -1)),
        "cut": Scalar(f"one of {QUANTILE_CUTS}", lambda v: v in QUANTILE_CUTS),
        "quantile_range": list_of(NUMBER),
        "value_range": list_of(NUMBER),
        "examples": list_of(EXAMPLE),
    },
    rules=(_range_of("quantile_range", 0.0, 1.0), _range_of("value_range")),
)
POSITION_PROFILE = Obj(
    {"edges": list_of(COUNT), "mean": list_of(NUMBER_OR_NULL), "count": list_of(COUNT)},
    rules=(_same_length("edges", "mean", more=1), _same_length("count", "mean")),
)
# ---- explanations (runs with --explain) ----------------------------------------------------
INTERVAL_OR_NULL = Scalar(
    "a pair of finite numbers or null",
    lambda v: v is None or (type(v) is list and len(v) == 2 and all(map(_is_number, v))),
)
SCORE = Obj(
    {"score": NUMBER_OR_NULL, "ci": INTERVAL_OR_NULL, "n": COUNT},
    rules=(_within("score", 0.0, 1.0), _interval_around("score", 0.0, 1.0)),
)
DETECTION_SCORE = Obj(  # a local scorer's p(yes) also ranks the contexts: their AUROC
    SCORE.fields, optional={"auroc": NUMBER_OR_NULL}, rules=(*SCORE.rules, _within("auroc", 0, 1))
)
SCORES = {"detection": DETECTION_SCORE, "fuzzing": SCORE}
EXPLANATION = Obj(
    {"text": STRING, **SCORES},
    optional={"shuffled": Obj(SCORES)},  # a direction's: neurons have no shuffled baseline
)
SIGNS = ("positive", "negative")
SIGN_EXPLANATIONS = Obj({}, optional=dict.fromkeys(SIGNS, EXPLANATION))
GROUP_SCORE = Obj(
    {"mean": NUMBER_OR_NULL, "ci": INTERVAL_OR_NULL, "n": COUNT},
    rules=(_within("mean", 0.0, 1.0), _interval_around("mean", 0.0, 1.0)),
)
GROUP = Obj(dict.fromkeys(SCORES, GROUP_SCORE))
DIFFERENCE = Obj(
    {"mean": NUMBER_OR_NULL, "ci": INTERVAL_OR_NULL},
    rules=(_within("mean", -1.0, 1.0), _interval_around("mean", -1.0, 1.0)),
)
EXPLANATION_SUMMARY = Obj(
    {"lora": GROUP, "shuffled": GROUP},
    optional={
        "neurons": GROUP,
        "lora_minus_neurons": Obj(dict.fromkeys(SCORES, DIFFERENCE)),
        "sae": GROUP,  # runs with --sae: its explained features
    },
    rules=(_differences_with_neurons,),
)
EXPLANATION_SETTINGS = Obj(
    {},
    optional={
        "contexts_per_class": POSITIVE,
        "context_tokens": COUNT,
        "bootstrap_resamples": POSITIVE,
        "seed": COUNT,
    },
)
NON_NEGATIVE = Scalar("a non-negative number", lambda v: _is_number(v) and v >= 0)
EXPLANATIONS = Obj(
    {
        "explainer": STRING,
        "scorer": STRING,
        "num_prompts": COUNT,
        "num_tokens": COUNT,
        "seconds": NON_NEGATIVE,
        "summary": EXPLANATION_SUMMARY,
    },
    optional={"settings": EXPLANATION_SETTINGS},
)
DIRECTION = Obj(
    {
        "component": COUNT,
        "a_norm": NUMBER,
        "b_norm": NUMBER,
        "write_norm_scale": NUMBER,
        "stats": STATS,
        "histogram": HISTOGRAM,
        "top_positive": list_of(EXAMPLE),
        "top_negative": list_of(EXAMPLE),
        "quantile_samples": list_of(QUANTILE_RANGE),
        "position_profile": POSITION_PROFILE,
    },
    optional={  # top/bottom tokens: runs with a token profile; logit effects: residual writers
        "top_tokens": list_of(TOKEN_ROW),
        "bottom_tokens": list_of(TOKEN_ROW),
        "logit_effects": LOGIT_EFFECTS,
        "effects": DIRECTION_EFFECTS,  # runs with --effects
        "explanations": SIGN_EXPLANATIONS,  # runs with --explain: per sign with examples
    },
    rules=(_counts_sum_to_count,),
)
# A coordinate of an adapted layer's MLP hidden space (--baseline-neurons), summarised as a
# direction whose A is a unit vector: the summaries of DIRECTION, none of its vectors.
NEURON_SUMMARIES = ("stats", "histogram", *EXAMPLE_LISTS, "quantile_samples", "position_profile")
BASELINE_NEURON = Obj(
    {
        "layer": COUNT,
        "neuron": COUNT,  # its coordinate of the MLP hidden space (the down_proj input)
        **{key: DIRECTION.fields[key] for key in NEURON_SUMMARIES},
    },
    optional={
        key: DIRECTION.optional[key] for key in ("top_tokens", "bottom_tokens", "explanations")
    },
    rules=DIRECTION.rules,
)
PROJECTION = Obj(
    {
        "rank": POSITIVE,
        "scaling": NUMBER,
        "read_site": STRING,
        "directions": list_of(DIRECTION),
    },
    rules=(_components,),
)
SPACE_COSINES = Obj({"space": STRING, **COSINES.fields}, rules=COSINES.rules)
LAYER = Obj(
    {
        "layer": COUNT,
        "cosine_similarities": list_of(SPACE_COSINES),
        "projections": map_of(PROJECTION),
    }
)
METADATA = Obj(
    {
        "base_model": STRING,
        "adapter": STRING,
        "dataset": STRING,
        "num_examples": COUNT,
        "num_tokens": COUNT,
        "num_truncated": COUNT,
        "num_skipped_rows": COUNT,
        "num_processes": POSITIVE,
        "top_k": POSITIVE,
        "context_window": COUNT,
        "histogram_bins": POSITIVE,
        "dtype": STRING,
        "max_length": POSITIVE_OR_NULL,
        "created_at": TIMESTAMP,
        "lora_layers": list_of(COUNT),
        "modules": list_of(STRING),
        "min_token_count": POSITIVE,
        "num_nonfinite": COUNT,
        "below_median_contexts": COUNT,
    }
)
# ---- the SAE of the whole adapter state (runs with --sae) ----------------------------------
# A feature is read like a direction (its summaries, the same specs), but it is >= 0: it has
# positive top examples and quantile ranges only, and a positive explanation at most.
COMPOSITION_SIZE = 16  # a feature's directions of largest |W_dec[f, d]| (fewer where D is)
FRACTION = Scalar("a number inside [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
COMPOSITION_ENTRY = Obj({"layer": COUNT, "module": STRING, "component": COUNT, "weight": NUMBER})
FEATURE = Obj(
    {
        "index": COUNT,
        "frequency": FRACTION,  # of the tokens where it is > 0
        **{key: DIRECTION.fields[key] for key in ("stats", "histogram", "top_positive")},
        "quantile_samples": DIRECTION.fields["quantile_samples"],
        "position_profile": DIRECTION.fields["position_profile"],
        "composition": list_of(COMPOSITION_ENTRY),
    },
    optional={  # top tokens: runs with a token profile; logit effects: adapters that write
        "top_tokens": DIRECTION.optional["top_tokens"],  # the residual stream
        "logit_effects": DIRECTION.optional["logit_effects"],
        "explanations": Obj({}, optional={"positive": EXPLANATION}),  # runs with --explain
    },
    rules=(*DIRECTION.rules, _non_negative, _by_weight),
)
TRAINING = Obj(
    {
        "steps": COUNT,
        "batch_size": POSITIVE,
        "learning_rate": NON_NEGATIVE,
        "seed": COUNT,
        "seconds": NON_NEGATIVE,
    }
)
SAE = Obj(
    {
        "num_latents": POSITIVE,
        "k": POSITIVE,
        "threshold": NUMBER,
        "fvu": NON_NEGATIVE,
        "fvu_heldout": NON_NEGATIVE,
        "l0": NON_NEGATIVE,
        "dead_fraction": FRACTION,
        "num_tokens": COUNT,
        "path": STRING,
        "features": list_of(FEATURE),
        "dead": list_of(COUNT),
    },
    optional={"error_share": map_of(FRACTION), "training": TRAINING},
    rules=(_latents_once, _shares_sum_to_one),
)
SEQUENCE = Obj({"tokens": list_of(STRING), "source": STRING})
EXAMPLE_INDEX = Scalar("an example index", lambda k: k.isdigit() and str(int(k)) == k)
GROUP_EFFECT = {"ablation_kl": NUMBER, "ablation_dloss": NUMBER}
STEERING = Obj(
    {
        "layer": COUNT,
        "module": STRING,
        "component": COUNT,
        "prompt_index": COUNT,
        "clamp": Scalar(f"one of {', '.join(CLAMPS)}", lambda v: v in CLAMPS),
        "value": NUMBER_OR_NULL,
        "text": STRING,
        "tokens": list_of(STRING),
    },
    rules=(_value_with_clamp,),
)
EFFECTS = Obj(
    {
        "num_examples": POSITIVE,
        "num_tokens": POSITIVE,
        "max_length": POSITIVE,
        "kl_vs_base": NUMBER,
        "attribution_spearman": NUMBER_OR_NULL,
        "layers": list_of(Obj({"layer": COUNT, **GROUP_EFFECT})),
        "modules": list_of(Obj({"module": STRING, **GROUP_EFFECT})),
        "kl_tokens": map_of(list_of(NUMBER), key=EXAMPLE_INDEX),
        "prompts": list_of(Obj({"example_index": COUNT, "tokens": list_of(STRING)})),
        "steering": list_of(STEERING),
    },
    rules=(_tokens_counted,),
)
DOCUMENT = Obj(
    {
        "schema_version": SCHEMA,
        "metadata": METADATA,
        "layers": list_of(LAYER),
        "cross_layer_cosine": COSINES,
    },
    optional={
        "examples": map_of(SEQUENCE, key=EXAMPLE_INDEX),
        "effects": EFFECTS,  # runs with --effects
        "explanations": EXPLANATIONS,  # runs with --explain
        "baseline_neurons": list_of(BASELINE_NEURON),  # runs with --baseline-neurons
        "sae": SAE,  # runs with --sae
    },
)


def validate(document: Any) -> None:
    """Raise ContractError, naming the first bad field by its path, unless `document` is an
    activations file as docs/data-format.md defines it. Fields it does not name are accepted."""
    DOCUMENT(document, "")
    _agreements(document)


def _agreements(document: dict[str, Any]) -> None:
    """What ties the document together: the metadata's lists and sizes against the layers."""
    meta = document["metadata"]
    numbers = [layer["layer"] for layer in document["layers"]]
    if meta["lora_layers"] != numbers:
        _fail("metadata.lora_layers", f"expected the layers' numbers {_show(numbers)}")
    used = {module for layer in document["layers"] for module in layer["projections"]}
    if set(meta["modules"]) != used:
        _fail("metadata.modules", f"expected the modules of the layers {_show(sorted(used))}")
    for i, layer in enumerate(document["layers"]):
        for module, projection in layer["projections"].items():
            for c, direction in enumerate(projection["directions"]):
                path = f"{_field(f'layers[{i}].projections', module)}.directions[{c}]"
                _direction_agrees(direction, path, module, set(layer["projections"]), meta)
                if ("effects" in direction) != ("effects" in document):
                    _fail(f"{path}.effects", "expected exactly where the document has effects")
                _explained_in(document, direction, path)
    if "effects" in document:
        _effects_agree(document["effects"], document)
    if "baseline_neurons" in document:
        _neurons_agree(document)
    if "sae" in document:
        _sae_agrees(document)
    summary = document.get("explanations", {}).get("summary", {})
    if "neurons" in summary and "baseline_neurons" not in document:
        _fail("explanations.summary.neurons", "unexpected: the document has no baseline_neurons")


def _neurons_agree(document: dict[str, Any]) -> None:
    """The baseline neurons: of the adapted layers, in (layer, neuron) order, each once, and
    each against the metadata as a direction is."""
    meta, neurons = document["metadata"], document["baseline_neurons"]
    for i, neuron in enumerate(neurons):
        path = f"baseline_neurons[{i}]"
        if neuron["layer"] not in meta["lora_layers"]:
            _fail(f"{path}.layer", f"expected an adapted layer {_show(meta['lora_layers'])}")
        before = neurons[i - 1] if i else None
        if before and (before["layer"], before["neuron"]) >= (neuron["layer"], neuron["neuron"]):
            _fail(path, "expected after the neuron before it, by layer, then neuron, each once")
        _summaries_agree(neuron, path, meta, set())
        _explained_in(document, neuron, path)


def _sae_agrees(document: dict[str, Any]) -> None:
    """The SAE's features against the metadata as a direction is, each counting the SAE's
    tokens, each composed of directions of the layers (as many as COMPOSITION_SIZE allows),
    and its error shares over the adapted modules."""
    meta, sae = document["metadata"], document["sae"]
    directions = {(ref.layer, ref.module, ref.component) for ref in iter_directions(document)}
    size = min(COMPOSITION_SIZE, len(directions))
    for i, feature in enumerate(sae["features"]):
        path = f"sae.features[{i}]"
        _summaries_agree(feature, path, meta, set())
        _explained_in(document, feature, path)
        stats = feature["stats"]
        if stats["count"] + stats["nonfinite"] != sae["num_tokens"]:
            _fail(f"{path}.stats.count", "expected count + nonfinite = sae.num_tokens")
        if feature["frequency"] == 0:
            _fail(f"{path}.frequency", "expected > 0 (a latent that never fires is in dead)")
        if len(feature["composition"]) != size:
            _fail(f"{path}.composition", f"expected {size} entries (largest |weight|)")
        for j, entry in enumerate(feature["composition"]):
            if (entry["layer"], entry["module"], entry["component"]) not in directions:
                _fail(f"{path}.composition[{j}]", "expected a direction of the layers")
    strangers = set(sae.get("error_share", {})) - set(meta["modules"])
    if strangers:
        _fail(
            "sae.error_share",
            f"expected modules of metadata.modules, got {_show(sorted(strangers))}",
        )


def _explained_in(document: dict[str, Any], direction: dict[str, Any], path: str) -> None:
    """A direction's or neuron's explanations come from the run's explaining, which the
    top-level explanations describe."""
    if "explanations" in direction and "explanations" not in document:
        _fail(f"{path}.explanations", "unexpected: the document has no top-level explanations")


def _effects_agree(effects: dict[str, Any], document: dict[str, Any]) -> None:
    """The effects' groups against the layers, their rows against the stored sequences, and
    the pinned samples against the directions and prompts."""
    meta = document["metadata"]
    if [g["layer"] for g in effects["layers"]] != meta["lora_layers"]:
        _fail("effects.layers", f"expected one entry per layer {_show(meta['lora_layers'])}")
    if [g["module"] for g in effects["modules"]] != meta["modules"]:
        _fail("effects.modules", f"expected one entry per module {_show(meta['modules'])}")
    stored = document.get("examples", {})
    for index, values in effects["kl_tokens"].items():
        if index not in stored:
            _fail(_field("effects.kl_tokens", index), "expected its tokens in examples")
        longest = min(len(stored[index]["tokens"]), effects["max_length"]) - 1
        if len(values) != longest:
            _fail(_field("effects.kl_tokens", index), f"expected {longest} values (its positions)")
    ranks = {
        (layer["layer"], module): projection["rank"]
        for layer in document["layers"]
        for module, projection in layer["projections"].items()
    }
    for i, entry in enumerate(effects["steering"]):
        where = f"effects.steering[{i}]"
        if entry["component"] >= ranks.get((entry["layer"], entry["module"]), 0):
            _fail(where, "expected a direction of the layers")
        if entry["prompt_index"] >= len(effects["prompts"]):
            _fail(
                f"{where}.prompt_index", f"expected an index into {len(effects['prompts'])} prompts"
            )


def _direction_agrees(
    direction: dict[str, Any], path: str, module: str, modules: set[str], meta: dict[str, Any]
) -> None:
    """A direction against the metadata, and its examples' siblings against its layer."""
    if "logit_effects" in direction and not writes_residual(module):
        _fail(f"{path}.logit_effects", f"unexpected: {module} does not write the residual stream")
    _summaries_agree(direction, path, meta, modules - {module})


def _summaries_agree(
    direction: dict[str, Any], path: str, meta: dict[str, Any], siblings: set[str]
) -> None:
    """A direction's or a neuron's summaries against the metadata; its examples may carry the
    activations of the modules `siblings` only."""
    bins = meta["histogram_bins"]
    if len(direction["histogram"]["counts"]) != bins:
        _fail(f"{path}.histogram.counts", f"expected {bins} entries (metadata.histogram_bins)")
    lists = [(side, direction[side]) for side in EXAMPLE_LISTS if side in direction]
    if "effects" in direction:
        lists += [(f"effects.{side}", direction["effects"][side]) for side in ATTRIBUTION_LISTS]
    for side, examples in lists:
        if len(examples) > meta["top_k"]:
            _fail(f"{path}.{side}", f"expected at most {meta['top_k']} entries (metadata.top_k)")
    longest = 2 * meta["context_window"] + 1
    for where, example in examples_at(direction, path):
        if len(example["tokens"]) > longest:
            _fail(f"{where}.tokens", f"expected at most {longest} entries (2 context_window + 1)")
        strangers = set(example.get("sibling_activations", {})) - siblings
        if strangers:
            _fail(
                f"{where}.sibling_activations",
                f"expected other modules of its layer, got {_show(sorted(strangers))}",
            )
