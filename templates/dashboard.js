"use strict";
// Draws the dashboard from the JSON that generate_html_dashboard.py embeds. Only the layer on
// screen is in the DOM, built when it is shown, so first paint does not grow with the run.
// Text from the data is only ever inserted with textContent (or as Text nodes).
(() => {
  const DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
  const STRINGS = DATA.strings;
  const LAYERS = DATA.layers;
  const SVG_NS = "http://www.w3.org/2000/svg";

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

  const tokenInfo = new WeakMap(); // token <span> -> what its tooltip shows
  const state = { index: -1, statsOpen: false, logCounts: false };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    return node;
  }

  // Values are embedded already rounded to 4 significant digits: show them as they are.
  const fmt = (v) => String(v);
  const fmt4 = (v) => String(Number(v.toPrecision(4))); // histogram edges are embedded finer
  const fmtCount = (n) => n.toLocaleString("en-US");
  const hex = (ch) => ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");

  function glyph(ch) {
    if (ch in GLYPHS) return GLYPHS[ch];
    const code = ch.codePointAt(0);
    // Hex rather than control pictures (␀..␟), which many monospace fonts lack.
    return `⟨${code < 0x100 ? hex(ch).slice(2) : hex(ch)}⟩`;
  }

  // The token as a quoted string with every special character escaped, for the tooltip.
  const escaped = (text) =>
    JSON.stringify(text).replace(SPECIAL_ALL, (ch) => (ch === " " ? ch : `\\u${hex(ch)}`));

  function appendText(parent, text) {
    let run = "";
    for (const ch of text) {
      if (!SPECIAL.test(ch)) {
        run += ch;
        continue;
      }
      if (run) parent.append(run);
      run = "";
      const mark = el("span", "ws", ch);
      mark.dataset.glyph = glyph(ch);
      parent.append(mark);
    }
    if (run) parent.append(run);
  }

  // Background alpha is |value| / scale, with scale shared by every token of one direction.
  function paint(node, value, scale) {
    const alpha = Math.min(1, Math.abs(value) / scale);
    node.classList.add(value < 0 ? "neg" : "pos");
    if (alpha > 0.6) node.classList.add("strong");
    node.style.setProperty("--a", alpha.toFixed(3));
  }

  function directionName(name, projection, direction) {
    return projection.rank > 1 ? `${name}[${direction.component}]` : name;
  }

  function* directions(layer) {
    for (const [name, projection] of Object.entries(layer.projections)) {
      for (const direction of projection.directions) {
        yield [directionName(name, projection, direction), projection, direction];
      }
    }
  }

  function scaleLegend(low, high) {
    const legend = el("span", "scale");
    legend.append(el("span", "", low), el("span", "scale-bar"), el("span", "", high));
    return legend;
  }

  // ---- examples -------------------------------------------------------------------------

  // Examples are embedded as rows of DATA.example_fields, without "activation" (it is the
  // activation at the target): objects are made only for the examples on screen.
  function exampleOf(row) {
    const example = Object.fromEntries(DATA.example_fields.map((field, i) => [field, row[i]]));
    example.activation = example.activations[example.target];
    return example;
  }

  // Examples with the same context, position and value are one finding (typically a prompt
  // prefix that every example shares): one row, saying how many examples it stands for.
  function sameContext(a, b) {
    return a.token_index === b.token_index && a.activation === b.activation &&
      a.target === b.target && a.tokens.length === b.tokens.length &&
      a.tokens.every((id, j) => id === b.tokens[j]);
  }

  function groupRepeats(examples) {
    const groups = [];
    for (const example of examples) {
      const last = groups[groups.length - 1];
      if (last && sameContext(last[0], example)) last.push(example);
      else groups.push([example]);
    }
    return groups;
  }

  function exampleRow(group, scale) {
    const example = group[0];
    const row = el("li", "example");
    const side = el("div", "side");
    const value = el("span", "value", fmt(example.activation));
    value.classList.add(example.activation < 0 ? "neg" : "pos");
    const where = el("span", "where", `#${example.example_index} t${example.token_index}`);
    where.title = `example ${example.example_index}, token ${example.token_index}`;
    side.append(value, where);
    if (group.length > 1) {
      const repeats = el("span", "repeats", `×${group.length} examples`);
      repeats.title = "the same context in examples " +
        group.map((e) => `#${e.example_index}`).join(", ");
      side.append(repeats);
    }

    const context = el("div", "context");
    const start = example.token_index - example.target;
    example.tokens.forEach((id, j) => {
      const span = el("span", "tok");
      const text = STRINGS[id];
      appendText(span, text);
      paint(span, example.activations[j], scale);
      if (j === example.target) span.classList.add("target");
      tokenInfo.set(span, {
        text,
        value: example.activations[j],
        example: example.example_index,
        position: start + j,
        offset: j - example.target,
      });
      context.append(span);
    });
    row.append(side, context);
    return row;
  }

  function exampleSection(title, examples, scale, sign) {
    const section = el("div", `examples ${sign}`);
    section.append(el("h4", "", `${title} (${examples.length})`));
    if (!examples.length) {
      section.append(el("p", "empty", "none"));
      return section;
    }
    const list = el("ol", "example-list");
    for (const group of groupRepeats(examples.map(exampleOf))) list.append(exampleRow(group, scale));
    section.append(list);
    return section;
  }

  function directionCard(name, projection, direction) {
    const scale = Math.max(Math.abs(direction.stats.min), Math.abs(direction.stats.max)) || 1;
    const card = el("section", "card");
    const head = el("header", "card-head");
    const title = el("div", "card-title");
    const legend = scaleLegend(fmt(-scale), `+${fmt(scale)}`);
    legend.title = "colour scale of this direction";
    title.append(el("h3", "", name), legend);
    const meta = el(
      "div",
      "card-meta",
      `reads ${projection.read_site} · scaling ${fmt(projection.scaling)} · ` +
        `‖A‖ ${fmt(direction.a_norm)} · ‖B‖ ${fmt(direction.b_norm)}`,
    );
    head.append(title, meta);
    card.append(
      head,
      exampleSection("Top positive", direction.top_positive, scale, "pos"),
      exampleSection("Top negative", direction.top_negative, scale, "neg"),
    );
    return card;
  }

  // ---- statistics -----------------------------------------------------------------------

  const STATS_COLUMNS = [
    "direction", "count", "min", "max", "mean", "std", "‖A‖", "‖B‖", "scaling",
  ];

  function statsTable(layer) {
    const table = el("table", "stats-table");
    const head = table.createTHead().insertRow();
    for (const label of STATS_COLUMNS) head.append(el("th", "", label));
    const body = table.createTBody();
    for (const [name, projection, direction] of directions(layer)) {
      const row = body.insertRow();
      const s = direction.stats;
      const values = [
        s.min, s.max, s.mean, s.std, direction.a_norm, direction.b_norm, projection.scaling,
      ];
      row.append(el("th", "", name));
      row.append(el("td", "", fmtCount(s.count)), ...values.map((v) => el("td", "", fmt(v))));
    }
    return scroller(table);
  }

  function histogram(hist, logCounts) {
    const [W, H, L, R, T, B] = [320, 150, 44, 10, 10, 30];
    const pw = W - L - R;
    const ph = H - T - B;
    const { edges, counts } = hist;
    const lo = edges[0];
    const hi = edges[edges.length - 1];
    const x = (v) => L + ((v - lo) / (hi - lo || 1)) * pw;
    const f = logCounts ? (c) => Math.log10(1 + c) : (c) => c;
    const top = Math.max(...counts.map(f)) || 1;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "hist", role: "img" });
    counts.forEach((count, i) => {
      if (!count) return;
      const h = Math.max((f(count) / top) * ph, 0.5);
      const center = (edges[i] + edges[i + 1]) / 2;
      const bar = svg("rect", {
        x: x(edges[i]),
        y: T + ph - h,
        width: Math.max(x(edges[i + 1]) - x(edges[i]) - 0.4, 0.6),
        height: h,
        class: center < 0 ? "bar neg" : "bar pos",
      });
      const tip = svg("title", {});
      tip.textContent = `[${fmt4(edges[i])}, ${fmt4(edges[i + 1])}): ${fmtCount(count)}`;
      bar.append(tip);
      root.append(bar);
    });
    root.append(svg("line", { x1: L, x2: W - R, y1: T + ph, y2: T + ph, class: "axis" }));
    root.append(svg("line", { x1: L, x2: L, y1: T, y2: T + ph, class: "axis" }));
    const label = (text, ax, ay, anchor) => {
      const node = svg("text", { x: ax, y: ay, "text-anchor": anchor });
      node.textContent = text;
      root.append(node);
    };
    if (lo < 0 && hi > 0) {
      root.append(svg("line", { x1: x(0), x2: x(0), y1: T, y2: T + ph + 4, class: "zero" }));
      label("0", x(0), T + ph + 14, "middle");
    }
    label(fmt4(lo), L, T + ph + 14, "start");
    label(fmt4(hi), W - R, T + ph + 14, "end");
    label("activation", L + pw / 2, H - 2, "middle");
    const topLabel = logCounts ? `10^${top.toFixed(1)}` : fmtCount(top);
    label(topLabel, L - 4, T + 8, "end");
    label("0", L - 4, T + ph, "end");
    label(logCounts ? "log n" : "count", L - 4, T + ph / 2, "end");
    return root;
  }

  function histograms(layer) {
    const box = el("div", "hist-box");
    const toggle = el("label", "toggle");
    const check = el("input");
    check.type = "checkbox";
    check.checked = state.logCounts;
    toggle.append(check, " log-scale counts");
    const grid = el("div", "hists");
    const draw = () => {
      grid.replaceChildren();
      for (const [name, , direction] of directions(layer)) {
        const figure = el("figure", "hist-figure");
        figure.append(el("figcaption", "", name), histogram(direction.histogram, state.logCounts));
        grid.append(figure);
      }
    };
    check.addEventListener("change", () => {
      state.logCounts = check.checked;
      draw();
    });
    draw();
    box.append(el("h3", "", "Activation histograms"), toggle, grid);
    return box;
  }

  const SPACES = {
    mlp_hidden: "MLP hidden space: gate/up write vectors (B), down read vector (A)",
    residual: "residual stream: gate/up read vectors (A), down write vector (B)",
  };

  function cosineTable(cosine) {
    const figure = el("figure", "cosine");
    figure.append(el("figcaption", "", SPACES[cosine.space] || cosine.space));
    const table = el("table", "cos-table");
    const head = table.createTHead().insertRow();
    head.append(el("th"));
    for (const label of cosine.labels) head.append(el("th", "col", label));
    const body = table.createTBody();
    cosine.matrix.forEach((values, i) => {
      const row = body.insertRow();
      row.append(el("th", "", cosine.labels[i]));
      for (const v of values) {
        const cell = el("td", "", v.toFixed(2));
        cell.title = `${cosine.labels[i]} · ${fmt(v)}`;
        paint(cell, v, 1);
        row.append(cell);
      }
    });
    figure.append(scroller(table));
    return figure;
  }

  function cosines(layer) {
    const box = el("div", "cos-box");
    const title = el("h3", "", "Cosine similarities ");
    title.append(scaleLegend("−1", "+1"));
    box.append(title);
    const grid = el("div", "cos-grid");
    for (const cosine of layer.cosine_similarities) grid.append(cosineTable(cosine));
    if (!layer.cosine_similarities.length) grid.append(el("p", "empty", "none in this file"));
    box.append(grid);
    return box;
  }

  function scroller(child) {
    const box = el("div", "scroll");
    box.append(child);
    return box;
  }

  function statsSection(layer) {
    const details = el("details", "stats");
    details.open = state.statsOpen;
    details.addEventListener("toggle", () => {
      state.statsOpen = details.open;
    });
    details.append(
      el("summary", "", `Statistics for layer ${layer.layer}`),
      statsTable(layer),
      histograms(layer),
      cosines(layer),
    );
    return details;
  }

  // ---- layers and navigation ------------------------------------------------------------

  const main = document.getElementById("layer");
  const select = document.getElementById("layer-select");
  const prev = document.getElementById("prev-layer");
  const next = document.getElementById("next-layer");
  const position = document.getElementById("layer-position");

  function renderLayer(layer) {
    const grid = el("div", "modules");
    for (const [name, projection, direction] of directions(layer)) {
      grid.append(directionCard(name, projection, direction));
    }
    const title = el("h2", "layer-title", `Layer ${layer.layer}`);
    main.replaceChildren(title, grid, statsSection(layer));
  }

  function show(index) {
    if (index === state.index) return;
    state.index = index;
    hideTooltip();
    select.value = String(index);
    prev.disabled = index === 0;
    next.disabled = index === LAYERS.length - 1;
    position.textContent = `${index + 1} of ${LAYERS.length}`;
    renderLayer(LAYERS[index]);
  }

  function indexFromHash() {
    const match = /^#layer-(-?\d+)$/.exec(location.hash);
    const index = match ? LAYERS.findIndex((layer) => layer.layer === Number(match[1])) : -1;
    return Math.max(index, 0);
  }

  // Controls show the layer at once (hashchange comes later, and keys can repeat faster)
  // and record it in the hash, so that links, reloads and the back button agree with it.
  function go(index) {
    if (index < 0 || index >= LAYERS.length) return;
    show(index);
    location.hash = `layer-${LAYERS[index].layer}`;
  }

  // ---- tooltip --------------------------------------------------------------------------

  const tooltip = document.getElementById("tooltip");

  function showTooltip(span) {
    const info = tokenInfo.get(span);
    const line = (label, text) => {
      const row = el("div");
      row.append(el("span", "tip-label", label), el("span", "tip-value", text));
      return row;
    };
    const offset = info.offset === 0 ? "target" : `${info.offset > 0 ? "+" : ""}${info.offset}`;
    tooltip.replaceChildren(
      line("token", escaped(info.text)),
      line("activation", fmt(info.value)),
      line("position", `example ${info.example}, token ${info.position} (${offset})`),
    );
    tooltip.hidden = false;
    // Placed in page coordinates, so that it scrolls along with its token.
    const box = span.getBoundingClientRect();
    const width = document.documentElement.clientWidth;
    const left = Math.max(4, Math.min(box.left, width - tooltip.offsetWidth - 4));
    const below = box.bottom + 6 + tooltip.offsetHeight <= window.innerHeight;
    const top = below ? box.bottom + 6 : box.top - tooltip.offsetHeight - 6;
    tooltip.style.left = `${left + window.scrollX}px`;
    tooltip.style.top = `${top + window.scrollY}px`;
  }

  function hideTooltip() {
    tooltip.hidden = true;
  }

  const tokenAt = (event) => event.target.closest && event.target.closest(".tok");

  main.addEventListener("pointerover", (event) => {
    const span = event.pointerType === "mouse" && tokenAt(event);
    if (span) showTooltip(span);
  });
  main.addEventListener("pointerout", (event) => {
    if (event.pointerType === "mouse" && tokenAt(event)) hideTooltip();
  });
  // Touch has no hover: a tap (or click) on a token shows it, anywhere else hides it.
  document.addEventListener("click", (event) => {
    const span = tokenAt(event);
    if (span) showTooltip(span);
    else hideTooltip();
  });

  // ---- start ----------------------------------------------------------------------------

  if (!LAYERS.length) {
    main.replaceChildren(el("p", "empty", "This file has no layers."));
    prev.disabled = next.disabled = select.disabled = true;
    return;
  }
  LAYERS.forEach((layer, i) => select.append(new Option(`Layer ${layer.layer}`, String(i))));
  select.addEventListener("change", () => go(Number(select.value)));
  prev.addEventListener("click", () => go(state.index - 1));
  next.addEventListener("click", () => go(state.index + 1));
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
    if (event.target.closest("input, select, textarea")) return; // they use arrows themselves
    const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    if (!step) return;
    event.preventDefault();
    go(state.index + step);
  });
  window.addEventListener("hashchange", () => show(indexFromHash()));
  show(indexFromHash());
  performance.mark("dashboard-ready");
})();
