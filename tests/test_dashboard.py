"""generate_html_dashboard.py without a browser: rendering, escaping, errors, atomic output."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend.atomic
import generate_html_dashboard as dashboard
from backend.contract import ContractError, iter_directions, iter_examples, validate
from tests.synthetic import HOSTILE_TOKENS, assert_consistent, make_activations, unfixed

ROOT = Path(__file__).resolve().parent.parent
DATA_BLOCK = re.compile(
    r'<script type="application/octet-stream" id="dashboard-data">\n(.*?)</script>', re.DOTALL
)
QWEN_32B_SHAPE = {"n_layers": 64, "k": 16, "window": 10, "bins": 50}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def render(tmp_path: Path, data: dict, *extra: str) -> str:
    out = tmp_path / "out.html"
    assert dashboard.main(["--data", str(write_json(tmp_path / "in.json", data)),
                           "--output", str(out), *extra]) == 0  # fmt: skip
    return out.read_text(encoding="utf-8")


def blobs(html: str) -> dict[str, object]:
    """The page's data blobs by name: each line of its data element is a name and its
    gzip-compressed JSON in base 85 (RFC 1924's, "." for "<")."""
    (block,) = DATA_BLOCK.findall(html)
    lines = (line.split(" ") for line in block.splitlines())
    return {
        name: json.loads(gzip.decompress(base64.b85decode(blob.replace(".", "<"))))
        for name, blob in lines
    }


def embedded(html: str) -> dict:
    """The page's data put back together from its blobs, as compact_data gives it."""
    found = blobs(html)
    page = found.pop("index")
    overview = page.pop("overview")
    vectors = page.pop("cross_layer_vectors", None)
    neuron_layers = page.pop("baseline_neuron_layers", None)
    page["layers"] = [found.pop(f"layer-{i}") for i in range(len(overview))]
    for name in ("cross_layer_cosine", "sequences", "kl_tokens", "baseline_neurons"):
        if name.replace("_", "-") in found:
            page[name] = found.pop(name.replace("_", "-"))
    assert not found, f"blobs of nothing: {list(found)}"
    assert vectors == (len(page["cross_layer_cosine"]["labels"]) if vectors else None)
    if neuron_layers:  # by layer, in order
        keys = [key for group in neuron_layers for key in group["keys"]]
        assert keys == [n["key"] for n in page["baseline_neurons"]]
    return page


def page_examples(page_data: dict, direction: dict, rows: list[list]) -> list[dict]:
    """A direction's embedded example rows as dicts: tokens read back from the page's string
    table, values from fixed point ([e, integers in units of 10**-e]), sibling activations
    named by the direction's "siblings"."""
    examples = [dict(zip(page_data["example_fields"], row, strict=False)) for row in rows]
    for example in examples:
        example["tokens"] = [page_data["strings"][i] for i in example["tokens"]]
        example["activations"] = unfixed(example["activations"])
        if "sibling_activations" in example:
            siblings = zip(direction["siblings"], example["sibling_activations"], strict=True)
            example["sibling_activations"] = {m: unfixed(v) for m, v in siblings}
    return examples


def all_page_examples(page_data: dict) -> list[dict]:
    """Every embedded example: top lists and quantile samples."""
    return [
        example
        for layer in page_data["layers"]
        for projection in layer["projections"].values()
        for direction in projection["directions"]
        for rows in [direction["top_positive"], direction["top_negative"]]
        + [s["examples"] for s in direction.get("quantile_samples", [])]
        for example in page_examples(page_data, direction, rows)
    ]


def tokens_of(page_data: dict) -> list[list[str]]:
    """Every example's context tokens, read back from the page's string table."""
    return [example["tokens"] for example in all_page_examples(page_data)]


# ---- rendering ----------------------------------------------------------------------------


def test_main_renders_a_page_and_prints_a_summary(tmp_path, capsys):
    html = render(tmp_path, make_activations(n_layers=3), "--title", "Run <7>")
    assert html.startswith("<!DOCTYPE html>")
    assert "<title>Run &lt;7&gt;</title>" in html
    assert "synthetic/Qwen2-like" in html  # the header's metadata
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"wrote {tmp_path / 'out.html'}") and "3 layers" in out


def test_default_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "backend").mkdir()
    write_json(tmp_path / "backend" / "activations_data.json", make_activations())
    assert dashboard.main([]) == 0
    assert (tmp_path / "lora_activations_dashboard.html").stat().st_size > 0


def test_page_is_self_contained(tmp_path):
    html = render(tmp_path, make_activations())
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html and "fetch(" not in html
    assert csp_of(html).startswith("default-src 'none';")


def csp_of(html: str) -> str:
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html)[1]
    return unescape(policy)


def test_csp_hashes_match_the_inline_style_and_script(tmp_path):
    html = render(tmp_path, make_activations())
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    csp = csp_of(html)
    for text in (style, script):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"sha256-{digest}" in csp


def test_embedded_data_round_trips(tmp_path):
    data = make_activations(n_layers=2, modules=["gate_proj", "q_proj"], rank=2, seed=3)
    page_data = embedded(render(tmp_path, data))
    assert page_data == json.loads(json.dumps(dashboard.compact_data(data)))
    assert [layer["layer"] for layer in page_data["layers"]] == [0, 1]
    assert tokens_of(page_data) == tokens_of_input(data)
    original = data["layers"][1]["projections"]["q_proj"]["directions"][1]["top_negative"][0]
    direction = page_data["layers"][1]["projections"]["q_proj"]["directions"][1]
    (shown, *_) = page_examples(page_data, direction, direction["top_negative"])
    largest = max(abs(x) for x in original["activations"])  # fixed point: one unit for all
    assert shown["activations"] == pytest.approx(original["activations"], abs=1e-3 * largest)
    target = shown["activations"][shown["target"]]
    assert target == float(f"{original['activation']:.4g}")
    assert "sibling_activations" in shown


def tokens_of_input(data: dict) -> list[list[str]]:
    return [e["tokens"] for ref in iter_directions(data) for e in iter_examples(ref.direction)]


def test_new_fields_are_compacted():
    data = make_activations(n_layers=2, modules=["gate_proj", "up_proj", "down_proj"], seed=5)
    direction = data["layers"][0]["projections"]["down_proj"]["directions"][0]
    direction["top_positive"][0]["activations"][0] = None  # was NaN or Inf
    direction["top_positive"][0]["sibling_activations"]["up_proj"][0] = None
    direction["position_profile"]["mean"][-1] = None
    page_data = dashboard.compact_data(data)
    strings = page_data["strings"]
    shown = page_data["layers"][0]["projections"]["down_proj"]["directions"][0]
    four = lambda x: float(f"{x:.4g}")  # noqa: E731
    assert shown["write_norm_scale"] == four(direction["write_norm_scale"])
    assert shown["stats"]["nonfinite"] == direction["stats"]["nonfinite"]
    # Quantile samples: ranges rounded, examples rows through the same token table.
    (samples, *_) = shown["quantile_samples"]
    original = direction["quantile_samples"][0]
    assert samples["value_range"] == [four(x) for x in original["value_range"]]
    assert samples["quantile_range"] == original["quantile_range"]
    examples = page_examples(page_data, shown, samples["examples"])
    assert [e["tokens"] for e in examples] == [e["tokens"] for e in original["examples"]]
    # Nulls stay null; sibling activations are rounded like the direction's own.
    (top, *_) = page_examples(page_data, shown, shown["top_positive"])
    assert top["activations"][0] is None and top["sibling_activations"]["up_proj"][0] is None
    original_siblings = direction["top_positive"][0]["sibling_activations"]["gate_proj"]
    largest = max(abs(x) for x in original_siblings)  # 4 digits for it, the same unit for all
    assert top["sibling_activations"]["gate_proj"] == pytest.approx(
        original_siblings, abs=0.5 * 10 ** (math.floor(math.log10(largest)) - 3)
    )
    assert max(map(abs, top["sibling_activations"]["gate_proj"])) == four(largest)
    # Token tables and logit effects: token strings through the table, values rounded.
    for key in ("top_tokens", "bottom_tokens"):
        for row, original_row in zip(shown[key], direction[key], strict=True):
            assert strings[row["token"]] == original_row["token"]
            assert row["count"] == original_row["count"]
            assert row["mean"] == four(original_row["mean"])
    for side in ("top", "bottom"):
        effects = direction["logit_effects"][side]
        assert [(strings[e["token"]], e["value"]) for e in shown["logit_effects"][side]] == [
            (e["token"], four(e["value"])) for e in effects
        ]
    profile = shown["position_profile"]
    assert profile["edges"] == direction["position_profile"]["edges"]
    assert profile["count"] == direction["position_profile"]["count"]
    assert profile["mean"][-1] is None
    # The cross-layer cosine matrix: 3 decimals.
    cosine = page_data["cross_layer_cosine"]
    assert cosine["labels"] == data["cross_layer_cosine"]["labels"]
    matrix = data["cross_layer_cosine"]["matrix"]  # embedded: the triangle above the diagonal
    assert [len(row) for row in cosine["upper"]] == list(range(len(matrix) - 1, -1, -1))
    assert cosine["upper"][0][0] == round(matrix[0][1], 3)
    assert cosine["upper"][2][1] == round(matrix[2][4], 3) == round(matrix[4][2], 3)


def test_header_shows_every_metadata_field():
    metadata = make_activations()["metadata"]
    header = dict(dashboard.header_fields(metadata))
    assert header["min token count"] == "5"
    assert header["non-finite values"] == f"{metadata['num_nonfinite']:,}"
    assert header["model"] == "synthetic/Qwen2-like" and header["top k"] == "4"


def test_the_page_gets_keys_names_and_write_scales():
    """The script derives no contract fact: every direction comes with its key, its name and
    its write scale, and each cross-layer vector with its layer, direction and side."""
    data = make_activations(n_layers=2, modules=["o_proj", "q_proj", "up_proj"], rank=2, seed=8)
    page_data = dashboard.compact_data(data)
    shown = page_data["layers"][1]["projections"]
    assert list(shown) == ["up_proj", "q_proj", "o_proj"]
    q1 = shown["q_proj"]["directions"][1]
    assert (q1["key"], q1["name"]) == ("L1.q_proj[1]", "q_proj[1]")
    original = data["layers"][1]["projections"]["q_proj"]["directions"][1]
    assert q1["write_norm_scale"] == float(f"{original['write_norm_scale']:.4g}")
    cosine = page_data["cross_layer_cosine"]
    assert cosine["labels"] == data["cross_layer_cosine"]["labels"]
    at = cosine["labels"].index("L1.o_proj.B[1]")
    assert cosine["vectors"][at] == {"layer": 1, "key": "L1.o_proj[1]", "side": "B"}
    assert cosine["vectors"][0] == {"layer": 0, "key": "L0.o_proj[0]", "side": "B"}
    rank1 = dashboard.compact_data(make_activations(n_layers=1, modules=["gate_proj"]))
    gate = rank1["layers"][0]["projections"]["gate_proj"]["directions"][0]
    assert (gate["key"], gate["name"]) == ("L0.gate_proj[0]", "gate_proj")


def test_the_index_blob_holds_the_overview_and_no_layer(tmp_path):
    data = make_activations(n_layers=3, modules=["gate_proj", "down_proj"], seed=2)
    found = blobs(render(tmp_path, data))
    assert list(found) == ["index", "layer-0", "layer-1", "layer-2", "cross-layer-cosine"]
    index = found["index"]
    assert "layers" not in index and "cross_layer_cosine" not in index
    assert index["cross_layer_vectors"] == 6
    (gate, down) = index["overview"][2]["directions"]
    direction = data["layers"][2]["projections"]["down_proj"]["directions"][0]
    four = lambda x: float(f"{x:.4g}")  # noqa: E731
    assert index["overview"][2]["layer"] == 2 and gate["key"] == "L2.gate_proj[0]"
    assert down == {
        "key": "L2.down_proj[0]",
        "name": "down_proj",
        "write_norm_scale": four(direction["write_norm_scale"]),
        "min": four(direction["stats"]["min"]),
        "max": four(direction["stats"]["max"]),
        "std": four(direction["stats"]["std"]),
    }


def test_modules_are_ordered_mlp_first_then_attention(tmp_path):
    data = make_activations(modules=["o_proj", "down_proj", "q_proj", "gate_proj", "custom"])
    page_data = embedded(render(tmp_path, data))
    order = list(page_data["layers"][0]["projections"])
    assert order == ["gate_proj", "down_proj", "q_proj", "o_proj", "custom"]


# ---- untrusted text ---------------------------------------------------------------------


def test_hostile_tokens_never_appear_raw(tmp_path):
    data = make_activations(hostile_tokens=True)
    html = render(tmp_path, data, "--title", "<script>alert(5)</script>")
    assert "<img" not in html.lower()
    assert html.lower().count("<script") == 2  # the data block and our own script
    assert html.lower().count("</script") == 2
    assert "<script>alert" not in html  # metadata and title are escaped too
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in html
    assert "\u2028" not in html and "\u2029" not in html
    (block,) = DATA_BLOCK.findall(html)  # the data: names and base 85 text, nothing else
    assert re.fullmatch(r"([a-z0-9-]+ [0-9A-Za-z!#$%&()*+\-;.=>?@^_`{|}~]+\n)+", block)
    assert "<" not in block
    assert set(HOSTILE_TOKENS) <= {t for tokens in tokens_of(embedded(html)) for t in tokens}


def test_lone_surrogate_token_is_escaped_not_fatal(tmp_path):
    data = make_activations()
    example = data["layers"][0]["projections"]["gate_proj"]["directions"][0]["top_positive"][0]
    example["tokens"][0] = "\ud800"
    out = tmp_path / "out.html"
    path = tmp_path / "in.json"
    path.write_text(json.dumps(data), encoding="ascii")  # json.dumps writes it as \ud800
    assert dashboard.main(["--data", str(path), "--output", str(out)]) == 0
    html = out.read_bytes().decode("utf-8")  # still valid UTF-8
    assert "\ud800" in embedded(html)["strings"]


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.text(), min_size=1, max_size=6))
def test_any_token_text_survives_the_embedding(tokens):
    data = make_activations(n_layers=1, modules=["up_proj"], k=1)
    example = data["layers"][0]["projections"]["up_proj"]["directions"][0]["top_positive"][0]
    example.update(tokens=tokens, activations=[0.5] * len(tokens), target=0)
    example.pop("sibling_activations")
    html = dashboard.render_dashboard(data, "t")
    assert tokens_of(embedded(html))[0] == tokens
    assert html.lower().count("</script") == 2


# ---- errors -----------------------------------------------------------------------------


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input file, what the error message must mention)."""
    good = make_activations()
    no_version = {k: v for k, v in good.items() if k != "schema_version"}
    malformed = make_activations()
    del malformed["layers"][0]["projections"]["up_proj"]["directions"][0]["histogram"]
    no_matrix = make_activations()
    del no_matrix["cross_layer_cosine"]["matrix"]
    bad_sample = make_activations()
    sampled = bad_sample["layers"][1]["projections"]["down_proj"]["directions"][0]
    del sampled["quantile_samples"][0]["value_range"]
    no_write_scale = make_activations()
    del no_write_scale["layers"][1]["projections"]["gate_proj"]["directions"][0]["write_norm_scale"]
    stray_label = make_activations()
    stray_label["cross_layer_cosine"]["labels"][2] = "L7.gate_proj.A[0]"
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"layers": [', encoding="utf-8")
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(good).replace('"dtype": "bfloat16"', '"dtype": NaN'))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    return {
        "missing": (tmp_path / "nope.json", "no such file"),
        "invalid": (invalid, "invalid JSON"),
        "nan": (nan, "NaN"),
        "binary": (binary, "UTF-8"),
        "directory": (tmp_path, "cannot read"),
        "list": (write_json(tmp_path / "list.json", [1, 2]), "not an activations file"),
        "no layers": (write_json(tmp_path / "m.json", {"metadata": {}}), "not an activations"),
        "version 99": (write_json(tmp_path / "v.json", good | {"schema_version": 99}), "99"),
        "version true": (write_json(tmp_path / "t.json", good | {"schema_version": True}), "true"),
        "version text": (write_json(tmp_path / "s.json", good | {"schema_version": "1"}), '"1"'),
        "no version": (write_json(tmp_path / "nv.json", no_version), "schema_version"),
        "malformed": (write_json(tmp_path / "mal.json", malformed), "histogram"),
        "cross-layer": (write_json(tmp_path / "x.json", no_matrix), "cross_layer_cosine.matrix"),
        "quantiles": (
            write_json(tmp_path / "q.json", bad_sample),
            "layers[1].projections.down_proj.directions[0]"
            ".quantile_samples[0].value_range: missing",
        ),
        "write scale": (
            write_json(tmp_path / "w.json", no_write_scale),
            "write_norm_scale: missing",
        ),
        "stray label": (
            write_json(tmp_path / "l.json", stray_label),
            "L7.gate_proj.A[0]",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "invalid", "nan", "binary", "directory", "list", "no layers", "version 99",
     "version true", "version text", "no version", "malformed", "cross-layer", "quantiles",
     "write scale", "stray label"],
)  # fmt: skip
def test_bad_input_is_one_clear_line(tmp_path, capsys, case):
    path, mention = bad_inputs(tmp_path)[case]
    out = tmp_path / "out.html"
    assert dashboard.main(["--data", str(path), "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mention in lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_unknown_version_names_the_version_and_the_known_one(tmp_path, capsys):
    path = write_json(tmp_path / "v.json", make_activations() | {"schema_version": 99})
    assert dashboard.main(["--data", str(path), "--output", str(tmp_path / "o.html")]) == 1
    assert "schema_version 99 (known: 1)" in capsys.readouterr().err


def test_script_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate_html_dashboard.py"), "--data", "absent.json",
         "--output", str(tmp_path / "o.html")],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == "error: absent.json: no such file\n"


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        dashboard.main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--data", "--output", "--title"):
        assert re.search(rf"{option} \S+\s+\w", help_text)


# ---- atomic output ----------------------------------------------------------------------


def test_success_leaves_no_temporary_file(tmp_path):
    render(tmp_path, make_activations())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.html"]
    assert (tmp_path / "out.html").stat().st_mode & 0o777 == 0o644


def test_error_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out.html"
    out.write_text("previous")
    path = write_json(tmp_path / "v.json", {"layers": [], "metadata": {}, "schema_version": 2})
    assert dashboard.main(["--data", str(path), "--output", str(out)]) == 1
    assert out.read_text() == "previous"


def test_failed_write_keeps_the_previous_output_and_no_temporary(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.html"
    out.write_text("previous")
    path = write_json(tmp_path / "in.json", make_activations())

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backend.atomic.os, "replace", fail)
    assert dashboard.main(["--data", str(path), "--output", str(out)]) == 1
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.html"]
    assert "No space left on device" in capsys.readouterr().err


def test_unwritable_output_directory_is_a_clear_error(tmp_path, capsys):
    path = write_json(tmp_path / "in.json", make_activations())
    out = tmp_path / "in.json" / "out.html"  # its "directory" is a file
    assert dashboard.main(["--data", str(path), "--output", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {out}: cannot write")


def test_inline_assets_cannot_end_their_element(tmp_path, monkeypatch):
    (tmp_path / "bad.js").write_text("const s = '</SCRIPT>';")
    monkeypatch.setattr(dashboard, "TEMPLATES", tmp_path)
    with pytest.raises(RuntimeError, match=r"bad\.js"):
        dashboard.inline_asset("bad.js")


# ---- size -------------------------------------------------------------------------------


def test_qwen_32b_shaped_run_is_under_5_mb(tmp_path):
    """With every field of the contract: quantile samples, sibling activations, the cross-layer
    cosines of 192 vectors."""
    data = make_activations(**QWEN_32B_SHAPE, seed=7)
    html = render(tmp_path, data)
    assert len(html.encode()) < 5_000_000
    page_data = embedded(html)
    assert len(page_data["layers"]) == 64
    assert len(page_data["cross_layer_cosine"]["labels"]) == 192


# ---- the synthetic builder --------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n_layers=st.integers(0, 3),
    modules=st.lists(
        st.sampled_from(["gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"]),
        unique=True,
        min_size=1,
    ),
    rank=st.integers(1, 3),
    k=st.integers(1, 5),
    window=st.integers(0, 4),
    bins=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    hostile=st.booleans(),
    effects=st.booleans(),
    explanations=st.booleans(),
    neurons=st.integers(0, 2),
)
def test_synthetic_data_is_contract_valid(
    n_layers, modules, rank, k, window, bins, seed, hostile, effects, explanations, neurons
):
    args = (n_layers, modules, rank, k, window, bins, seed, hostile)
    extras = {"effects": effects, "explanations": explanations, "baseline_neurons": neurons}
    data = make_activations(*args, **extras)
    validate(data)
    assert_consistent(data)
    assert json.loads(json.dumps(data)) == data  # plain JSON, no NaN
    assert data == make_activations(*args, **extras)
    # The rest is the file without them.
    for key in ("effects", "examples", "explanations", "baseline_neurons"):
        data.pop(key, None)
    for ref in iter_directions(data):
        for key in ("effects", "explanations"):
            ref.direction.pop(key, None)
    assert data == make_activations(*args)


def broken_top_list(direction: dict) -> None:
    direction["top_positive"].reverse()


def broken_quantile_sample(direction: dict) -> None:
    samples = direction["quantile_samples"][0]
    example = samples["examples"][0]
    example["activation"] = example["activations"][example["target"]] = (
        samples["value_range"][1] + 1
    )


def broken_sibling(direction: dict) -> None:
    direction["top_negative"][0]["sibling_activations"]["up_proj"].append(0.0)


def broken_token_table(direction: dict) -> None:
    direction["top_tokens"].reverse()


@pytest.mark.parametrize(
    ("breaks", "error"),
    [
        (broken_top_list, AssertionError),
        (broken_quantile_sample, AssertionError),
        (broken_sibling, ContractError),  # a shape: the format's own
        (broken_token_table, AssertionError),
    ],
)
def test_the_checks_catch_a_broken_file(breaks, error):
    data = make_activations()
    breaks(data["layers"][0]["projections"]["gate_proj"]["directions"][0])
    with pytest.raises(error):
        validate(data)
        assert_consistent(data)


# ---- the script's pure parts, in Node ---------------------------------------------------


def test_javascript_unit_tests_pass():
    """tests/js/*.test.js under Node's own test runner: decoding, contexts, search.
    Node is required like Chromium (.ci/run installs Debian's nodejs): no node is a failure."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.fail("node not found: install it with `apt-get install nodejs`")
    files = sorted(str(p) for p in (ROOT / "tests" / "js").glob("*.test.js"))
    assert len(files) >= 3
    done = subprocess.run(
        [node, "--test", *files], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^# fail 0$", done.stdout, re.MULTILINE), done.stdout[-3000:]
