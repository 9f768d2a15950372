"""The demo end to end: the embedded SmolLM2, the committed adapter and held-out traces through
the real backend, rendered, and read in headless Chromium. Every view has real data here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import generate_html_dashboard as dashboard
from backend.generate_activations_data import main
from tests.browser import card, open_sections, rendered, searched, settled

DEMO = Path(__file__).resolve().parent.parent / "demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "activations.json"
    argv = ["--base-model", "embedded", "--lora-path", str(DEMO / "adapter"), "--quiet"]
    argv += ["--data-file", str(DEMO / "data" / "heldout.jsonl"), "--num-examples", "4"]
    argv += ["--store-sequences"]
    assert main([*argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_demo_run_carries_every_analysis(demo):
    assert demo["metadata"]["lora_layers"] == list(range(30))
    for layer in demo["layers"]:
        for name, projection in layer["projections"].items():
            (direction,) = projection["directions"]
            assert direction["top_positive"] or direction["top_negative"]
            samples = direction["quantile_samples"]
            assert len({tuple(r["quantile_range"]) for r in samples}) >= 3
            assert {len(r["examples"]) for r in samples} <= {1, 2}  # a tail may hold 1 token
            assert direction["top_tokens"] and direction["bottom_tokens"]
            assert direction["position_profile"]["count"][0] == 4  # one first token per example
            assert ("logit_effects" in direction) == (name == "down_proj")
            siblings = {"gate_proj", "up_proj", "down_proj"} - {name}
            for example in direction["top_positive"] + direction["top_negative"]:
                assert set(example["sibling_activations"]) == siblings
    assert len(demo["cross_layer_cosine"]["labels"]) == 90
    assert sorted(map(int, demo["examples"])) == [0, 1, 2, 3]


def test_the_demo_dashboard_shows_every_view(demo, open_page, tmp_path):
    shown = rendered(tmp_path, demo)
    # The page budget (README: `make demo`'s page, of all 51 held-out traces, is 0.85 MB).
    assert shown.path.stat().st_size <= 1_000_000
    opened = open_page(shown.url + "#layer-15")
    page = opened.page
    assert page.locator("#heatmap .cell").count() == 90
    down = card(page, "L15.down_proj[0]")
    assert down.locator("details.more summary").all_text_contents() == [
        "Quantile samples", "Top and bottom tokens", "Logit effects", "Position profile",
    ]  # fmt: skip
    open_sections(down.locator("details.more"))
    ranges = demo["layers"][15]["projections"]["down_proj"]["directions"][0]["quantile_samples"]
    assert down.locator(".quantiles .example").count() == sum(len(r["examples"]) for r in ranges)
    assert down.locator("svg.profile circle").count() > 3
    assert down.locator(".views button").all_text_contents() == [
        "down_proj", "gate_proj", "up_proj", "gate×up",
    ]  # fmt: skip
    widths = page.locator("#context-width button")
    assert widths.all_text_contents() == ["±3", "±10", "whole"]
    widths.last.click()
    settled(page)
    assert down.locator(".examples.pos .example").first.locator(".tok").count() > 21
    searched(page, " Wait")
    assert page.locator("#search-results a").count() > 0
    assert opened.errors == [] and opened.dialogs == []
    assert (demo["schema_version"],) == dashboard.KNOWN_SCHEMA_VERSIONS
