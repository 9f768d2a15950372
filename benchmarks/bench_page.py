"""The dashboard's load and navigation times in headless Chromium, on synthetic pages of the
reference study's size (tests/synthetic.py: every field the writer writes).

    python benchmarks/bench_page.py [--loads 5] [--sae] [--json FILE]

Each load is a fresh browser context. The figures are the page's own performance entries, so
that the machine's delays outside the page stay out of them:
- first paint: `first-contentful-paint`; ready: the `dashboard-ready` mark (the overview and
  the first layer's cards drawn), both from the navigation;
- a layer: the `dashboard-layer` measure, from the request to the frame that shows it, for
  ←/→ (neighbours decoded ahead) and a layer picked in the menu (decoded then);
- with --sae, also the 448-direction page with its SAE's 3,584 features, and its Features view:
  the `dashboard-features` measure, from opening it to the frame that shows its list (decoded
  then).
Medians over the loads. The budget of the foundation issue, for the 448-direction page: at most
12 MB, ready within 1.5 s, the median layer within 300 ms; of issue 14, for that page with its
SAE's 3,584 features: at most 25 MB.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, layer_times, rendered, settled
from tests.synthetic import make_activations

ALL_SEVEN = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
PAGES = {
    # The reference study's adapter: rank 1 on all seven projections of 64 layers.
    "64 layers x 7 modules": dict(n_layers=64, modules=ALL_SEVEN, k=16, window=10, bins=50, seed=7),
    "64 layers x gate/up/down": dict(n_layers=64, k=16, window=10, bins=50, seed=32),
}
# The study's SAE of that adapter (--sae): 8 x 448 latents, k = 16.
SAE_PAGE = {
    "64 layers x 7 modules, 3,584 SAE features": PAGES["64 layers x 7 modules"] | {"sae": 3584}
}
SAE_BYTES = 25_000_000  # the budget of the page with the SAE's features
BUDGET = {"bytes": 12_000_000, "ready_ms": 1500, "layer_ms": 300}  # of the 448-direction page
STEPS = ["ArrowRight", "ArrowRight", "ArrowLeft", "jump", "ArrowRight"]  # after the first layer
JUMP_TO = "40"


def one_load(browser, url: str) -> dict[str, float | list[float]]:
    """First paint, ready, and each step's layer time of one load in a fresh context."""
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    page.goto(url)
    settled(page)
    first = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime")
    ready = page.evaluate("performance.getEntriesByName('dashboard-ready')[0].startTime")
    for n, step in enumerate(STEPS):
        if step == "jump":
            page.select_option("#layer-select", JUMP_TO)
        else:
            page.keyboard.press(step)
        layer_times(page, n + 2)  # one at a time: the first layer's is in too
    steps = layer_times(page, len(STEPS) + 1)[1:]
    found = {"first_paint_ms": first, "ready_ms": ready, "steps_ms": steps}
    if page.locator("#features").count():
        page.click("#features details > summary")
        settled(page)
        found["features_ms"] = page.evaluate(
            "performance.getEntriesByName('dashboard-features')[0]?.duration ?? null"
        )
    context.close()
    return found


def measure(loads: int, pages: dict[str, dict]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for i, (name, options) in enumerate(pages.items()):
            directory = Path(tmp) / str(i)
            directory.mkdir()
            page = rendered(directory, make_activations(**options))
            runs = [one_load(browser, page.url) for _ in range(loads)]
            steps = [run["steps_ms"] for run in runs]
            results[name] = {
                "bytes": page.path.stat().st_size,
                "directions": sum(len(p["directions"]) for layer in page.data["layers"]
                                  for p in layer["projections"].values()),
                "first_paint_ms": statistics.median(r["first_paint_ms"] for r in runs),
                "ready_ms": statistics.median(r["ready_ms"] for r in runs),
                "neighbour_ms": statistics.median(t for s in steps for j, t in enumerate(s)
                                                  if STEPS[j] != "jump"),
                "menu_ms": statistics.median(s[STEPS.index("jump")] for s in steps),
                "layer_ms": statistics.median(t for s in steps for t in s),
            }  # fmt: skip
            if "features_ms" in runs[0]:
                results[name]["features_ms"] = statistics.median(r["features_ms"] for r in runs)
        version = browser.version
        browser.close()
    return {"chromium": version, "machine": platform.processor() or platform.machine(),
            "loads": loads, "pages": results}  # fmt: skip


def within_budget(page: dict) -> bool:
    return all(page[key] <= limit for key, limit in BUDGET.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=5, help="loads of each page (default 5)")
    parser.add_argument("--sae", action="store_true", help="also the page with SAE features")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    found = measure(args.loads, PAGES | (SAE_PAGE if args.sae else {}))
    print(f"Chromium {found['chromium']}, median of {args.loads} loads")
    for name, page in found["pages"].items():
        print(
            f"  {name} ({page['directions']} directions): {page['bytes'] / 1e6:.2f} MB, "
            f"first paint {page['first_paint_ms']:.0f} ms, ready {page['ready_ms']:.0f} ms, "
            f"next layer {page['neighbour_ms']:.0f} ms, menu {page['menu_ms']:.0f} ms"
            + (f", Features view {page['features_ms']:.0f} ms" if "features_ms" in page else "")
        )
    full = found["pages"]["64 layers x 7 modules"]
    verdict = "within" if within_budget(full) else "OVER"
    print(f"448-direction page {verdict} its budget: {BUDGET}")
    for sae in (found["pages"][name] for name in SAE_PAGE if args.sae):
        verdict = "within" if sae["bytes"] <= SAE_BYTES else "OVER"
        print(f"3,584-feature page {verdict} its budget: {SAE_BYTES / 1e6:g} MB")
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
