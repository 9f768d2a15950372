"""Render an activations file (docs/data-format.md) as one self-contained HTML page.

The page's script is the parts in JS_PARTS (templates/), joined in that order. It draws one
layer at a time from the data embedded in one inert <script type="application/octet-stream">
element: one gzip-compressed JSON blob (in base 85) for what the overview needs, one per layer and
one each for the cross-layer cosines, the stored sequences, (runs with --effects) the
per-token KL vs base, (runs with --baseline-neurons) the baseline neurons and (runs with
--sae) the SAE's feature list and its features' cards, FEATURE_CHUNK a blob, which the page
decompresses (DecompressionStream) when it first needs them. To keep a full-size run small,
the data is the input with its floats rounded for display (DISPLAY_DIGITS significant
digits; the page shows values exactly as embedded), the keys the page does not use dropped,
each token string stored once in a table that examples, token tables, logit effects and
pinned samples index into, and examples written as rows of EXAMPLE_FIELDS (attribution
examples: ATTRIBUTION_FIELDS) rather than objects. Every contract fact the page shows
(direction keys and names, module order, write scales, which direction a vector label names,
the clamps' order) is computed here with backend/contract.py, so the script derives none.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import gzip
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from backend import UserError
from backend.atomic import write_atomic
from backend.contract import (
    ATTRIBUTION_LISTS,
    CLAMPS,
    SCHEMA_VERSION,
    SIGNS,
    ContractError,
    direction_key,
    direction_name,
    feature_key,
    iter_directions,
    iter_examples,
    module_order,
    neuron_key,
    validate,
    vector_label,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
# The page's script: these parts of templates/, in this order (each uses only those before it).
JS_PARTS = (
    "format.js",
    "contexts.js",
    "search.js",
    "data.js",
    "dom.js",
    "plots.js",
    "tooltip.js",
    "notes.js",
    "effects.js",
    "explanations.js",
    "cards.js",
    "features.js",
    "heatmap.js",
    "main.js",
)
KNOWN_SCHEMA_VERSIONS = (SCHEMA_VERSION,)
DISPLAY_DIGITS = 4  # significant digits of every value on the page, tooltips included
EDGE_DIGITS = 6  # histogram edges keep more, so that narrow bins stay distinct
COSINE_DECIMALS = 3  # the cross-layer cosine matrix: (layers x vectors)^2 numbers
# Examples are embedded as arrays of these fields, in this order: the keys of a full-size run's
# tens of thousands of examples would otherwise be a fifth of the page. "activation" is left
# out (it is activations[target]); "sibling_activations" only where the input has it.
EXAMPLE_FIELDS = (
    "example_index",
    "token_index",
    "target",
    "tokens",
    "activations",
    "sibling_activations",
)
# Attribution examples (runs with --effects) carry their attributions in place of the sibling
# activations, which the page does not show for them (their tokens show attr or activation).
ATTRIBUTION_FIELDS = (*EXAMPLE_FIELDS[:-1], "attributions")
EFFECT_MEASURES = ("ablation_kl", "ablation_dloss", "attribution")  # of each direction
# Runs with --sae: the features' cards are in blobs of this many features each ("sae-<i>"),
# decoded when one of them is opened; their list (what it sorts, searches and links by) is
# the blob "sae-list", decoded when the Features view opens.
FEATURE_CHUNK = 128
SAE_HEADER = ("num_latents", "k", "threshold", "fvu", "fvu_heldout", "l0", "dead_fraction")
HEADER_FIELDS = (
    ("model", "base_model"),
    ("adapter", "adapter"),
    ("dataset", "dataset"),
    ("tokens", "num_tokens"),
    ("examples", "num_examples"),
    ("top k", "top_k"),
    ("window", "context_window"),
    ("dtype", "dtype"),
    ("processes", "num_processes"),
    ("created", "created_at"),
    ("min token count", "min_token_count"),
    ("non-finite values", "num_nonfinite"),
)
# Lone surrogates are valid in JSON strings but cannot be encoded as UTF-8: embedded as \uXXXX
# escapes, which JSON.parse turns back into them.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
ENDS_INLINE_ELEMENT = re.compile(r"</(script|style)|<!--", re.IGNORECASE)


class DashboardError(UserError):
    """A problem with the user's input or output, reported as one line without a traceback."""


def load_activations(path: Path) -> dict:
    """Read and validate an activations file; raise DashboardError, naming the first bad field,
    if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise DashboardError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DashboardError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DashboardError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise DashboardError(f"{path}: invalid JSON ({e})") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("layers"), list)
        and isinstance(data.get("metadata"), dict)
    ):
        raise DashboardError(
            f'{path}: not an activations file (needs a "layers" list and a "metadata" object)'
        )
    if "schema_version" not in data:
        raise DashboardError(f"{path}: no schema_version (known: {_known_versions()})")
    version = data["schema_version"]
    if type(version) is not int or version not in KNOWN_SCHEMA_VERSIONS:  # true == 1 in Python
        raise DashboardError(
            f"{path}: unknown schema_version {json.dumps(version)} (known: {_known_versions()})"
        )
    try:
        validate(data)
    except ContractError as e:
        raise DashboardError(f"{path}: {e}") from None
    return data


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _known_versions() -> str:
    return ", ".join(map(str, KNOWN_SCHEMA_VERSIONS))


def render_dashboard(data: dict, title: str) -> str:
    """The whole page as one HTML string."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined
    )
    css, js = inline_asset("dashboard.css"), joined_script()
    return env.get_template("dashboard.html.j2").render(
        title=title,
        fields=header_fields(data["metadata"]),
        # Raw text in the <script>: the alphabet has no "<" and no escape is decoded there.
        blobs=[(name, Markup(text)) for name, text in page_blobs(compact_data(data))],
        css=css,
        js=js,
        csp=content_security_policy(css, js),
    )


def joined_script() -> Markup:
    """The parts of JS_PARTS as one script. Each part declares one constant (its exports); the
    function around them keeps those off the page's global object."""
    parts = "\n".join(inline_asset(name) for name in JS_PARTS)
    return Markup(f'"use strict";\n(() => {{\n{parts}}})();\n')


def inline_asset(name: str) -> Markup:
    """One of our own CSS/JS files, verbatim: trusted, provided it cannot end its element."""
    text = (TEMPLATES / name).read_text(encoding="utf-8")
    if ENDS_INLINE_ELEMENT.search(text):
        raise RuntimeError(f"templates/{name} contains a sequence that would end its element")
    return Markup(text)


def content_security_policy(css: str, js: str) -> str:
    """Allow exactly our inline style and script and nothing from anywhere: no request can
    leave the page, and markup that slipped in could run no handler."""
    return (
        f"default-src 'none'; style-src '{_sha256(css)}'; script-src '{_sha256(js)}'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def header_fields(metadata: dict) -> list[tuple[str, str]]:
    return [(label, _display(metadata.get(key))) for label, key in HEADER_FIELDS]


def _display(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def page_blobs(page: dict) -> list[tuple[str, str]]:
    """The page's data as (name, base 85 of gzip of JSON) blobs: "index" (everything but the
    layers' contents, with the overview: each layer's directions as scalars), "layer-<i>" for
    the i-th layer, "cross-layer-cosine", "sequences", "kl-tokens" and "baseline-neurons" where
    the page has them."""
    lazy = ("layers", "cross_layer_cosine", "sequences", "kl_tokens", "baseline_neurons")
    index = {key: value for key, value in page.items() if key not in (*lazy, "sae")}
    index["overview"] = [_overview(layer) for layer in page["layers"]]
    if "cross_layer_cosine" in page:  # its title gives the number of vectors
        index["cross_layer_vectors"] = len(page["cross_layer_cosine"]["labels"])
    if "baseline_neurons" in page:  # the neuron section's groups, and which keys they open
        index["baseline_neuron_layers"] = _neuron_layers(page["baseline_neurons"])
    blobs = [("index", index)]
    blobs += [(f"layer-{i}", layer) for i, layer in enumerate(page["layers"])]
    blobs += [(key.replace("_", "-"), page[key]) for key in lazy[1:] if key in page]
    if "sae" in page:  # the header in the index; the list and the chunks of cards on demand
        sae = page["sae"]
        index["sae"] = sae["header"]
        blobs.append(("sae-list", sae["list"]))
        chunks = range(0, len(sae["features"]), FEATURE_CHUNK)
        blobs += [
            (f"sae-{c // FEATURE_CHUNK}", sae["features"][c : c + FEATURE_CHUNK]) for c in chunks
        ]
    return [(name, _compressed(value)) for name, value in blobs]


def _neuron_layers(neurons: list[dict]) -> list[dict]:
    """The baseline neurons' layers, in order, each with its neurons' keys."""
    layers: dict[int, list[str]] = {}
    for neuron in neurons:
        layers.setdefault(neuron["layer"], []).append(neuron["key"])
    return [{"layer": layer, "keys": keys} for layer, keys in layers.items()]


def _overview(layer: dict) -> dict:
    """What the overview heatmap shows of a layer: per direction, its scalars (and its
    effects' measures, in runs with --effects)."""
    return {
        "layer": layer["layer"],
        "directions": [
            {key: d[key] for key in ("key", "name", "write_norm_scale")}
            | {key: d["stats"][key] for key in ("min", "max", "std")}
            | {key: d["effects"][key] for key in EFFECT_MEASURES if "effects" in d}
            for projection in layer["projections"].values()
            for d in projection["directions"]
        ],
    }


def _compressed(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    # mtime=0: the same input gives the same page, byte for byte.
    return base85(gzip.compress(text.encode(), compresslevel=9, mtime=0))


def base85(data: bytes) -> str:
    """Python's base 85 (RFC 1924's alphabet), with "." for "<", which could end the element:
    a quarter longer than its bytes, where base64 is a third."""
    return base64.b85encode(data).decode().replace("<", ".")


def compact_data(data: dict) -> dict:
    """What the page embeds: the input's shape, with every token string (of examples, token
    tables, logit effects) as an index into "strings", floats rounded for display, keys the
    page does not use dropped, and each direction's key and name added."""
    strings: dict[str, int] = {}
    pinned = _malformed_as_error("effects", _pinned_samples, data.get("effects"), strings)
    layers = [
        _malformed_as_error(f"layers[{i}]", _compact_layer, layer, strings, pinned)
        for i, layer in enumerate(data["layers"])
    ]
    page = {"metadata": data["metadata"], "example_fields": EXAMPLE_FIELDS, "layers": layers}
    if "effects" in data:
        page["attribution_fields"] = ATTRIBUTION_FIELDS
        page["effects"] = _malformed_as_error("effects", _compact_effects, data["effects"], strings)
        page["kl_tokens"] = {
            index: _round_all(values) for index, values in data["effects"]["kl_tokens"].items()
        }
    if "cross_layer_cosine" in data:
        page["cross_layer_cosine"] = _malformed_as_error(
            "cross_layer_cosine", _compact_cross_layer_cosine, data["cross_layer_cosine"], data
        )
    if "examples" in data:  # --store-sequences: each shown example's whole token sequence
        page["sequences"] = _malformed_as_error(
            "examples", _compact_sequences, data["examples"], strings
        )
    neurons = data.get("baseline_neurons", [])
    if neurons:
        page["baseline_neurons"] = [
            _malformed_as_error(f"baseline_neurons[{i}]", _compact_neuron, neuron, strings)
            for i, neuron in enumerate(neurons)
        ]
    if "explanations" in data:
        page["explanations"] = _malformed_as_error(
            "explanations", _compact_explanations, data["explanations"], data
        )
    if "sae" in data:
        page["sae"] = _malformed_as_error("sae", _compact_sae, data["sae"], data, strings)
    return page | {"strings": list(strings)}


def _compact_sae(sae: dict, data: dict, strings: dict[str, int]) -> dict:
    """The SAE as the page uses it: its header (the figures, FEATURE_CHUNK, the number of
    features); its list, one row per feature (what the view sorts and the search finds, and
    its composition, each direction as its number in the page's order of directions); its
    features' cards, as directions' are."""
    number = {
        (ref.layer, ref.module, ref.component): i for i, ref in enumerate(iter_directions(data))
    }
    header = {key: sae[key] for key in ("num_latents", "k", "num_tokens", "path")} | {
        key: _round(sae[key]) for key in SAE_HEADER[2:]
    }
    header |= {
        "num_features": len(sae["features"]),
        "num_dead": len(sae["dead"]),
        "chunk": FEATURE_CHUNK,
        "error_share": _rounded(sae.get("error_share", {})),
        "training": _rounded(sae.get("training", {})),
    }
    rows = [_feature_row(f, number, strings) for f in sae["features"]]
    features = [_compact_sae_feature(f, strings) for f in sae["features"]]
    return {"header": header, "list": rows, "features": features}


def _feature_row(feature: dict, number: dict[tuple, int], strings: dict[str, int]) -> dict:
    explanation = feature.get("explanations", {}).get("positive")
    return {
        "index": feature["index"],
        "frequency": _round(feature["frequency"]),
        "max": _round(feature["stats"]["max"]),
        "text": explanation["text"] if explanation else None,
        "detection": _rounded(explanation["detection"]["score"]) if explanation else None,
        "tokens": [_intern(row["token"], strings) for row in feature.get("top_tokens", [])],
        "composition": [
            [number[(e["layer"], e["module"], e["component"])], _round(e["weight"])]
            for e in feature["composition"]
        ],
    }


def _firing_histogram(feature: dict) -> tuple[dict, int]:
    """The feature's histogram without its tokens at 0, trimmed to the bins that hold the rest,
    and how many were at 0: most of a sparse feature's tokens, whose one bar would leave the
    others invisible. Exact: the tokens at 0 are those where it is not > 0 (`frequency`), and
    they lie in the bin [lo, hi) that holds 0. Where that bin holds fewer, the histogram stays
    whole and none are left out. (A feature fires somewhere: the contract says so.)"""
    histogram, stats = feature["histogram"], feature["stats"]
    zeros = stats["count"] - round(feature["frequency"] * stats["count"])
    edges, counts = histogram["edges"], list(histogram["counts"])
    at = bisect.bisect_right(edges, 0.0) - 1  # the bin of 0
    if not 0 <= at < len(counts) or counts[at] < zeros:
        return histogram, 0
    counts[at] -= zeros
    held = [i for i, c in enumerate(counts) if c]
    first, last = held[0], held[-1] + 1
    return {"edges": edges[first : last + 1], "counts": counts[first:last]}, zeros


def _uniform_histogram(histogram: dict) -> dict:
    """Evenly spaced edges (the backend's are) as their first and their step, which the page
    expands: thousands of features' edges would otherwise be a tenth of their cards."""
    edges, bins = histogram["edges"], len(histogram["counts"])
    first, step = edges[0], _round((edges[-1] - edges[0]) / bins, EDGE_DIGITS + 2)
    widest = max(abs(edges[0]), abs(edges[-1])) or 1.0
    tolerance = 10.0 ** (math.floor(math.log10(widest)) + 1 - EDGE_DIGITS)  # its last digit
    if any(abs(first + i * step - edge) > tolerance for i, edge in enumerate(edges)):
        return histogram
    return {"first": first, "step": step, "counts": histogram["counts"]}


def _compact_sae_feature(feature: dict, strings: dict[str, int]) -> dict:
    """A feature as the cards draw a direction: its key and name, its summaries (positive
    only), its explanation (with the scores of a direction's), its logit effects."""
    index = feature["index"]
    page = {"key": feature_key(index), "name": f"feature {index}", "index": index}
    firing, page["zeros"] = _firing_histogram(feature)
    page |= _compact_summaries(feature | {"histogram": firing}, strings)
    page["histogram"] = _uniform_histogram(page["histogram"])
    if "logit_effects" in feature:
        page["logit_effects"] = _compact_logit_effects(feature["logit_effects"], strings)
    explanation = feature.get("explanations", {}).get("positive")
    if explanation:
        page["explanation"] = _feature(page["key"], page["name"], "sae", "positive", explanation)
    return page


def _compact_neuron(neuron: dict, strings: dict[str, int]) -> dict:
    """A baseline neuron as the cards draw a direction: its key and name, its summaries."""
    key, name = _neuron_key_and_name(neuron)
    return {"key": key, "name": name, "layer": neuron["layer"], "neuron": neuron["neuron"]} | (
        _compact_summaries(neuron, strings)
    )


def _neuron_key_and_name(neuron: dict) -> tuple[str, str]:
    layer, index = neuron["layer"], neuron["neuron"]
    return neuron_key(layer, index), f"layer {layer} neuron {index}"


def _compact_explanations(explanations: dict, data: dict) -> dict:
    """The run's explaining, rounded, and every feature (direction or neuron, and sign) with
    its explanation, in the page's order: directions by layer and module, then neurons. The
    cards, the table and the search all read them from here, in the index."""
    run = {key: explanations[key] for key in ("explainer", "scorer", "num_prompts", "num_tokens")}
    explained = [(ref.key, f"layer {ref.layer} {ref.name}", "lora", ref.direction)
                 for ref in iter_directions(data)]  # fmt: skip
    explained += [
        (*_neuron_key_and_name(neuron), "neurons", neuron)
        for neuron in data.get("baseline_neurons", [])
    ]
    features = [
        _feature(key, name, group, sign, direction["explanations"][sign])
        for key, name, group, direction in explained
        for sign in SIGNS
        if sign in direction.get("explanations", {})
    ]
    return run | {
        "seconds": _round(explanations["seconds"]),
        "settings": explanations.get("settings", {}),
        "summary": _rounded(explanations["summary"]),
        "features": features,
    }


def _feature(key: str, name: str, group: str, sign: str, explanation: dict) -> dict:
    kinds = ("detection", "fuzzing", "shuffled")  # a neuron's has no shuffled baseline
    scores = {key: _rounded(explanation[key]) for key in kinds if key in explanation}
    return {"key": key, "name": name, "group": group, "sign": sign, "text": explanation["text"]} | (
        scores
    )


def _rounded(value: object) -> object:
    """Every float inside `value` rounded for display."""
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {key: _rounded(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _compact_effects(effects: dict, strings: dict[str, int]) -> dict:
    """The run's effects but for kl_tokens (a blob of its own) and the pinned samples (in
    their directions), with the clamps in the order the page shows them."""
    return {key: effects[key] for key in ("num_examples", "num_tokens", "max_length")} | {
        "kl_vs_base": _round(effects["kl_vs_base"]),
        "attribution_spearman": _round_or_none(effects["attribution_spearman"]),
        "layers": [_round_group(g, "layer") for g in effects["layers"]],
        "modules": [_round_group(g, "module") for g in effects["modules"]],
        "kl_rows": list(effects["kl_tokens"]),  # the rows coloured by KL, in "kl-tokens"
        "prompts": [
            {
                "example_index": p["example_index"],
                "tokens": [_intern(t, strings) for t in p["tokens"]],
            }
            for p in effects["prompts"]
        ],
        "clamps": CLAMPS,
    }


def _round_group(group: dict, name: str) -> dict:
    return {name: group[name]} | {
        key: _round(group[key]) for key in ("ablation_kl", "ablation_dloss")
    }


def _pinned_samples(effects: dict | None, strings: dict[str, int]) -> dict[str, list[dict]]:
    """effects.steering by the key of its direction, each entry without what the key says
    and without its text (the page shows its tokens)."""
    pinned: dict[str, list[dict]] = {}
    for entry in effects["steering"] if effects else ():
        key = direction_key(entry["layer"], entry["module"], entry["component"])
        pinned.setdefault(key, []).append({
            "prompt_index": entry["prompt_index"],
            "clamp": entry["clamp"],
            "value": _round_or_none(entry["value"]),
            "tokens": [_intern(t, strings) for t in entry["tokens"]],
        })  # fmt: skip
    return pinned


def _compact_sequences(examples: dict, strings: dict[str, int]) -> dict[str, list[int]]:
    return {
        index: [_intern(token, strings) for token in example["tokens"]]
        for index, example in examples.items()
    }


def _malformed_as_error(where: str, compact: Callable[..., dict], *args: object) -> dict:
    try:
        return compact(*args)
    except KeyError as e:
        raise DashboardError(f"malformed activations file: {where} lacks {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise DashboardError(f"malformed activations file: {where}: {e}") from None


def _compact_cross_layer_cosine(cosine: dict, data: dict) -> dict:
    """The matrix as its upper triangle above the diagonal (it is symmetric, with ones there),
    and each label's vector: its layer, the key of its direction and its side (A or B)."""
    upper = [
        [round(x, COSINE_DECIMALS) for x in row[i + 1 :]] for i, row in enumerate(cosine["matrix"])
    ]
    vectors = {
        vector_label(d.module, side, d.component, d.layer): {
            "layer": d.layer,
            "key": d.key,
            "side": side,
        }
        for d in iter_directions(data)
        for side in ("A", "B")
    }
    unknown = [label for label in cosine["labels"] if label not in vectors]
    if unknown:
        raise ValueError(f"label {json.dumps(unknown[0])} names no direction of the file")
    return {
        "labels": cosine["labels"],
        "vectors": [vectors[label] for label in cosine["labels"]],
        "upper": upper,
    }


def _compact_layer(layer: dict, strings: dict[str, int], pinned: dict[str, list[dict]]) -> dict:
    projections = sorted(layer["projections"].items(), key=lambda item: module_order(item[0]))
    return {
        "layer": layer["layer"],
        # Python dicts and JS objects both keep insertion order, so this order is the page's.
        "projections": {
            module: _compact_projection(layer["layer"], module, p, strings, pinned)
            for module, p in projections
        },
        "cosine_similarities": [
            {"space": c["space"], "labels": c["labels"], "matrix": _round_rows(c["matrix"])}
            for c in layer["cosine_similarities"]
        ],
    }


def _compact_projection(
    layer: int, module: str, projection: dict, strings: dict[str, int], pinned: dict[str, list]
) -> dict:
    rank = projection["rank"]
    directions = []
    for d in projection["directions"]:
        key = direction_key(layer, module, d["component"])
        page = {"key": key, "name": direction_name(module, d["component"], rank)}
        page |= _compact_direction(d, strings)
        if "effects" in d:
            page["effects"] = _compact_direction_effects(d["effects"], pinned.get(key, []), strings)
        directions.append(page)
    return {
        "rank": rank,
        "scaling": _round(projection["scaling"]),
        "read_site": projection["read_site"],
        "directions": directions,
    }


def _compact_direction_effects(effects: dict, pinned: list[dict], strings: dict[str, int]) -> dict:
    """Its measures, its attribution examples as rows of ATTRIBUTION_FIELDS, its pinned
    samples."""
    page = {key: _round(effects[key]) for key in EFFECT_MEASURES}
    for side in ATTRIBUTION_LISTS:
        page[side] = [_compact_attribution_example(e, strings) for e in effects[side]]
    return page | {"pinned": pinned}


def _compact_attribution_example(example: dict, strings: dict[str, int]) -> list:
    """The example as a row of ATTRIBUTION_FIELDS: the row of EXAMPLE_FIELDS with the
    attributions in place of the siblings."""
    row = _compact_example(example, strings)[: len(ATTRIBUTION_FIELDS) - 1]
    return [*row, _fixed(example["attributions"], example["attribution"])]


def _compact_direction(direction: dict, strings: dict[str, int]) -> dict:
    page = {
        "component": direction["component"],
        "a_norm": _round(direction["a_norm"]),
        "b_norm": _round(direction["b_norm"]),
        # scaling·‖B‖: |what the direction adds| per unit activation
        "write_norm_scale": _round(direction["write_norm_scale"]),
    } | _compact_summaries(direction, strings)
    siblings = _sibling_modules(direction)
    if siblings is not None:
        page["siblings"] = siblings
    if "logit_effects" in direction:  # modules that write into the residual stream
        page["logit_effects"] = _compact_logit_effects(direction["logit_effects"], strings)
    return page


def _compact_summaries(direction: dict, strings: dict[str, int]) -> dict:
    """What a direction, a baseline neuron and an SAE feature all carry: statistics, examples,
    profiles (a feature, >= 0, has no top_negative, and so no bottom_tokens)."""
    stats, hist = direction["stats"], direction["histogram"]
    page = {
        "stats": {key: _round(stats[key]) for key in ("min", "max", "mean", "std")}
        | {key: stats[key] for key in ("count", "nonfinite")},
        "histogram": {
            "edges": [_round(x, EDGE_DIGITS) for x in hist["edges"]],
            "counts": hist["counts"],
        },
        "top_positive": _compact_examples(direction["top_positive"], strings),
        "quantile_samples": _compact_quantile_samples(direction["quantile_samples"], strings),
        "top_tokens": _compact_token_table(direction.get("top_tokens", []), strings),
        "position_profile": _compact_position_profile(direction["position_profile"]),
    }
    if "top_negative" in direction:
        page["top_negative"] = _compact_examples(direction["top_negative"], strings)
        page["bottom_tokens"] = _compact_token_table(direction.get("bottom_tokens", []), strings)
    return page


def _compact_examples(examples: list[dict], strings: dict[str, int]) -> list[list]:
    return [_compact_example(e, strings) for e in examples]


def _compact_example(example: dict, strings: dict[str, int]) -> list:
    """The example as a row of EXAMPLE_FIELDS."""
    row = [
        example["example_index"],
        example["token_index"],
        example["target"],
        [_intern(token, strings) for token in example["tokens"]],
        _fixed(example["activations"], example["activations"][example["target"]]),
    ]
    if "sibling_activations" in example:  # in the order of the direction's "siblings"
        siblings = example["sibling_activations"]
        row.append([_fixed(siblings[module]) for module in sorted(siblings)])
    return row


def _sibling_modules(direction: dict) -> list[str] | None:
    """The modules whose activations the direction's examples carry, named once for them all
    (None: no example carries sibling activations)."""
    carried = {
        tuple(sorted(e["sibling_activations"]))
        for e in iter_examples(direction)
        if "sibling_activations" in e
    }
    if len(carried) > 1:
        raise ValueError("its examples carry sibling_activations of different modules")
    return list(carried.pop()) if carried else None


def _fixed(values: list[float | None], anchor: float | None = None) -> list[int | None]:
    """A context's values as integers in units of 10**-e, after e itself: about half the
    characters of decimal numbers, where contexts are most of the page.

    e gives `anchor` (the example's own value), or else the largest |value|, DISPLAY_DIGITS
    significant digits, and the largest at most two more; null (NaN or Inf) stays null.
    """
    magnitudes = [abs(v) for v in values if v]
    if not magnitudes:
        return [0, *(None if v is None else 0 for v in values)]
    e = DISPLAY_DIGITS - 1 - math.floor(math.log10(max(magnitudes)))
    if anchor:
        e = min(DISPLAY_DIGITS - 1 - math.floor(math.log10(abs(anchor))), e + 2)
    return [e, *(None if v is None else round(v * 10.0**e) for v in values)]


def _compact_quantile_samples(samples: list[dict], strings: dict[str, int]) -> list[dict]:
    return [
        {
            "sign": s["sign"],
            "quantile_range": _round_all(s["quantile_range"]),
            "value_range": _round_all(s["value_range"]),
            "examples": _compact_examples(s["examples"], strings),
        }
        for s in samples
    ]


def _compact_token_table(rows: list[dict], strings: dict[str, int]) -> list[dict]:
    return [
        {"token": _intern(row["token"], strings), "count": row["count"]}
        | {key: _round(row[key]) for key in ("mean", "min", "max")}
        for row in rows
    ]


def _compact_position_profile(profile: dict) -> dict:
    return {
        "edges": profile["edges"],
        "mean": _round_all(profile["mean"]),
        "count": profile["count"],
    }


def _compact_logit_effects(effects: dict, strings: dict[str, int]) -> dict:
    return {
        side: [{"token": _intern(e["token"], strings), "value": _round(e["value"])} for e in rows]
        for side, rows in effects.items()
    }


def _intern(token: str, strings: dict[str, int]) -> int:
    """The token's index in the page's string table, which stores each string once."""
    return strings.setdefault(token, len(strings))


def _round_rows(matrix: list[list[float]]) -> list[list[float]]:
    return [_round_all(row) for row in matrix]


def _round_all(values: list[float | None]) -> list[float | None]:
    """Rounded for display; null (a value that was NaN or Inf) stays null."""
    return [None if x is None else _round(x) for x in values]


def _round_or_none(x: float | None) -> float | None:
    return None if x is None else _round(x)


def _round(x: float, digits: int = DISPLAY_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Render a LoRA activations JSON file as one self-contained HTML dashboard."
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("backend/activations_data.json"),
        help="activations JSON written by backend/generate_activations_data.py "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("lora_activations_dashboard.html"),
        help="HTML file to write; replaced atomically (default: %(default)s)",
    )
    parser.add_argument(
        "--title",
        default="LoRA activations dashboard",
        help="page title and heading (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = load_activations(args.data)
        html = render_dashboard(data, args.title)
        # Lone surrogates (valid in JSON strings, not in UTF-8) become "?" rather than fail.
        write_atomic(args.output, lambda f: f.write(html.encode("utf-8", errors="replace")))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size_mb = args.output.stat().st_size / 1e6
    print(f"wrote {args.output} ({size_mb:.2f} MB, {len(data['layers'])} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
