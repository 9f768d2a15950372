"""The causal effects (--effects) on the page: what is embedded, and the page in Chromium (the
Effects section, the overview's effect measures and order, a card's effects, attribution
examples and pinned samples, the KL colouring of stored sequences)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from playwright.sync_api import Page, expect

import generate_html_dashboard as dashboard
from backend.contract import CLAMPS, direction_key, iter_directions
from tests.browser import Rendered, card, open_sections, rendered, settled
from tests.synthetic import make_activations, unfixed
from tests.test_dashboard import blobs, embedded, render

MODULES = ["gate_proj", "up_proj", "down_proj", "q_proj"]
LAYERS = [3, 5, 9]


def with_effects(**options) -> dict:
    return make_activations(modules=MODULES, rank=2, k=3, layers=LAYERS, effects=True, **options)


def four(x: float) -> float:
    return dashboard._round(x)


def js(x: float) -> str:
    """A number as JavaScript's String() writes it: decimals down to 1e-7."""
    text = repr(x + 0.0)
    if "e" in text:
        mantissa, exponent = text.split("e")
        if -7 < int(exponent) < 21:
            text = format(Decimal(text), "f")
        else:
            text = f"{mantissa}e{'+' if int(exponent) > 0 else '-'}{abs(int(exponent))}"
    return text[:-2] if text.endswith(".0") else text


def steering_of(data: dict, key: str) -> list[dict]:
    return [
        s
        for s in data["effects"]["steering"]
        if direction_key(s["layer"], s["module"], s["component"]) == key
    ]


def divergence(tokens: list[str], plain: list[str]) -> int:
    """Brute force: the first index where `tokens` differs from `plain`, else its length."""
    return next((i for i, t in enumerate(tokens) if i >= len(plain) or t != plain[i]), len(tokens))


# ---- embedded -----------------------------------------------------------------------------


def test_effects_are_embedded_rounded_and_by_direction(tmp_path):
    data = with_effects()
    found = blobs(render(tmp_path, data))
    index, strings = found["index"], found["index"]["strings"]
    effects = data["effects"]
    page = index["effects"]
    assert page["kl_vs_base"] == four(effects["kl_vs_base"])
    assert page["attribution_spearman"] == four(effects["attribution_spearman"])
    assert [g["layer"] for g in page["layers"]] == LAYERS
    assert page["modules"][1] == {
        "module": "up_proj",
        "ablation_kl": four(effects["modules"][1]["ablation_kl"]),
        "ablation_dloss": four(effects["modules"][1]["ablation_dloss"]),
    }
    assert page["kl_rows"] == list(effects["kl_tokens"])
    assert page["clamps"] == list(CLAMPS)
    prompts = [[strings[i] for i in p["tokens"]] for p in page["prompts"]]
    assert prompts == [p["tokens"] for p in effects["prompts"]]
    assert found["kl-tokens"] == {
        row: [four(v) for v in values] for row, values in effects["kl_tokens"].items()
    }
    overview = {d["key"]: d for layer in index["overview"] for d in layer["directions"]}
    for ref in iter_directions(data):
        raw = ref.direction["effects"]
        for measure in ("ablation_kl", "ablation_dloss", "attribution"):
            assert overview[ref.key][measure] == four(raw[measure])
        layer = found[f"layer-{LAYERS.index(ref.layer)}"]
        shown = layer["projections"][ref.module]["directions"][ref.component]["effects"]
        for side in ("top_attribution", "bottom_attribution"):
            assert len(shown[side]) == len(raw[side])
            for row, example in zip(shown[side], raw[side], strict=True):
                fields = dict(zip(index["attribution_fields"], row, strict=True))
                assert [strings[t] for t in fields["tokens"]] == example["tokens"]
                for got, want in zip(unfixed(fields["attributions"]), example["attributions"],
                                     strict=True):  # fmt: skip
                    assert got == pytest.approx(
                        want, rel=1e-3, abs=abs(example["attribution"]) * 1e-3
                    )
                assert unfixed(fields["attributions"])[row[2]] == four(example["attribution"])
        pinned = steering_of(data, ref.key)
        assert [(s["prompt_index"], s["clamp"]) for s in shown["pinned"]] == [
            (s["prompt_index"], s["clamp"]) for s in pinned
        ]
        for got, want in zip(shown["pinned"], pinned, strict=True):
            assert [strings[t] for t in got["tokens"]] == want["tokens"]
            assert got["value"] == (None if want["value"] is None else four(want["value"]))


def test_embedded_data_with_effects_round_trips(tmp_path):
    data = with_effects()
    assert embedded(render(tmp_path, data)) == json.loads(json.dumps(dashboard.compact_data(data)))


def test_a_page_without_effects_embeds_nothing_of_them(tmp_path):
    found = blobs(render(tmp_path, make_activations(modules=MODULES, rank=2, layers=LAYERS)))
    assert "kl-tokens" not in found
    assert not {"effects", "attribution_fields"} & set(found["index"])
    keys = {key for layer in found["index"]["overview"] for d in layer["directions"] for key in d}
    assert keys == {"key", "name", "write_norm_scale", "min", "max", "std"}
    layer = found["layer-0"]
    assert all("effects" not in d for p in layer["projections"].values() for d in p["directions"])


# ---- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def effects_page(tmp_path_factory) -> Rendered:
    return rendered(tmp_path_factory.mktemp("effects"), with_effects())


def tip(page: Page) -> list[str]:
    """The tooltip's rows as "label value"."""
    rows = page.locator("#tooltip > div")
    return [r.locator(".tip-label").text_content() + " " + r.locator(".tip-value").text_content()
            for r in rows.all()]  # fmt: skip


def test_effects_section_grid_bars_and_headline(open_page, effects_page):
    data, page = effects_page.data, open_page(effects_page.url).page
    effects = data["effects"]
    section = page.locator("#effects")
    headline = section.locator(".headline").text_content()
    assert f"KL(adapted ‖ base){js(four(effects['kl_vs_base']))}" in headline
    assert f"rows{effects['num_examples']}" in headline
    assert f"positions{effects['num_tokens']}" in headline
    assert f"(Spearman){js(four(effects['attribution_spearman']))}" in headline
    assert "1: the same order" in section.text_content()

    # The module × layer grid: every module of every layer, the sum over its 2 components.
    cells = section.locator(".effects-grid .cell")
    assert cells.count() == len(MODULES) * len(LAYERS)
    assert section.locator(".effects-grid .row-label").all_text_contents() == MODULES
    sums = {}
    for ref in iter_directions(data):
        value = four(ref.direction["effects"]["ablation_kl"])
        sums[(ref.layer, ref.module)] = sums.get((ref.layer, ref.module), 0.0) + value
    cells.nth(len(LAYERS) * 2 + 1).hover()  # down_proj, layer 5
    want = float(f"{sums[(5, 'down_proj')]:.4g}")
    assert tip(page) == ["cell layer 5 down_proj", f"ablation KL {js(want)} (2 components)"]
    largest = max(sums, key=sums.get)
    alphas = cells.evaluate_all("cs => cs.map(c => c.style.getPropertyValue('--a'))")
    assert alphas[MODULES.index(largest[1]) * len(LAYERS) + LAYERS.index(largest[0])] == "1.000"

    # Bar charts per layer and per module, their exact values on hover, KL or Δloss.
    bars = section.locator("svg.bars")
    assert bars.count() == 2
    assert bars.nth(0).locator("rect").count() == len(LAYERS)
    assert bars.nth(1).locator("rect").count() == len(MODULES)
    bars.nth(1).locator("rect").nth(2).hover()
    down = effects["modules"][2]
    assert tip(page) == [
        "group down_proj",
        f"ablation KL {js(four(down['ablation_kl']))}",
        f"ablation Δloss {js(four(down['ablation_dloss']))}",
    ]
    heights = "rs => rs.map(r => Number(r.getAttribute('height')))"
    kl_heights = bars.nth(0).locator("rect").evaluate_all(heights)
    section.locator(".effects-bars button", has_text="ablation Δloss").click()
    assert bars.nth(0).locator("rect").evaluate_all(heights) != kl_heights
    assert "ablation Δloss per layer" in bars.nth(0).locator("xpath=..").text_content()


def test_overview_sorts_by_ablation_kl_largest_first(open_page, effects_page):
    data, page = effects_page.data, open_page(effects_page.url).page
    page.select_option("#heat-metric", label="ablation KL")
    assert "ablation KL over the largest" in page.locator("#heat-legend").text_content()
    page.locator("#heat-order button", has_text="largest first").click()
    assert "by ablation KL, largest first" in page.locator("#heat-legend").text_content()
    values = {ref.key: four(ref.direction["effects"]["ablation_kl"]) for ref in
              iter_directions(data)}  # fmt: skip
    shown = page.locator("#heatmap .cell").evaluate_all("cs => cs.map(c => c.dataset.open)")
    assert shown == sorted(values, key=lambda key: -values[key])
    page.locator("#heatmap .cell").first.click()  # opens the largest one's card
    assert page.locator(".card.opened").get_attribute("data-key") == shown[0]


def test_a_card_shows_its_effects_attribution_examples_and_pinned_samples(open_page, effects_page):
    data, page = effects_page.data, open_page(effects_page.url).page
    refs = list(iter_directions(data))
    ranked = sorted(refs, key=lambda r: -four(r.direction["effects"]["ablation_kl"]))
    ref = ranked[0]  # the direction of largest ablation KL: pinned
    module_cells = page.locator("#effects .effects-grid .cell")
    module_cells.nth(MODULES.index(ref.module) * len(LAYERS) + LAYERS.index(ref.layer)).click()
    settled(page)
    shown = card(page, ref.key)
    assert page.locator(".card.opened").get_attribute("data-key") == ref.key
    effects = ref.direction["effects"]
    line = shown.locator(".card-effects").text_content()
    assert line == (
        f"ablation KL {js(four(effects['ablation_kl']))} #1 of {len(refs)} · "
        f"Δloss {js(four(effects['ablation_dloss']))} · "
        f"attribution {js(four(effects['attribution']))}"
    )

    # Attribution examples, beside the activation ones, coloured by attribution.
    heads = shown.locator("h4").all_text_contents()
    top, bottom = effects["top_attribution"], effects["bottom_attribution"]
    assert heads == ["Top positive (3)", "Top negative (3)", f"Top attribution ({len(top)})",
                     f"Bottom attribution ({len(bottom)})"]  # fmt: skip
    row = shown.locator(".examples").nth(2).locator(".example").first
    assert row.locator(".value").text_content() == js(four(top[0]["attribution"]))
    assert row.locator(".tok").all_text_contents() == top[0]["tokens"]
    row.locator(".tok.target").hover()
    rows = tip(page)
    assert rows[1] == f"attribution {js(four(top[0]['attribution']))}"
    assert rows[2] == f"activation {js(four(top[0]['activation']))}"
    largest = max(abs(four(e["attribution"])) for e in top + bottom)
    alpha = float(row.locator(".tok.target").evaluate("e => e.style.getPropertyValue('--a')"))
    assert alpha == pytest.approx(abs(four(top[0]["attribution"])) / largest, abs=1e-3)
    shown.locator(".examples .views button", has_text="activation").click()
    target = shown.locator(".examples").nth(2).locator(".example").first.locator(".tok.target")
    scale = max(-ref.direction["stats"]["min"], ref.direction["stats"]["max"])
    alpha = float(target.evaluate("e => e.style.getPropertyValue('--a')"))
    assert alpha == pytest.approx(min(1, abs(four(top[0]["activation"])) / four(scale)), abs=1e-3)

    # Pinned samples: per prompt the four clamps side by side, departures from "none" marked.
    pinned = shown.locator("details.more", has_text="Pinned samples")
    open_sections(pinned)
    assert "from the first one where a continuation departs" in pinned.text_content()
    samples = steering_of(data, ref.key)
    prompts = sorted({s["prompt_index"] for s in samples})
    assert pinned.locator(".clamps").count() == len(prompts)
    for p, columns in zip(prompts, pinned.locator(".clamps").all(), strict=True):
        of = {s["clamp"]: s for s in samples if s["prompt_index"] == p}
        assert columns.locator(".clamp").evaluate_all("cs => cs.map(c => c.dataset.clamp)") == list(
            CLAMPS
        )
        for clamp, column in zip(CLAMPS, columns.locator(".clamp").all(), strict=True):
            tokens = of[clamp]["tokens"]
            assert column.locator(".tok").all_text_contents() == tokens
            start = divergence(tokens, of["none"]["tokens"])
            marked = column.locator(".tok").evaluate_all(
                "ts => ts.map(t => t.classList.contains('diverged'))"
            )
            assert marked == [i >= start for i in range(len(tokens))]
            held = "as is" if clamp == "none" else f"= {js(four(of[clamp]['value']))}"
            assert column.locator("h6").text_content() == f"{clamp} {held}"
    assert pinned.locator(".tok.diverged").count() > 0  # the synthetic data departs somewhere


def test_stored_sequences_coloured_by_kl_vs_base(open_page, effects_page):
    data, page = effects_page.data, open_page(effects_page.url).page
    rows = page.locator("#effects .kl-rows .seg button")
    assert rows.all_text_contents() == [f"#{row}" for row in data["effects"]["kl_tokens"]]
    rows.nth(1).click()
    settled(page)
    view = page.locator("#effects .kl-sequence")
    expect(view).to_have_attribute("data-row", "1")
    tokens, kl = data["examples"]["1"]["tokens"], data["effects"]["kl_tokens"]["1"]
    assert view.locator(".tok").all_text_contents() == tokens
    t = max(range(len(kl)), key=kl.__getitem__)
    view.locator(".tok").nth(t).hover()
    assert tip(page)[1:] == [f"KL vs base {js(four(kl[t]))}", f"position example 1, token {t}"]
    assert view.locator(".tok").nth(t).evaluate("e => e.style.getPropertyValue('--a')") == "1.000"
    assert view.locator(".tok.unrecorded").count() == 1  # the last token predicts nothing

    # The same colouring in the cards' whole sequences, for the rows of the effects.
    page.locator("#effects .kl-in-cards").click()
    settled(page)
    assert page.locator("#colour-kl").is_checked()
    expect(page.locator("#context-width button", has_text="whole")).to_have_attribute(
        "aria-pressed", "true"
    )
    ref = next(iter_directions(data))
    example = ref.direction["effects"]["top_attribution"][0]
    row = str(example["example_index"])
    tokens, kl = data["examples"][row]["tokens"], data["effects"]["kl_tokens"][row]
    shown = card(page, ref.key).locator(".examples").nth(2).locator(".example").first
    assert shown.locator(".tok").all_text_contents() == tokens
    assert shown.locator(".tok.target").count() == 1
    t = max(range(len(kl)), key=kl.__getitem__)
    shown.locator(".tok").nth(t).hover()
    assert tip(page)[1] == f"KL vs base {js(four(kl[t]))}"
    assert shown.locator(".tok").nth(t).evaluate("e => e.style.getPropertyValue('--a')") == "1.000"
    shown.locator(".tok").last.hover()
    assert tip(page)[1] == "KL vs base not measured (the last token, or past the cut)"
    page.locator("#colour-kl").click()  # off: the attribution again
    settled(page)
    shown.locator(".tok.target").hover()
    assert tip(page)[1] == f"attribution {js(four(example['attribution']))}"


def test_a_page_without_effects_has_no_effects_section(open_page, tmp_path):
    page = open_page(rendered(tmp_path, make_activations(modules=MODULES, layers=LAYERS)).url).page
    assert page.locator("#effects").count() == 0
    assert page.locator("#heat-order").count() == 0
    labels = page.locator("#heat-metric option").all_text_contents()
    assert labels == ["max |activation|", "std", "write magnitude"]
    assert page.locator(".card-effects, .examples .views").count() == 0
