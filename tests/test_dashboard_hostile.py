"""Arbitrary token text in real headless Chromium: the page loads without error or dialog,
builds no element from the text, and shows the text exactly.

Property-based (hypothesis), derandomized so that every run tries the same examples; one browser
page is reused across examples to keep the suite fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playwright.sync_api import Browser

from tests.browser import DESKTOP, Opened, rendered, settled, watched
from tests.synthetic import make_activations

FRAGMENTS = [
    "</script>", "<script>alert(1)</script>", "</SCRIPT ", "<!--", "-->", "<![CDATA[", "]]>",
    "<img src=x onerror=alert(2)>", "<svg onload=alert(3)>", "</style>", '"', "'", "`", "\\",
    "&amp;", "&#x3c;", "&lt;", "{{ 7*7 }}", "${alert(4)}", "\x00", "\x07", "\x1b[31m", "\x7f",
    "\x85", "\r\n", "\t", "\ud800", "\udfff", "\u200b", "\u200e", "\u200f", "\u202e", "\u2066",
    "\u2028", "\u2029", "\ufeff", "\ufffe", "\u0301", "😀", "👍🏽", "日本",
]  # fmt: skip
# Every code point, lone surrogates included.
ANY_CHAR = st.characters(exclude_categories=())
TOKEN = st.one_of(
    st.text(ANY_CHAR, max_size=12),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(ANY_CHAR, max_size=3), max_size=6).map("".join),
    st.builds(lambda piece, n: piece * n, st.sampled_from([*FRAGMENTS, "x"]), st.integers(1, 2000)),
)

# What the first example row of the first card shows, per token: its code points, and whether
# every element inside it is a childless one-character span.ws (the page's marks for spaces and
# invisible characters); and the tag names of every element outside the token spans.
READ_PAGE = """() => {
  const row = document.querySelector(".card .examples.pos .example");
  const tokens = [...row.querySelectorAll(".tok")];
  return {
    visible: row.offsetHeight > 0,
    tokens: tokens.map((t) => Array.from(t.textContent, (c) => c.codePointAt(0))),
    onlyMarks: tokens.every((t) => [...t.querySelectorAll("*")].every(
      (e) => e.matches("span.ws") && !e.children.length && Array.from(e.textContent).length === 1)),
    outside: [...document.querySelectorAll("*")].filter((e) => !e.closest(".tok"))
      .map((e) => e.tagName),
  };
}"""


def with_tokens(tokens: list[str]) -> dict:
    """An activations file whose first shown example has `tokens` as its context."""
    data = make_activations(n_layers=1, modules=["up_proj"], k=1, seed=5)
    example = data["layers"][0]["projections"]["up_proj"]["directions"][0]["top_positive"][0]
    example.update(
        tokens=tokens, activations=[1.0] * len(tokens), activation=1.0, target=0, token_index=0
    )
    return data


@pytest.fixture(scope="module")
def page(browser: Browser) -> Iterator[Opened]:
    context = browser.new_context(**DESKTOP)
    yield watched(context.new_page())
    context.close()


@pytest.fixture(scope="module")
def show(page: Opened, tmp_path_factory) -> Iterator:
    """tokens -> what the page shows (READ_PAGE) once loaded, each in a fresh file."""
    folder, numbers = tmp_path_factory.mktemp("hostile"), count()

    def show_(tokens: list[str]) -> dict:
        directory = Path(folder / str(next(numbers)))
        directory.mkdir()
        page.page.goto(rendered(directory, with_tokens(tokens)).url)
        settled(page.page)
        return page.page.evaluate(READ_PAGE)

    return show_


@pytest.fixture(scope="module")
def plain_outside(show) -> list[str]:
    """The elements outside the token spans for harmless tokens: hostile ones must add none."""
    return show(["plain"])["outside"]


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tokens=st.lists(TOKEN, min_size=1, max_size=6))
def test_any_token_text_is_shown_as_text(page, show, plain_outside, tokens):
    page.dialogs.clear()
    page.errors.clear()
    shown = show(tokens)
    assert page.errors == [] and page.dialogs == []
    assert shown["visible"]
    assert shown["tokens"] == [[ord(c) for c in token] for token in tokens]
    assert shown["onlyMarks"], "an element inside a token that the page did not make"
    assert shown["outside"] == plain_outside
