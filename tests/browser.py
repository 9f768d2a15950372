"""Headless Chromium for the dashboard tests: the browser, pages that record what they did, and
rendering an activations file to a page. tests/conftest.py makes the fixtures available."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

import generate_html_dashboard as dashboard

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"viewport": {"width": 1400, "height": 1000}}


@dataclass
class Rendered:
    path: Path
    data: dict

    @property
    def url(self) -> str:
        return self.path.as_uri()


def rendered(directory: Path, data: dict) -> Rendered:
    source, page = directory / "activations.json", directory / "dashboard.html"
    source.write_text(json.dumps(data), encoding="utf-8")
    assert dashboard.main(["--data", str(source), "--output", str(page)]) == 0
    return Rendered(page, data)


@dataclass
class Opened:
    """A page and what it did: every request, dialog and script error."""

    page: Page
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def watched(page: Page) -> Opened:
    """Record from now on what `page` does; dialogs are dismissed."""
    record = Opened(page)
    page.on("request", lambda request: record.requests.append(request.url))
    page.on("dialog", lambda dialog: (record.dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: record.errors.append(str(error)))
    page.on("console", lambda m: m.type == "error" and record.errors.append(m.text))
    return record


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser) -> Iterator[Callable[..., Opened]]:
    """Open a URL in a fresh context; afterwards, no page may have shown a dialog or a script
    error (a CSP violation is one)."""
    opened: list[Opened] = []

    def open_(url: str, **context_options) -> Opened:
        record = watched(browser.new_context(**(DESKTOP | context_options)).new_page())
        record.page.goto(url)
        opened.append(record)
        settled(record.page)
        return record

    yield open_
    for record in opened:
        record.page.context.close()
        assert not record.dialogs, f"the page opened dialogs: {record.dialogs}"
        assert not record.errors, f"script errors or CSP violations: {record.errors}"


def settled(page: Page, timeout: float = 10) -> None:
    """Wait until the page has drawn what it was last asked to: it decodes its data
    asynchronously and marks #layer with data-state="ready" once the layer is on screen.
    Polled from here: wait_for_function compiles its predicate with eval, which the page's
    Content-Security-Policy (rightly) forbids; page.evaluate is not subject to it."""
    deadline = time.monotonic() + timeout
    state = "document.getElementById('layer')?.dataset.state"
    while page.evaluate(state) != "ready":
        assert time.monotonic() < deadline, f"the page was not ready within {timeout} s"
        page.wait_for_timeout(10)


def layer_times(page: Page, count: int, timeout: float = 10) -> list[float]:
    """The page's own measure of each layer it showed (the `dashboard-layer` entries, from the
    request to the painted frame), once `count` are in."""
    times = "performance.getEntriesByName('dashboard-layer').map(e => e.duration)"
    deadline = time.monotonic() + timeout
    while len(page.evaluate(times)) < count:
        assert time.monotonic() < deadline, f"the layer was not drawn within {timeout} s"
        page.wait_for_timeout(20)
    return page.evaluate(times)


def searched(page: Page, query: str, timeout: float = 10) -> None:
    """Type `query` into the search box and wait for its results (drawn once typing pauses;
    #search-results' data-query is the query they are for)."""
    page.fill("#search", query)
    deadline = time.monotonic() + timeout
    while page.evaluate("document.getElementById('search-results').dataset.query") != query:
        assert time.monotonic() < deadline, f"no results for {query!r} within {timeout} s"
        page.wait_for_timeout(10)


def card(page: Page, key: str):
    """The card of one direction, by its key ("L12.gate_proj[0]")."""
    return page.locator(f'.card[data-key="{key}"]')


def open_sections(sections: Locator) -> None:
    """Open each collapsed <details> and wait for its content: the page builds a section in
    its (asynchronous) toggle event, the first time it is opened."""
    for details in sections.all():
        details.locator("summary").click()
        expect(details.locator(":scope > summary + *")).to_have_count(1)
    settled(sections.page)
