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


def iter_examples(direction: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every Example a direction carries: its top lists, its quantile samples, then its
    attribution lists (runs with --effects)."""
    for _, example in examples_at(direction):
        yield example


def examples_at(direction: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """iter_examples with each Example's path below the direction's `path`."""
    for side in EXAMPLE_LISTS:
        for j, example in enumerate(direction[side]):
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
    },
    rules=(_counts_sum_to_count,),
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
    }
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
    if "effects" in document:
        _effects_agree(document["effects"], document)


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
    bins = meta["histogram_bins"]
    if len(direction["histogram"]["counts"]) != bins:
        _fail(f"{path}.histogram.counts", f"expected {bins} entries (metadata.histogram_bins)")
    if "logit_effects" in direction and not writes_residual(module):
        _fail(f"{path}.logit_effects", f"unexpected: {module} does not write the residual stream")
    lists = [(side, direction[side]) for side in EXAMPLE_LISTS]
    if "effects" in direction:
        lists += [(f"effects.{side}", direction["effects"][side]) for side in ATTRIBUTION_LISTS]
    for side, examples in lists:
        if len(examples) > meta["top_k"]:
            _fail(f"{path}.{side}", f"expected at most {meta['top_k']} entries (metadata.top_k)")
    longest = 2 * meta["context_window"] + 1
    for where, example in examples_at(direction, path):
        if len(example["tokens"]) > longest:
            _fail(f"{where}.tokens", f"expected at most {longest} entries (2 context_window + 1)")
        strangers = set(example.get("sibling_activations", {})) - (modules - {module})
        if strangers:
            _fail(
                f"{where}.sibling_activations",
                f"expected other modules of its layer, got {_show(sorted(strangers))}",
            )
