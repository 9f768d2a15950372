"""Explanations (--explain) and baseline neurons (--baseline-neurons) on the page: what is
embedded, and the page in Chromium (the cards' explanations, the Explanations section's
headline, comparison plot and sortable table, the search in explanation text, the neuron
section drawn by the cards' code)."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal

import pytest
from playwright.sync_api import Page, expect

import generate_html_dashboard as dashboard
from backend.contract import SIGNS, iter_directions, neuron_key
from tests.browser import Rendered, card, open_sections, rendered, searched, settled
from tests.synthetic import HOSTILE_EXPLANATION, make_activations
from tests.test_dashboard import QWEN_32B_SHAPE, blobs, embedded, page_examples, render
from tests.test_dashboard_effects import js

MODULES = ["gate_proj", "up_proj", "down_proj"]
LAYERS = [2, 6]
NEURONS = 2  # per layer
MINUS = "\u2212"


def explained(**options) -> dict:
    return make_activations(
        modules=MODULES, rank=2, k=3, layers=LAYERS, explanations=True, **options
    )


def four(x: float | None) -> float | None:
    return None if x is None else dashboard._round(x)


def two(x: float) -> str:
    """A score as the page writes it (JavaScript's toFixed(2): the exact binary value, rounded
    half away from zero), with a true minus sign."""
    return str(Decimal(x).quantize(Decimal("0.01"), ROUND_HALF_UP)).replace("-", MINUS)


def score_text(score: dict) -> str:
    """A Score as the page writes it: "0.81 [0.70, 0.90] n=16", from its rounded values."""
    if score["score"] is None:
        return f"— n={score['n']}"
    ci = score["ci"]
    interval = f" [{two(four(ci[0]))}, {two(four(ci[1]))}]" if ci else ""
    return f"{two(four(score['score']))}{interval} n={score['n']}"


def features(data: dict) -> list[tuple[str, str, str, dict]]:
    """Brute force: (key, name, sign, explanation) of every feature in the page's order,
    directions by layer and module, then the neurons."""
    found = [
        (ref.key, f"layer {ref.layer} {ref.name}", sign, ref.direction["explanations"][sign])
        for ref in iter_directions(data)
        for sign in SIGNS
        if sign in ref.direction.get("explanations", {})
    ]
    for n in data.get("baseline_neurons", []):
        for sign in SIGNS:
            if sign in n.get("explanations", {}):
                name = f"layer {n['layer']} neuron {n['neuron']}"
                found.append(
                    (neuron_key(n["layer"], n["neuron"]), name, sign, n["explanations"][sign])
                )
    return found


def rounded(value: object) -> object:
    if isinstance(value, float):
        return four(value)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


# ---- embedded -----------------------------------------------------------------------------


def test_explanations_are_embedded_in_the_index_rounded_in_page_order(tmp_path):
    data = explained(baseline_neurons=NEURONS)
    index = blobs(render(tmp_path, data))["index"]
    page = index["explanations"]
    run = data["explanations"]
    for key in ("explainer", "scorer", "num_prompts", "num_tokens"):
        assert page[key] == run[key]
    assert page["seconds"] == four(run["seconds"])
    assert page["settings"] == run["settings"]
    assert page["summary"] == rounded(run["summary"])
    assert page["summary"]["lora"]["detection"]["mean"] == four(
        run["summary"]["lora"]["detection"]["mean"]
    )
    want = features(data)
    assert len(want) == 2 * (len(MODULES) * 2 * len(LAYERS) + NEURONS * len(LAYERS))
    assert [(f["key"], f["name"], f["sign"]) for f in page["features"]] == [w[:3] for w in want]
    for got, (key, _, _, explanation) in zip(page["features"], want, strict=True):
        assert got["group"] == ("neurons" if ".neuron[" in key else "lora")
        assert got["text"] == explanation["text"]
        assert ("shuffled" in got) == (got["group"] == "lora")  # a neuron has none
        for measure in ("detection", "fuzzing", "shuffled"):
            assert got.get(measure) == (
                rounded(explanation[measure]) if measure in explanation else None
            )
    # The layers carry none of it: the cards read their explanations from the index.
    layer = blobs(render(tmp_path, data))["layer-0"]
    assert all(
        "explanations" not in d for p in layer["projections"].values() for d in p["directions"]
    )


def test_baseline_neurons_are_embedded_as_directions_are(tmp_path):
    data = explained(baseline_neurons=NEURONS)
    found = blobs(render(tmp_path, data))
    index, neurons = found["index"], found["baseline-neurons"]
    keys = [neuron_key(n["layer"], n["neuron"]) for n in data["baseline_neurons"]]
    assert [n["key"] for n in neurons] == keys
    assert index["baseline_neuron_layers"] == [
        {"layer": layer, "keys": [k for k in keys if k.startswith(f"L{layer}.")]}
        for layer in LAYERS
    ]
    for shown, neuron in zip(neurons, data["baseline_neurons"], strict=True):
        assert shown["name"] == f"layer {neuron['layer']} neuron {neuron['neuron']}"
        assert shown["layer"] in LAYERS and shown["neuron"] == neuron["neuron"]
        assert shown["stats"]["max"] == four(neuron["stats"]["max"])
        assert shown["histogram"]["counts"] == neuron["histogram"]["counts"]
        for side in ("top_positive", "top_negative"):
            examples = page_examples(index, shown, shown[side])
            assert [e["tokens"] for e in examples] == [e["tokens"] for e in neuron[side]]
            assert [e["example_index"] for e in examples] == [
                e["example_index"] for e in neuron[side]
            ]
        assert "siblings" not in shown and "component" not in shown


def test_embedded_data_with_explanations_round_trips(tmp_path):
    data = explained(baseline_neurons=NEURONS, hostile_tokens=True)
    assert embedded(render(tmp_path, data)) == json.loads(json.dumps(dashboard.compact_data(data)))


def test_a_page_without_explanations_or_neurons_embeds_nothing_of_them(tmp_path):
    found = blobs(render(tmp_path, make_activations(modules=MODULES, rank=2, layers=LAYERS)))
    assert "baseline-neurons" not in found
    assert not {"explanations", "baseline_neuron_layers"} & set(found["index"])
    plain = make_activations(modules=MODULES, rank=2, layers=LAYERS)
    with_neurons = make_activations(modules=MODULES, rank=2, layers=LAYERS, baseline_neurons=1)
    assert dashboard.compact_data(plain)["layers"] == dashboard.compact_data(with_neurons)["layers"]


# ---- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def explained_page(tmp_path_factory) -> Rendered:
    data = explained(baseline_neurons=NEURONS, hostile_tokens=True)
    return rendered(tmp_path_factory.mktemp("explanations"), data)


@pytest.fixture(scope="session")
def qwen_explained(tmp_path_factory) -> Rendered:
    """The Qwen-32B shape with every feature explained and 8 neurons per layer: 1,408 features,
    512 neuron cards."""
    data = make_activations(**QWEN_32B_SHAPE, seed=7, explanations=True, baseline_neurons=8)
    return rendered(tmp_path_factory.mktemp("qwen-explained"), data)


def test_a_full_size_page_with_explanations_and_neurons_stays_small(open_page, qwen_explained):
    """The explanations add little (in the index, once), the neurons about what their cards'
    examples take (decoded when their section is opened); the table is built when opened.
    (The same shape without either: test_qwen_32b_shaped_run_is_under_5_mb; how fast such a
    page draws: benchmarks/bench_page.py, not a timed test.)"""
    assert qwen_explained.path.stat().st_size < 6_000_000
    explanations = dashboard.compact_data(qwen_explained.data)["explanations"]
    assert len(explanations["features"]) == 2 * (64 * 3 + 64 * 8)
    assert len(dashboard.page_blobs({"layers": [], "explanations": explanations})[0][1]) < 100_000
    page = open_page(qwen_explained.url).page
    assert page.locator(".card").count() == 3  # one layer in the DOM
    open_table(page)
    assert page.locator("#feature-table tbody tr").count() == len(explanations["features"])
    groups = page.locator("#neurons details.panel")
    assert groups.count() == 64
    open_sections(groups.last)  # a layer's 8 cards
    assert page.locator("#neurons .card").count() == 8
    last = qwen_explained.data["baseline_neurons"][-1]
    assert page.locator("#neurons .card").last.get_attribute("data-key") == neuron_key(
        last["layer"], last["neuron"]
    )
    # A neuron's row opens its layer's group, drawn then, and its card.
    first = qwen_explained.data["baseline_neurons"][0]
    key = neuron_key(first["layer"], first["neuron"])
    page.locator(f'#feature-table tr[data-open="{key}"] a').first.click()
    settled(page)
    assert page.locator(".card.opened").get_attribute("data-key") == key
    assert groups.first.get_attribute("open") is not None
    assert page.locator("#neurons .card").count() == 16


def open_table(page: Page) -> None:
    """Open the section of the feature table (built when first opened)."""
    open_sections(page.locator("#explanations details.features"))


def table_keys(page: Page) -> list[tuple[str, str]]:
    """The feature table's rows as (key, sign), top to bottom."""
    rows = page.locator("#feature-table tbody tr")
    return [(r.get_attribute("data-open"), r.locator("td").first.text_content())
            for r in rows.all()]  # fmt: skip


def test_the_headline_group_means_and_comparison_plot(open_page, explained_page):
    data, page = explained_page.data, open_page(explained_page.url).page
    summary = data["explanations"]["summary"]
    section = page.locator("#explanations")
    headline = section.locator(".headline").text_content()
    for measure in ("detection", "fuzzing"):
        difference = summary["lora_minus_neurons"][measure]
        mean, (lo, hi) = four(difference["mean"]), difference["ci"]
        text = f"{'' if mean < 0 else '+'}{two(mean)} [{two(four(lo))}, {two(four(hi))}]"
        assert f"LoRA {MINUS} neurons, {measure}{text}" in headline
    rows = section.locator("table.groups tbody tr")
    assert rows.locator("th").all_text_contents() == ["LoRA", "neurons", "shuffled"]
    lora = summary["lora"]["fuzzing"]
    want = score_text({"score": lora["mean"], "ci": lora["ci"], "n": lora["n"]})
    assert rows.nth(0).locator("td").nth(1).text_content() == want
    assert "200 bootstrap resamples" in section.text_content()

    # Per measure a strip plot of every feature's score in its group, nulls left out.
    plots = section.locator("svg.strip")
    assert plots.count() == 2
    everything = features(data)
    for plot, measure in zip(plots.all(), ("detection", "fuzzing"), strict=True):
        assert plot.get_attribute("data-measure") == measure
        lora_scores = [e[measure]["score"] for k, _, _, e in everything if ".neuron[" not in k]
        neuron_scores = [e[measure]["score"] for k, _, _, e in everything if ".neuron[" in k]
        shuffled = [e["shuffled"][measure]["score"] for k, _, _, e in everything
                    if ".neuron[" not in k]  # fmt: skip
        for group, scores in (("lora", lora_scores), ("neurons", neuron_scores),
                              ("shuffled", shuffled)):  # fmt: skip
            dots = plot.locator(f".dots.{group} circle")
            assert dots.count() == len([s for s in scores if s is not None])
        assert plot.locator("line.mean").count() == 3
        assert plot.locator("line.ci").count() == 3
    # The mean's line sits at its value: y = 10 + (1 - mean) * 146 in the plot's box.
    mean = four(summary["neurons"]["detection"]["mean"])
    y = float(plots.nth(0).locator("line.mean").nth(1).get_attribute("y1"))
    assert y == pytest.approx(10 + (1 - mean) * 146, abs=1e-6)


def test_the_table_sorts_by_score_and_a_row_opens_its_card(open_page, explained_page):
    data, page = explained_page.data, open_page(explained_page.url).page
    everything = features(data)
    assert page.locator("#feature-table").count() == 0
    summary = page.locator("#explanations details.features summary").text_content()
    assert summary.startswith(f"Every feature ({len(everything)})")
    open_table(page)
    assert table_keys(page) == [(key, sign) for key, _, sign, _ in everything]
    page.locator("#feature-table thead button", has_text="detection").click()
    expect(page.locator("#feature-table")).to_have_attribute("data-sort", "detection desc")
    by_detection = sorted(
        range(len(everything)), key=lambda i: (-four(everything[i][3]["detection"]["score"]), i)
    )
    assert table_keys(page) == [(everything[i][0], everything[i][2]) for i in by_detection]
    page.locator("#feature-table thead button", has_text="fuzzing").click()
    page.locator("#feature-table thead button", has_text="fuzzing").click()  # again: ascending
    expect(page.locator("#feature-table")).to_have_attribute("data-sort", "fuzzing asc")
    by_fuzzing = sorted(
        range(len(everything)), key=lambda i: (four(everything[i][3]["fuzzing"]["score"]), i)
    )
    assert table_keys(page) == [(everything[i][0], everything[i][2]) for i in by_fuzzing]

    # A direction of the second layer: its row opens that layer and its card, whose examples
    # carry the explanation of each sign with both scores and the shuffled baseline's.
    key, _, _, explanation = next(f for f in everything if f[0].startswith(f"L{LAYERS[1]}."))
    page.locator(f'#feature-table tr[data-open="{key}"] td.explanation-text').first.click()
    settled(page)
    assert page.locator(".card.opened").get_attribute("data-key") == key
    shown = card(page, key).locator(".examples.pos .explanation")
    assert shown.locator(".explanation-text").text_content() == explanation["text"]
    scores = shown.locator(".explanation-scores").text_content()
    auroc = f", AUROC {two(four(explanation['detection']['auroc']))}"
    assert scores.startswith(
        f"detection {score_text(explanation['detection'])}{auroc} · "
        f"fuzzing {score_text(explanation['fuzzing'])} shuffled: detection "
    )
    assert score_text(explanation["shuffled"]["fuzzing"]) in scores
    assert card(page, key).locator(".explanation").count() == 2  # one per sign


def test_explanation_text_is_shown_as_text_and_found_by_search(open_page, explained_page):
    data, page = explained_page.data, open_page(explained_page.url).page
    first = next(iter_directions(data))
    hostile = card(page, first.key).locator(".explanation-text").first
    assert (
        hostile.text_content()
        == HOSTILE_EXPLANATION
        == first.direction["explanations"]["positive"]["text"]
    )
    assert page.locator("#explanations img, #layer .explanation img").count() == 0

    # A word of one explanation only: the search lists that feature, and its link opens it.
    everything = features(data)
    word = next(
        w
        for _, _, _, e in everything
        for w in e["text"].split()
        if sum(w.lower() in f[3]["text"].lower() for f in everything) == 1 and len(w) > 3
    )
    (key, name, sign, explanation) = next(
        f for f in everything if word.lower() in f[3]["text"].lower()
    )
    searched(page, word.upper())
    listed = page.locator("#search-results .explained li")
    assert listed.count() == 1
    assert listed.first.text_content() == f"{name} {sign}: {explanation['text']}"
    assert "in 1 explanation:" in page.locator("#search-results").text_content()
    listed.first.locator("a").click()
    settled(page)
    assert page.locator(".card.opened").get_attribute("data-key") == key

    # A word of many: every one listed, in page order.
    having = [f for f in everything if "after" in f[3]["text"].lower()]
    assert 1 < len(having) < len(everything)
    searched(page, " after")
    results = page.locator("#search-results").text_content()
    assert f"in {len(having)} explanations:" in results
    links = page.locator("#search-results .explained li a")
    assert links.evaluate_all("as => as.map(a => a.dataset.open)") == [f[0] for f in having]


def test_the_neuron_section_draws_neurons_with_the_cards_code(open_page, explained_page):
    data, page = explained_page.data, open_page(explained_page.url).page
    section = page.locator("#neurons")
    neurons = data["baseline_neurons"]
    assert section.locator("h2").text_content() == f"Baseline neurons ({len(neurons)})"
    groups = section.locator("details.panel summary").all_text_contents()
    assert groups == [f"layer {layer} ({NEURONS} neurons)" for layer in LAYERS]
    assert section.locator(".card").count() == 0  # a layer's drawn when first opened
    open_sections(section.locator("details.panel").first)
    assert section.locator(".card").count() == NEURONS
    open_sections(section.locator("details.panel").last)
    cards = section.locator(".card")
    assert cards.count() == len(neurons)
    neuron = neurons[-1]
    key = neuron_key(neuron["layer"], neuron["neuron"])
    shown = card(page, key)
    assert (
        shown.locator("h3").text_content() == f"layer {neuron['layer']} neuron {neuron['neuron']}"
    )
    assert f"coordinate {neuron['neuron']} of the MLP hidden space" in shown.text_content()
    assert (
        shown.locator(".examples.pos .example").first.locator(".tok").all_text_contents()
        == (neuron["top_positive"][0]["tokens"])
    )
    assert shown.locator(".star, textarea").count() == 0  # notes are the directions'
    negative = neuron["explanations"]["negative"]
    scores = shown.locator(".examples.neg .explanation-scores").text_content()
    assert f"fuzzing {score_text(negative['fuzzing'])}" in scores
    assert "shuffled" not in scores  # a neuron has no shuffled baseline
    shown.locator(".examples.pos .example").first.locator(".tok.target").hover()
    tip = page.locator("#tooltip").text_content()
    assert f"activation{js(four(neuron['top_positive'][0]['activation']))}" in tip
    # More sections like a direction's, built when opened.
    open_sections(shown.locator("details.more", has_text="Quantile samples"))
    assert shown.locator(".quantiles .example").count() == sum(
        len(s["examples"]) for s in neuron["quantile_samples"]
    )

    # A neuron's row in the table opens its card (here, after another layer was shown).
    page.locator("#next-layer").click()
    settled(page)
    open_table(page)
    first = neurons[0]
    first_key = neuron_key(first["layer"], first["neuron"])
    page.locator(f'#feature-table tr[data-open="{first_key}"] a').first.click()
    settled(page)
    assert page.locator(".card.opened").get_attribute("data-key") == first_key
    assert page.locator(".card.opened").count() == 1


def test_a_page_without_explanations_looks_as_before(open_page, tmp_path):
    data = make_activations(modules=MODULES, layers=LAYERS)
    page = open_page(rendered(tmp_path, data).url).page
    assert page.locator("#explanations, #neurons, .explanation").count() == 0
    searched(page, "the")
    assert page.locator("#search-results .explained").count() == 0


def test_explanations_without_neurons_have_no_headline_difference(open_page, tmp_path):
    data = explained()
    assert "neurons" not in data["explanations"]["summary"]
    page = open_page(rendered(tmp_path, data).url).page
    headline = page.locator("#explanations .headline").text_content()
    assert headline == (
        f"LoRA {MINUS} neurons, detectionno baseline neurons"
        f"LoRA {MINUS} neurons, fuzzingno baseline neurons"
    )
    assert page.locator("#explanations table.groups th").all_text_contents()[3:] == [
        "LoRA",
        "shuffled",
    ]
    assert page.locator("#neurons").count() == 0
    assert page.locator("#explanations svg.strip .dots.neurons").count() == 0
