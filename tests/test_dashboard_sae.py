"""The SAE section of --sae (issue 14, items 6 and 7): its contract, what the page embeds of it,
and the page's Features view in Chromium."""

from __future__ import annotations

import base64
import gzip
import json
import math
from collections.abc import Callable

import pytest
from playwright.sync_api import Locator, Page, expect

import generate_html_dashboard as dashboard
from backend.contract import (
    ContractError,
    direction_key,
    example_holders,
    iter_directions,
    iter_examples,
    validate,
)
from backend.output import examples_shown
from tests.browser import Rendered, card, open_sections, rendered, searched, settled
from tests.synthetic import (
    HOSTILE_EXPLANATION,
    HOSTILE_TOKENS,
    assert_consistent,
    make_activations,
)

ALL_MODULES = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


def with_sae(**kwargs) -> dict:
    """Five layers of the MLP and o_proj (20 directions), 80 features (2 dead latents),
    explained."""
    args = {"n_layers": 5, "modules": ("gate_proj", "up_proj", "down_proj", "o_proj"), "sae": 80}
    args |= kwargs
    return make_activations(explanations=True, **args)


# ---- the contract -------------------------------------------------------------------------


def test_a_file_with_an_sae_is_valid_and_its_features_hold_examples():
    data = with_sae()
    validate(data)
    sae = data["sae"]
    assert len(sae["features"]) == 80 and sae["dead"] == [39, 79] and sae["num_latents"] == 82
    assert sum(1 for f in sae["features"] if "explanations" in f) == 32
    # The writer's occurrence counting and the page's sequences see the features' examples.
    features = list(example_holders(data))[-80:]
    assert features == sae["features"]
    shown = {e["example_index"] for f in features for e in iter_examples(f)}
    assert shown and shown <= examples_shown(data)
    assert all(len(list(iter_examples(f))) == 4 + 5 * 2 for f in features)  # k + ranges × 2


@pytest.mark.parametrize("shape", [{}, {"n_layers": 0, "sae": 3}, {"rank": 2, "effects": True}])
def test_the_synthetic_sae_is_consistent_and_leaves_the_rest_of_the_file_alone(shape):
    data = with_sae(**shape)
    validate(data)
    assert_consistent(data)
    assert json.loads(json.dumps(data)) == data  # plain JSON, no NaN
    del data["sae"]
    args = {"n_layers": 5, "modules": ("gate_proj", "up_proj", "down_proj", "o_proj")} | shape
    args.pop("sae", None)
    assert data == make_activations(explanations=True, **args)


def feature(i: int = 0) -> Callable[[dict], dict]:
    return lambda data: data["sae"]["features"][i]


def sae(data: dict) -> dict:
    return data["sae"]


def set_in(get: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    return lambda data: get(data).__setitem__(key, value)


def swap_features(data: dict) -> None:
    features = data["sae"]["features"]
    features[0], features[1] = features[1], features[0]


def unsorted_composition(data: dict) -> None:
    composition = feature()(data)["composition"]
    composition[0], composition[1] = composition[1], composition[0]


def stranger_in_composition(data: dict) -> None:
    feature()(data)["composition"][3]["layer"] = 7


def negative_sample(data: dict) -> None:
    feature(2)(data)["quantile_samples"][1]["sign"] = -1


def bad_count(data: dict) -> None:
    stats = feature(1)(data)["stats"]
    stats["count"] -= 1
    feature(1)(data)["histogram"]["counts"][0] -= 1


def negative_explanation(data: dict) -> None:
    explained = next(f for f in data["sae"]["features"] if "explanations" in f)
    explained["explanations"]["negative"] = explained["explanations"]["positive"]


def siblings(data: dict) -> None:
    example = feature()(data)["top_positive"][0]
    example["sibling_activations"] = {"up_proj": [0.0] * len(example["tokens"])}


def shares(data: dict) -> None:
    data["sae"]["error_share"]["gate_proj"] += 0.5


def twice(data: dict) -> None:
    composition = feature(6)(data)["composition"]
    composition[1] = dict(composition[0])


def one_bin(data: dict) -> None:
    feature(0)(data)["histogram"] = {
        "edges": [0.0, 1.0],
        "counts": [feature(0)(data)["stats"]["count"]],
    }


def explained_index(data: dict) -> int:
    return next(i for i, f in enumerate(data["sae"]["features"]) if "explanations" in f)


SAE_MUTATIONS = [
    ("no sae field", lambda d: d["sae"].pop("fvu"), "sae.fvu: missing"),
    (
        "fraction",
        set_in(sae, "dead_fraction", 1.5),
        "sae.dead_fraction: expected a number inside [0, 1]",
    ),
    (
        "dead fraction",
        set_in(sae, "dead_fraction", 0.5),
        "sae.dead_fraction: expected len(dead) / num_latents",
    ),
    ("k", set_in(sae, "k", 82), "sae.k: expected less than num_latents 82"),
    ("order", swap_features, "sae.features[1].index: expected after"),
    (
        "beyond",
        set_in(feature(79), "index", 82),
        "sae.features[79].index: expected a latent below num_latents 82",
    ),
    (
        "dead and live",
        set_in(sae, "dead", [0, 39]),
        "sae.dead: expected no latent of features, got 0",
    ),
    ("dead order", set_in(sae, "dead", [79, 39]), "sae.dead[1]: expected after 79"),
    ("frequency", set_in(feature(3), "frequency", 0), "sae.features[3].frequency: expected > 0"),
    (
        "negative",
        set_in(lambda d: feature(4)(d)["stats"], "min", -1.0),
        "sae.features[4].stats.min: expected >= 0",
    ),
    ("sign", negative_sample, "sae.features[2].quantile_samples[1].sign: expected 1"),
    (
        "weights",
        unsorted_composition,
        "sae.features[0].composition[1].weight: expected |weight| at most",
    ),
    (
        "composition",
        stranger_in_composition,
        "sae.features[0].composition[3]: expected a direction of the layers",
    ),
    (
        "short composition",
        lambda d: feature(5)(d)["composition"].pop(),
        "sae.features[5].composition: expected 16 entries",
    ),
    ("twice", twice, "sae.features[6].composition: expected each direction once"),
    (
        "counts",
        lambda d: feature(1)(d)["histogram"]["counts"].__setitem__(0, 0),
        "sae.features[1].histogram.counts: expected a sum of stats.count",
    ),
    (
        "tokens counted",
        bad_count,
        "sae.features[1].stats.count: expected count + nonfinite = sae.num_tokens",
    ),
    (
        "example",
        set_in(lambda d: feature(2)(d)["top_positive"][0], "target", 99),
        "sae.features[2].top_positive[0].target: expected an index into",
    ),
    (
        "negative explanation",
        negative_explanation,
        "sae.features[{explained}].explanations.negative: unexpected",
    ),
    (
        "siblings",
        siblings,
        "sae.features[0].top_positive[0].sibling_activations: expected other modules",
    ),
    ("bins", one_bin, "sae.features[0].histogram.counts: expected 10 entries"),
    ("shares", shares, "sae.error_share: expected a sum of 1"),
    (
        "share module",
        lambda d: d["sae"]["error_share"].update(q_proj=0.0),
        "sae.error_share: expected modules of metadata.modules",
    ),
    (
        "training",
        set_in(lambda d: sae(d)["training"], "batch_size", 0),
        "sae.training.batch_size: expected a positive integer",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [m[1:] for m in SAE_MUTATIONS], ids=[m[0] for m in SAE_MUTATIONS]
)
def test_each_break_of_the_sae_is_named_by_its_path(mutate, message):
    data = with_sae()
    message = message.format(explained=explained_index(data))
    mutate(data)
    with pytest.raises(ContractError) as raised:
        validate(data)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_sae_explanation_needs_the_runs_explaining():
    data = with_sae()
    explanation = feature(explained_index(data))(data)["explanations"]
    del data["explanations"]
    for holder in example_holders(data):
        holder.pop("explanations", None)
    validate(data)  # fine without any
    feature(0)(data)["explanations"] = explanation
    with pytest.raises(ContractError, match=r"^sae\.features\[0\]\.explanations: unexpected"):
        validate(data)


# ---- what the page embeds -----------------------------------------------------------------


def page_blobs_of(data: dict) -> dict[str, object]:
    return {
        name: json.loads(gzip.decompress(base64.b85decode(text.replace(".", "<"))))
        for name, text in dashboard.page_blobs(dashboard.compact_data(data))
    }


def test_the_index_holds_the_header_and_the_features_are_in_their_own_blobs():
    data = with_sae()
    found = page_blobs_of(data)
    header = found["index"]["sae"]
    sae = data["sae"]
    assert header["num_features"] == 80 and header["num_dead"] == 2
    assert header["num_latents"] == sae["num_latents"] and header["k"] == sae["k"]
    assert header["fvu_heldout"] == dashboard._round(sae["fvu_heldout"])
    assert "features" not in header and "sae-list" not in found["index"]
    chunk = header["chunk"]
    names = [f"sae-{i}" for i in range(math.ceil(80 / chunk))]
    assert [name for name in found if name.startswith("sae-") and name != "sae-list"] == names
    cards = [feature for name in names for feature in found[name]]
    assert [c["index"] for c in cards] == [f["index"] for f in sae["features"]]
    assert all("top_negative" not in c and "bottom_tokens" not in c for c in cards)


def test_the_list_names_each_compositions_direction_by_its_number_in_the_page():
    data = with_sae()
    found = page_blobs_of(data)
    keys = [d["key"] for layer in found["index"]["overview"] for d in layer["directions"]]
    strings = found["index"]["strings"]
    for row, feature in zip(found["sae-list"], data["sae"]["features"], strict=True):
        assert row["index"] == feature["index"]
        named = [keys[number] for number, _ in row["composition"]]
        assert named == [
            direction_key(e["layer"], e["module"], e["component"]) for e in feature["composition"]
        ]
        assert [w for _, w in row["composition"]] == [
            dashboard._round(e["weight"]) for e in feature["composition"]
        ]
        assert [strings[i] for i in row["tokens"]] == [t["token"] for t in feature["top_tokens"]]
        explanation = feature.get("explanations", {}).get("positive")
        assert row["text"] == (explanation["text"] if explanation else None)


def test_evenly_spaced_edges_are_embedded_as_first_and_step():
    data = with_sae()
    found = page_blobs_of(data)
    card = found["sae-0"][0]
    edges = data["sae"]["features"][0]["histogram"]["edges"]
    hist = card["histogram"]
    expanded = [hist["first"] + i * hist["step"] for i in range(len(hist["counts"]) + 1)]
    assert expanded == pytest.approx(edges, rel=1e-5, abs=1e-5 * edges[-1])
    uneven = {"edges": [0.0, 1.0, 3.0], "counts": [1, 1]}
    assert dashboard._uniform_histogram(uneven) is uneven


def test_a_features_histogram_leaves_out_its_zeros_only_where_they_lie():
    """The tokens at 0 (those where the feature is not > 0) leave the bin of 0; the rest keep
    their bins, trimmed to those that hold some. Where the bin of 0 holds fewer, nothing is
    left out."""
    feature = {"stats": {"count": 10}, "frequency": 0.4}
    hist = {"edges": [-1.0, 0.0, 1.0, 2.0, 3.0], "counts": [0, 7, 3, 0]}
    firing, zeros = dashboard._firing_histogram(feature | {"histogram": hist})
    assert (firing, zeros) == ({"edges": [0.0, 1.0, 2.0], "counts": [1, 3]}, 6)
    odd = {"edges": [-1.0, 0.0, 1.0], "counts": [5, 5]}  # 6 zeros cannot lie in [0, 1)
    assert dashboard._firing_histogram(feature | {"histogram": odd}) == (odd, 0)
    page = page_blobs_of(with_sae())["sae-0"][0]
    assert page["zeros"] > 0 and page["histogram"]["counts"][0] > 0


def test_a_page_of_the_demos_shape_stays_within_3_mb(tmp_path):
    """The demo: 30 layers × gate/up/down (D = 90), k=16, W=10, 8 × D = 720 features, its
    most frequent 32 explained, a baseline neuron per layer."""
    data = make_activations(
        n_layers=30, k=16, window=10, bins=50, seed=3, sae=720, explanations=True,
        baseline_neurons=1,
    )  # fmt: skip
    assert len(data["sae"]["features"]) == 720
    page = rendered(tmp_path, data).path
    assert page.stat().st_size <= 3_000_000


# ---- the page, in Chromium --------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_page(tmp_path_factory) -> Rendered:
    return rendered(tmp_path_factory.mktemp("sae"), with_sae())


@pytest.fixture(scope="module")
def sae_full(tmp_path_factory) -> Rendered:
    """The study's adapter (rank 1 on all seven projections of 64 layers: D = 448), k=16, W=10,
    and its SAE's 3,584 features."""
    data = make_activations(
        n_layers=64, modules=ALL_MODULES, k=16, window=10, bins=50, seed=7, sae=3584
    )
    return rendered(tmp_path_factory.mktemp("sae-full"), data)


def open_features(page: Page) -> None:
    # The details' toggle event, which starts the decoding, comes a task after the click:
    # until the table is there, the page may still say it is ready.
    page.click("#features details > summary")
    page.locator(".feature-table").wait_for()
    settled(page)


def listed(page: Page) -> list[int]:
    rows = page.locator(".feature-table tbody tr")
    return [int(i) for i in rows.evaluate_all("rows => rows.map(r => r.dataset.index)")]


def open_feature(page: Page, index: int) -> Locator:
    page.locator(f'.feature-table a[data-feature="{index}"]').click()
    settled(page)
    return page.locator(".feature-card .card")


def test_the_features_view_opens_and_sorts(open_page, sae_page):
    page = open_page(sae_page.url).page
    features = sae_page.data["sae"]["features"]
    meta = page.locator("#features .sae-meta").inner_text()
    for label in ("FVU", "FVU held-out", "L0", "dead", "latents", "k"):
        assert f"{label}\n" in meta
    assert page.locator(".feature-table").count() == 0  # nothing decoded before it opens
    open_features(page)
    assert listed(page) == [f["index"] for f in features]
    page.click('.sort button:text("frequency")')
    by_frequency = sorted(features, key=lambda f: -dashboard._round(f["frequency"]))
    assert listed(page) == [f["index"] for f in by_frequency]
    page.click('.sort button:text("score")')
    scored = [f for f in features if "explanations" in f]
    by_score = sorted(scored, key=lambda f: -f["explanations"]["positive"]["detection"]["score"])
    assert listed(page)[: len(scored)] == [f["index"] for f in by_score]
    page.click('.sort button:text("composition")')
    assert listed(page) == [f["index"] for f in sorted(features, key=by_top(sae_page.data))]


def by_top(data: dict) -> Callable[[dict], tuple[int, float]]:
    """A feature's place by its composition: its first direction's in the page, then the
    largest |weight| (as embedded) first."""
    order = [(ref.layer, ref.module, ref.component) for ref in iter_directions(data)]

    def key(feature: dict) -> tuple[int, float]:
        top = feature["composition"][0]
        place = order.index((top["layer"], top["module"], top["component"]))
        return place, -abs(dashboard._round(top["weight"]))

    return key


def test_a_feature_card_shows_its_parts(open_page, sae_page):
    page = open_page(sae_page.url).page
    features = sae_page.data["sae"]["features"]
    feature = next(f for f in features if "explanations" in f)
    open_features(page)
    card = open_feature(page, feature["index"])
    assert card.locator("h3").text_content() == f"feature {feature['index']}"
    assert card.locator(".card-hist svg").count() == 1
    zeros = feature["stats"]["count"] - round(feature["frequency"] * feature["stats"]["count"])
    fires = feature["stats"]["count"] - zeros
    assert card.locator(".card-hist figcaption").text_content() == (
        f"the {fires:,} tokens where it fires; {zeros:,} at 0 not drawn"
    )
    assert card.locator(".examples").count() == 1  # positive only
    legend = card.locator(".card-title .scale")  # a feature is >= 0: its scale runs from 0
    assert legend.get_attribute("class") == "scale one-sided"
    assert legend.locator("span").first.text_content() == "0"
    assert legend.locator("span").last.text_content().startswith("+")
    assert card.locator(".examples.pos .example").count() == len(feature["top_positive"])
    text = feature["explanations"]["positive"]["text"]
    assert card.locator(".examples.pos .explanation-text").text_content() == text
    assert card.locator(".composition-grid .cell").count() == 20  # 5 layers × 4 modules
    assert card.locator(".composition-grid .cell[data-open]").count() == 16
    assert card.locator(".composition-list a").count() == 16
    more = card.locator("details.more")
    assert more.locator("summary").all_text_contents() == [
        "Quantile samples", "Top tokens", "Logit effects", "Position profile",
    ]  # fmt: skip
    open_sections(more)
    samples = sum(len(r["examples"]) for r in feature["quantile_samples"])
    assert card.locator(".quantiles .example").count() == samples
    assert card.locator(".value-table tbody tr").count() == len(feature["top_tokens"]) + 20
    assert card.locator("svg.profile circle").count() > 3


def contributors(data: dict, key: str) -> list[tuple[int, float]]:
    """Brute force: the features whose composition holds direction `key`, largest |weight|
    first (as embedded), then by index; at most 10."""
    found = [
        (f["index"], dashboard._round(e["weight"]))
        for f in data["sae"]["features"]
        for e in f["composition"]
        if direction_key(e["layer"], e["module"], e["component"]) == key
    ]
    return sorted(found, key=lambda x: (-abs(x[1]), x[0]))[:10]


def test_a_direction_links_to_its_features_and_back(open_page, sae_page):
    page = open_page(sae_page.url + "#layer-3").page
    key = "L3.down_proj[0]"
    direction = card(page, key)
    legend = direction.locator(".card-title .scale")  # a direction's, both signs
    assert legend.get_attribute("class") == "scale"
    assert legend.locator("span").first.text_content().startswith("−")
    section = direction.locator("details.more", has_text="SAE features")
    section.locator("summary").click()
    links = section.locator("a.feature-link")
    expected = contributors(sae_page.data, key)
    assert expected
    expect(links).to_have_count(len(expected))
    assert [int(i) for i in links.evaluate_all("ls => ls.map(l => l.dataset.feature)")] == [
        i for i, _ in expected
    ]
    links.first.click()
    settled(page)
    feature = page.locator(".feature-card .card")
    assert feature.locator("h3").text_content() == f"feature {expected[0][0]}"
    back = feature.locator(f'.composition-list a[data-open="{key}"]')
    assert back.count() == 1
    back.click()
    settled(page)
    assert page.locator(".card.opened").get_attribute("data-key") == key
    assert page.evaluate("location.hash") == "#layer-3"
    cell = page.locator(f'.feature-card .composition-grid .cell[data-open="{key}"]')
    assert cell.count() == 1  # the chart's cells open directions too


def test_search_finds_a_feature_by_its_explanation(open_page, sae_page):
    page = open_page(sae_page.url).page
    feature = next(f for f in sae_page.data["sae"]["features"] if "explanations" in f)
    text = feature["explanations"]["positive"]["text"]
    searched(page, text)
    found = page.locator("#search-results .features-found a.feature-link")
    assert f"feature {feature['index']}" in found.all_text_contents()
    page.locator(f'#search-results .features-found a[data-feature="{feature["index"]}"]').click()
    settled(page)
    assert page.locator(".feature-card .card h3").text_content() == f"feature {feature['index']}"


def test_the_full_size_page_stays_within_25_mb_and_opens_its_features(open_page, sae_full):
    assert sae_full.path.stat().st_size <= 25_000_000
    page = open_page(sae_full.url).page
    assert page.locator(".card").count() == 7  # the first paint: one layer
    open_features(page)
    assert len(listed(page)) == 100  # a page of the list at a time
    page.click('.sort button:text("frequency")')
    page.click("button.page-next")
    features = sae_full.data["sae"]["features"]
    by_frequency = sorted(features, key=lambda f: -dashboard._round(f["frequency"]))
    assert listed(page) == [f["index"] for f in by_frequency[100:200]]
    page.click('.sort button:text("index")')
    while page.locator("button.page-next").is_enabled():
        page.click("button.page-next")
    assert listed(page) == [f["index"] for f in features[3500:]]
    last = features[-1]["index"]
    card_ = open_feature(page, last)
    assert card_.locator("h3").text_content() == f"feature {last}"
    assert card_.locator(".composition-grid .cell").count() == 448
    assert card_.locator(".composition-grid .cell[data-open]").count() == 16


def test_markup_in_a_features_explanation_and_tokens_is_shown_as_text(open_page, tmp_path):
    data = with_sae()
    at = explained_index(data)
    feature = data["sae"]["features"][at]
    feature["explanations"]["positive"]["text"] = HOSTILE_EXPLANATION
    feature["top_tokens"][0]["token"] = HOSTILE_TOKENS[0]
    page = open_page(rendered(tmp_path, data).url).page  # no dialog, no script error
    open_features(page)
    row = page.locator(f'.feature-table tr[data-index="{feature["index"]}"]')
    assert row.locator(".explanation-text").text_content() == HOSTILE_EXPLANATION
    shown = open_feature(page, feature["index"])
    assert shown.locator(".examples.pos .explanation-text").text_content() == HOSTILE_EXPLANATION
    open_sections(shown.locator("details.more"))
    assert page.locator("#features img").count() == 0
    searched(page, HOSTILE_TOKENS[0])
    found = page.locator("#search-results .features-found a.feature-link")
    assert f"feature {feature['index']}" in found.all_text_contents()
