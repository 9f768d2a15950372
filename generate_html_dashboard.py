"""Render an activations file (docs/data-format.md) as one self-contained HTML page.

The page carries its data as JSON in a <script type="application/json"> element and draws one
layer at a time with the JavaScript in templates/dashboard.js. To keep a full-size run small,
the embedded data is the input with its floats rounded for display (DISPLAY_DIGITS significant
digits; the page shows values exactly as embedded), the keys the page does not use dropped,
each token string stored once in a table that examples, token tables and logit effects index
into, and examples written as rows of EXAMPLE_FIELDS rather than objects.
"""

from __future__ import annotations

import argparse
import base64
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
from backend.contract import SCHEMA_VERSION, ContractError, module_order, validate

TEMPLATES = Path(__file__).resolve().parent / "templates"
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
)
# Metadata of newer runs, shown only when the file has it.
OPTIONAL_HEADER_FIELDS = (
    ("min token count", "min_token_count"),
    ("non-finite values", "num_nonfinite"),
)
# Characters that must not appear raw inside <script>: "<" could close it or open "<!--",
# U+2028/U+2029 break older JS parsers, and lone surrogates cannot be encoded as UTF-8.
SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")
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
    css, js = inline_asset("dashboard.css"), inline_asset("dashboard.js")
    return env.get_template("dashboard.html.j2").render(
        title=title,
        fields=header_fields(data["metadata"]),
        data_json=script_json(compact_data(data)),
        css=css,
        js=js,
        csp=content_security_policy(css, js),
    )


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
    present = tuple(field for field in OPTIONAL_HEADER_FIELDS if field[1] in metadata)
    return [(label, _display(metadata.get(key))) for label, key in HEADER_FIELDS + present]


def _display(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def script_json(value: object) -> Markup:
    """JSON that is inert inside <script type="application/json">; JSON.parse undoes the
    \\uXXXX escapes, so the data the page reads is unchanged."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return Markup(SCRIPT_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def compact_data(data: dict) -> dict:
    """What the page embeds: the input's shape, with every token string (of examples, token
    tables, logit effects) as an index into "strings", floats rounded for display, and keys
    the page does not use dropped. Optional fields are kept only where the input has them."""
    strings: dict[str, int] = {}
    layers = [
        _malformed_as_error(f"layers[{i}]", _compact_layer, layer, strings)
        for i, layer in enumerate(data["layers"])
    ]
    page = {"metadata": data["metadata"], "example_fields": EXAMPLE_FIELDS, "layers": layers}
    if "cross_layer_cosine" in data:
        page["cross_layer_cosine"] = _malformed_as_error(
            "cross_layer_cosine", _compact_cross_layer_cosine, data["cross_layer_cosine"]
        )
    if "examples" in data:  # --store-sequences: each shown example's whole token sequence
        page["sequences"] = _malformed_as_error(
            "examples", _compact_sequences, data["examples"], strings
        )
    return page | {"strings": list(strings)}


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


def _compact_cross_layer_cosine(cosine: dict) -> dict:
    """The matrix as its upper triangle above the diagonal: it is symmetric, with ones there."""
    upper = [
        [round(x, COSINE_DECIMALS) for x in row[i + 1 :]] for i, row in enumerate(cosine["matrix"])
    ]
    return {"labels": cosine["labels"], "upper": upper}


def _compact_layer(layer: dict, strings: dict[str, int]) -> dict:
    projections = sorted(layer["projections"].items(), key=lambda item: module_order(item[0]))
    return {
        "layer": layer["layer"],
        # Python dicts and JS objects both keep insertion order, so this order is the page's.
        "projections": {name: _compact_projection(p, strings) for name, p in projections},
        "cosine_similarities": [
            {"space": c["space"], "labels": c["labels"], "matrix": _round_rows(c["matrix"])}
            for c in layer.get("cosine_similarities", [])
        ],
    }


def _compact_projection(projection: dict, strings: dict[str, int]) -> dict:
    return {
        "rank": projection["rank"],
        "scaling": _round(projection["scaling"]),
        "read_site": projection.get("read_site", "?"),
        "directions": [_compact_direction(d, strings) for d in projection["directions"]],
    }


def _compact_direction(direction: dict, strings: dict[str, int]) -> dict:
    stats, hist = direction["stats"], direction["histogram"]
    page = {
        "component": direction["component"],
        "a_norm": _round(direction["a_norm"]),
        "b_norm": _round(direction["b_norm"]),
        "stats": {key: _round(stats[key]) for key in ("min", "max", "mean", "std")}
        | {key: stats[key] for key in ("count", "nonfinite") if key in stats},
        "histogram": {
            "edges": [_round(x, EDGE_DIGITS) for x in hist["edges"]],
            "counts": hist["counts"],
        },
        "top_positive": _compact_examples(direction["top_positive"], strings),
        "top_negative": _compact_examples(direction["top_negative"], strings),
    }
    siblings = _sibling_modules(direction)
    if siblings is not None:
        page["siblings"] = siblings
    for key, compact in OPTIONAL_DIRECTION_FIELDS.items():
        if key in direction:
            page[key] = compact(direction[key], strings)
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
    examples = direction["top_positive"] + direction["top_negative"]
    examples += [e for s in direction.get("quantile_samples", []) for e in s["examples"]]
    carried = {
        tuple(sorted(e["sibling_activations"])) for e in examples if "sibling_activations" in e
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


def _compact_position_profile(profile: dict, strings: dict[str, int]) -> dict:
    page = {"edges": profile["edges"], "mean": _round_all(profile["mean"])}
    return page | ({"count": profile["count"]} if "count" in profile else {})


def _compact_logit_effects(effects: dict, strings: dict[str, int]) -> dict:
    return {
        side: [{"token": _intern(e["token"], strings), "value": _round(e["value"])} for e in rows]
        for side, rows in effects.items()
    }


# The fields of the contract's second part, each compacted where the input has it.
OPTIONAL_DIRECTION_FIELDS: dict[str, Callable[[object, dict[str, int]], object]] = {
    "write_norm_scale": lambda value, strings: _round(value),
    "quantile_samples": _compact_quantile_samples,
    "top_tokens": _compact_token_table,
    "bottom_tokens": _compact_token_table,
    "position_profile": _compact_position_profile,
    "logit_effects": _compact_logit_effects,
}


def _intern(token: str, strings: dict[str, int]) -> int:
    """The token's index in the page's string table, which stores each string once."""
    return strings.setdefault(token, len(strings))


def _round_rows(matrix: list[list[float]]) -> list[list[float]]:
    return [_round_all(row) for row in matrix]


def _round_all(values: list[float | None]) -> list[float | None]:
    """Rounded for display; null (a value that was NaN or Inf) stays null."""
    return [None if x is None else _round(x) for x in values]


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
