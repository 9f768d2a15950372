// Pure formatting and decoding of what generate_html_dashboard.py embeds: no DOM, no state.
/* exported Format */
const Format = (() => {
  // Values are embedded already rounded to 4 significant digits: show them as they are.
  const fmt = (v) => (v === null || v === undefined ? "not finite" : String(v));
  const round4 = (v) => Number(v.toPrecision(4)); // for values computed here, and fine edges
  const fmt4 = (v) => String(round4(v));
  const COUNT = new Intl.NumberFormat("en-US"); // one formatter: toLocaleString makes one a call
  const fmtCount = (n) => COUNT.format(n);
  const hex = (ch) => ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  const finite = (v) => v !== null && v !== undefined;

  // Whitespace and invisible or reordering characters (controls, bidi marks, zero-width):
  // each is drawn as a faint glyph, while the raw character stays in the DOM at zero size so
  // textContent and copy/paste still give the token's exact text.
  const SPECIAL_CHARS =
    "\\s\\u0000-\\u001f\\u007f-\\u009f\\u00ad" + // whitespace, controls, soft hyphen
    "\\u061c\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2069\\ufeff"; // bidi, zero-width
  const SPECIAL = new RegExp(`[${SPECIAL_CHARS}]`, "u");
  const SPECIAL_ALL = new RegExp(`[${SPECIAL_CHARS}]`, "gu");
  const GLYPHS = {
    " ": "␣", "\n": "↵", "\t": "→", "\r": "␍", "\u00a0": "⍽", "\u2028": "↵", "\u2029": "¶",
  };

  function glyph(ch) {
    if (ch in GLYPHS) return GLYPHS[ch];
    const code = ch.codePointAt(0);
    // Hex rather than control pictures (␀..␟), which many monospace fonts lack.
    return `⟨${code < 0x100 ? hex(ch).slice(2) : hex(ch)}⟩`;
  }

  const isSpecial = (ch) => SPECIAL.test(ch);

  // The token as a quoted string with every special character escaped, for the tooltip.
  const escaped = (text) =>
    JSON.stringify(text).replace(SPECIAL_ALL, (ch) => (ch === " " ? ch : `\\u${hex(ch)}`));

  // A context's values embedded as [e, integers in units of 10^-e]: dividing by a power of ten
  // gives back the rounded decimal exactly as written.
  const unfixed = ([e, ...ints]) =>
    ints.map((v) => (v === null ? null : e >= 0 ? v / 10 ** e : v * 10 ** -e));

  // The largest |value| of a direction, and the colour scale of its tokens.
  const maxAbs = (stats) => Math.max(Math.abs(stats.min), stats.max);
  const scaleOf = (stats) => maxAbs(stats) || 1;

  // The module of a direction's name ("up_proj[1]" -> up_proj), whose components it groups.
  const moduleOf = (name) => name.replace(/\[\d+\]$/, "");

  return {
    fmt, round4, fmt4, fmtCount, finite, glyph, isSpecial, escaped, unfixed, maxAbs, scaleOf,
    moduleOf,
  };
})();
