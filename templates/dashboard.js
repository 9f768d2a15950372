"use strict";
// Draws the dashboard from the JSON that generate_html_dashboard.py embeds. Only the layer on
// screen is in the DOM, built when it is shown, and a card's collapsed sections are built when
// first opened, so first paint does not grow with the run.
// Text from the data, and from notes (stored or imported), is only ever inserted with
// textContent (or as Text nodes).
(() => {
  const DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
  const STRINGS = DATA.strings;
  const LAYERS = DATA.layers;
  const META = DATA.metadata;
  const WINDOW = META.context_window;
  const NARROW = 3; // the narrow context width, in tokens on each side of the target
  // --store-sequences: example index -> its whole sequence (string ids); its values are known on
  // the kept window only. A very long sequence is cut to WHOLE tokens around the target.
  const SEQUENCES = DATA.sequences || {};
  const WHOLE = 1000;
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
  const state = {
    index: -1,
    statsOpen: false,
    logCounts: false,
    width: WINDOW, // context tokens shown on each side of the target
    cards: [], // the cards on screen, each with what its view and the page's settings redraw
    marks: new Map(), // direction key -> draws a value on that direction's histogram
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Values are embedded already rounded to 4 significant digits: show them as they are.
  const fmt = (v) => (v === null || v === undefined ? "not finite" : String(v));
  const round4 = (v) => Number(v.toPrecision(4)); // for values computed here, and fine edges
  const fmt4 = (v) => String(round4(v));
  const fmtCount = (n) => n.toLocaleString("en-US");
  const hex = (ch) => ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  const finite = (v) => v !== null && v !== undefined;

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

  function tokenText(id, className = "tok-text") {
    const span = el("span", className);
    appendText(span, STRINGS[id]);
    return span;
  }

  // Background alpha is |value| / scale, with scale shared by every token of one view. A value
  // that was NaN or Inf in the run (null here) is drawn grey.
  function paint(node, value, scale) {
    if (!finite(value)) {
      node.classList.add("void");
      return;
    }
    const alpha = Math.min(1, Math.abs(value) / scale);
    node.classList.add(value < 0 ? "neg" : "pos");
    if (alpha > 0.6) node.classList.add("strong");
    node.style.setProperty("--a", alpha.toFixed(3));
  }

  function scaleLegend(low, high) {
    const legend = el("span", "scale");
    legend.append(el("span", "", low), el("span", "scale-bar"), el("span", "", high));
    return legend;
  }

  function scroller(child) {
    const box = el("div", "scroll");
    box.append(child);
    return box;
  }

  // A collapsed section whose content is built the first time it is opened.
  function lazySection(className, title, build) {
    const details = el("details", className);
    details.append(el("summary", "", title));
    details.addEventListener("toggle", () => {
      if (details.open && details.childElementCount === 1) details.append(build());
    });
    return details;
  }

  // ---- directions -----------------------------------------------------------------------

  // Notes and links name a direction the same way in every file of one adapter.
  const directionKey = (layerNumber, module, component) =>
    `L${layerNumber}.${module}[${component}]`;
  const KEY = /^L(-?\d+)\.(.+)\[(\d+)\]$/;

  const maxAbs = (direction) => Math.max(Math.abs(direction.stats.min), direction.stats.max);
  const scaleOf = (direction) => maxAbs(direction) || 1;
  // scaling·‖B‖: |what a direction adds to the residual or hidden state| per unit activation.
  const writeScale = (projection, direction) =>
    direction.write_norm_scale ?? projection.scaling * direction.b_norm;

  function* directions(layer) {
    for (const [module, projection] of Object.entries(layer.projections)) {
      for (const direction of projection.directions) {
        yield {
          module,
          projection,
          direction,
          name: projection.rank > 1 ? `${module}[${direction.component}]` : module,
          key: directionKey(layer.layer, module, direction.component),
        };
      }
    }
  }

  // ---- examples -------------------------------------------------------------------------

  // A context's values embedded as [e, integers in units of 10^-e]: dividing by a power of ten
  // gives back the rounded decimal exactly as written.
  const unfixed = ([e, ...ints]) =>
    ints.map((v) => (v === null ? null : e >= 0 ? v / 10 ** e : v * 10 ** -e));

  // Examples are embedded as rows of DATA.example_fields, without "activation" (it is the
  // activation at the target), their sibling activations in the order of the direction's
  // "siblings": objects are made only for the examples in use.
  function exampleOf(row, direction) {
    const example = Object.fromEntries(DATA.example_fields.map((field, i) => [field, row[i]]));
    example.activations = unfixed(example.activations);
    if (example.sibling_activations) {
      example.sibling_activations = Object.fromEntries(
        direction.siblings.map((m, i) => [m, unfixed(example.sibling_activations[i])]));
    }
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

  // What a card's tokens show: its own activations, or, where the examples carry them, those
  // of the layer's other modules (same component) at the same tokens, and gate × up.
  function cardViews(layer, d, examples) {
    // label: on the switch; tip: in the tooltip; key: the histogram that shows the value.
    const own = {
      label: d.module,
      tip: "activation",
      key: d.key,
      scale: scaleOf(d.direction),
      values: (e) => e.activations,
    };
    const carried = new Set(examples.flatMap((e) => Object.keys(e.sibling_activations || {})));
    const views = [own];
    for (const [module, projection] of Object.entries(layer.projections)) {
      const sibling = projection.directions.find((x) => x.component === d.direction.component);
      if (!carried.has(module) || !sibling) continue;
      views.push({
        label: module,
        tip: module,
        key: directionKey(layer.layer, module, sibling.component),
        scale: scaleOf(sibling),
        values: (e) => e.sibling_activations?.[module] ?? e.tokens.map(() => null),
      });
    }
    const gate = views.find((v) => v.label === "gate_proj");
    const up = views.find((v) => v.label === "up_proj");
    if (gate && up) views.push(productView(gate, up, examples));
    return views;
  }

  // gate_proj and up_proj read the same input and the MLP multiplies what they produce: their
  // product shows where both fire. It has no histogram; colours are relative to its largest
  // |value| in the card.
  function productView(gate, up, examples) {
    const values = (e) => {
      const ups = up.values(e);
      const times = (g, u) => (finite(g) && finite(u) ? round4(g * u) : null);
      return gate.values(e).map((g, j) => times(g, ups[j]));
    };
    const magnitudes = examples.flatMap((e) => values(e).filter(finite).map(Math.abs));
    const scale = Math.max(0, ...magnitudes) || 1;
    return { label: "gate×up", tip: "gate×up", key: null, scale, values };
  }

  function exampleRow(group, view) {
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
    const { tokens, values, first, cut } = shownTokens(example, view.values(example));
    if (first > 0) context.append(el("span", "muted", "… "));
    tokens.forEach((id, i) => {
      const offset = first + i - example.token_index; // from the example's own token
      const span = tokenText(id, "tok");
      if (values[i] === undefined) span.classList.add("unrecorded");
      else paint(span, values[i], view.scale);
      if (offset === 0) span.classList.add("target");
      tokenInfo.set(span, {
        text: STRINGS[id],
        value: values[i],
        view,
        example: example.example_index,
        position: example.token_index + offset,
        offset,
      });
      context.append(span);
    });
    if (cut) context.append(el("span", "muted", " …"));
    row.append(side, context);
    return row;
  }

  // What a row shows at the page's context width: ±NARROW, the kept window, or the whole stored
  // sequence (values undefined outside the window). first: the sequence position of tokens[0].
  function shownTokens(example, values) {
    const start = example.token_index - example.target; // the window's place in its sequence
    const sequence = state.width === Infinity && SEQUENCES[example.example_index];
    if (sequence) {
      const first = Math.max(0, example.token_index - WHOLE / 2);
      const tokens = sequence.slice(first, first + WHOLE);
      const known = (p) => (p >= 0 && p < values.length ? values[p] : undefined);
      return {
        tokens, first, cut: first + tokens.length < sequence.length,
        values: tokens.map((_, i) => known(first + i - start)),
      };
    }
    const lo = state.width >= WINDOW ? 0 : Math.max(0, example.target - state.width);
    const hi = state.width >= WINDOW
      ? example.tokens.length : Math.min(example.tokens.length, example.target + state.width + 1);
    return {
      tokens: example.tokens.slice(lo, hi), values: values.slice(lo, hi), first: start + lo,
      cut: false,
    };
  }

  // Drawn in its card's view and the page's context width; registered with the card, so that
  // switching either redraws it.
  function exampleList(examples, card) {
    const list = el("ol", "example-list");
    const groups = groupRepeats(examples);
    const draw = () => list.replaceChildren(...groups.map((group) => exampleRow(group, card.view)));
    card.redraws.push(draw);
    draw();
    return list;
  }

  const examplesOrNone = (examples, card) =>
    examples.length ? exampleList(examples, card) : el("p", "empty", "none");

  function exampleSection(title, examples, card, sign) {
    const section = el("div", `examples ${sign}`);
    section.append(el("h4", "", `${title} (${examples.length})`), examplesOrNone(examples, card));
    return section;
  }

  // ---- a direction's card ---------------------------------------------------------------

  function directionCard(layer, d) {
    const { projection, direction } = d;
    const toExample = (row) => exampleOf(row, direction);
    const positive = direction.top_positive.map(toExample);
    const negative = direction.top_negative.map(toExample);
    const samples = (direction.quantile_samples || []).map((s) => ({
      ...s, examples: s.examples.map(toExample),
    }));
    const sampled = samples.flatMap((s) => s.examples);
    const views = cardViews(layer, d, [...positive, ...negative, ...sampled]);
    const card = { view: views[0], redraws: [] }; // redraws: what a view or setting changes
    state.cards.push(card);

    const node = el("section", "card");
    node.dataset.key = d.key;
    const head = el("header", "card-head");
    const title = el("div", "card-title");
    const legend = el("span");
    title.append(el("h3", "", d.name), legend, starButton(d.key));
    const meta = el(
      "div",
      "card-meta",
      `reads ${projection.read_site} · scaling ${fmt(projection.scaling)} · ` +
        `‖A‖ ${fmt(direction.a_norm)} · ‖B‖ ${fmt(direction.b_norm)} · ` +
        `write scale ${fmt4(writeScale(projection, direction))}`,
    );
    const nonfinite = direction.stats.nonfinite;
    if (nonfinite > 0) {
      meta.append(" · ", el("span", "warn", `${fmtCount(nonfinite)} non-finite left out`));
    }
    head.append(title, meta, noteBox(d.key));

    const showView = (view) => {
      card.view = view;
      const scale = fmt(round4(view.scale));
      legend.replaceChildren(scaleLegend(`−${scale}`, `+${scale}`));
      legend.title = `colour scale of ${view.label}`;
      redraw(card);
    };
    if (views.length > 1) head.append(viewSwitch(views, showView));
    showView(card.view);

    node.append(
      head,
      cardHistogram(d, card),
      exampleSection("Top positive", positive, card, "pos"),
      exampleSection("Top negative", negative, card, "neg"),
      ...moreSections(direction, samples, card),
    );
    return node;
  }

  function viewSwitch(views, showView) {
    const group = el("div", "seg views");
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", "Tokens show the activations of");
    const items = views.map((view) => ({
      label: view.label, title: `${view.key || "gate × up"} at these tokens`, value: view,
    }));
    choice(group, items, views[0], showView);
    return group;
  }

  // Buttons of which one is on (a card's view, the context width): `pick` gets its value.
  function choice(group, items, current, pick) {
    const buttons = items.map(({ label, title, value }) => {
      const button = el("button", "", label);
      button.type = "button";
      button.title = title;
      button.setAttribute("aria-pressed", String(value === current));
      button.addEventListener("click", () => {
        for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
        pick(value);
      });
      return button;
    });
    group.append(...buttons);
  }

  function cardHistogram(d, card) {
    const figure = el("figure", "card-hist");
    const draw = () => {
      const { root, mark } = histogram(d.direction.histogram, state.logCounts);
      state.marks.set(d.key, mark);
      figure.replaceChildren(root);
    };
    card.redraws.push(draw);
    draw();
    return figure;
  }

  const redraw = (card) => card.redraws.forEach((draw) => draw());

  function moreSections(direction, samples, card) {
    const sections = [];
    const add = (title, build) => sections.push(lazySection("more", title, build));
    if (samples.length) add("Quantile samples", () => quantileSamples(samples, card));
    if (direction.top_tokens || direction.bottom_tokens) {
      add("Top and bottom tokens", () => tokenTables(direction));
    }
    if (direction.logit_effects) add("Logit effects", () => logitEffects(direction.logit_effects));
    if (direction.position_profile) {
      add("Position profile", () => positionProfile(direction.position_profile));
    }
    return sections;
  }

  function quantileSamples(samples, card) {
    const box = el("div", "quantiles");
    for (const { quantile_range: [q0, q1], value_range: [lo, hi], examples } of samples) {
      const heading = el("h5", "", `quantiles ${q0}–${q1} · values ${lo} … ${hi}`);
      box.append(heading, examplesOrNone(examples, card));
    }
    return box;
  }

  function valueTable(caption, columns, rows) {
    const table = el("table", "value-table");
    table.createCaption().textContent = caption;
    const head = table.createTHead().insertRow();
    for (const label of columns) head.append(el("th", "", label));
    const body = table.createTBody();
    for (const cells of rows) body.insertRow().append(...cells);
    return table;
  }

  function numberCell(value, scale) {
    const cell = el("td", "", fmt(value));
    if (scale) paint(cell, value, scale);
    return cell;
  }

  function tokenCell(id) {
    const cell = el("th");
    cell.append(tokenText(id));
    return cell;
  }

  function tokenTables(direction) {
    const scale = scaleOf(direction);
    const table = (caption, rows) => valueTable(
      caption,
      ["token", "count", "mean", "min", "max"],
      (rows || []).map((r) => [
        tokenCell(r.token), numberCell(fmtCount(r.count)), numberCell(r.mean, scale),
        numberCell(r.min), numberCell(r.max),
      ]),
    );
    const box = el("div", "pair");
    const minCount = META.min_token_count ? `, seen ≥ ${META.min_token_count}×` : "";
    box.append(
      scroller(table(`highest mean${minCount}`, direction.top_tokens)),
      scroller(table(`lowest mean${minCount}`, direction.bottom_tokens)),
    );
    return box;
  }

  function logitEffects(effects) {
    const values = [...effects.top, ...effects.bottom].map((e) => Math.abs(e.value));
    const scale = Math.max(0, ...values) || 1;
    const table = (caption, rows) => valueTable(
      caption,
      ["token", "logit"],
      rows.map((e) => [tokenCell(e.token), numberCell(e.value, scale)]),
    );
    const box = el("div", "pair");
    box.append(table("raises", effects.top), table("lowers", effects.bottom));
    return box;
  }

  // ---- plots ----------------------------------------------------------------------------

  // An SVG plot: its root, the inner box, and helpers for labels and lines.
  function plotFrame(className, width, height, [left, right, top, bottom]) {
    const viewBox = `0 0 ${width} ${height}`;
    const root = svg("svg", { viewBox, class: `plot ${className}`, role: "img" });
    const box = {
      left, top, right: width - right, bottom: height - bottom,
      width: width - left - right, height: height - top - bottom,
    };
    const label = (text, x, y, anchor, attrs = {}) =>
      root.append(svg("text", { x, y, "text-anchor": anchor, ...attrs }, text));
    const line = (x1, y1, x2, y2, cls) => root.append(svg("line", { x1, y1, x2, y2, class: cls }));
    const yTitle = (text) =>
      label(text, -(box.top + box.height / 2), 10, "middle", { transform: "rotate(-90)" });
    return { root, box, label, line, yTitle };
  }

  // The histogram, and `mark(value)`, which draws a value as a line on it (null: none).
  function histogram(hist, logCounts) {
    const plot = plotFrame("hist", 320, 120, [44, 10, 8, 28]);
    const { box, label, line } = plot;
    const { edges, counts } = hist;
    const lo = edges[0];
    const hi = edges[edges.length - 1];
    const x = (v) => box.left + ((v - lo) / (hi - lo || 1)) * box.width;
    const f = logCounts ? (c) => Math.log10(1 + c) : (c) => c;
    const top = Math.max(...counts.map(f)) || 1;
    counts.forEach((count, i) => {
      if (!count) return;
      const h = Math.max((f(count) / top) * box.height, 0.5);
      const center = (edges[i] + edges[i + 1]) / 2;
      const bar = svg("rect", {
        x: x(edges[i]),
        y: box.bottom - h,
        width: Math.max(x(edges[i + 1]) - x(edges[i]) - 0.4, 0.6),
        height: h,
        class: center < 0 ? "bar neg" : "bar pos",
      });
      const range = `[${fmt4(edges[i])}, ${fmt4(edges[i + 1])})`;
      bar.append(svg("title", {}, `${range}: ${fmtCount(count)}`));
      plot.root.append(bar);
    });
    line(box.left, box.bottom, box.right, box.bottom, "axis");
    line(box.left, box.top, box.left, box.bottom, "axis");
    if (lo < 0 && hi > 0) {
      line(x(0), box.top, x(0), box.bottom + 4, "zero");
      const clear = 28; // px: "0" where it does not run into the end labels
      if (x(0) - box.left > clear && box.right - x(0) > clear) {
        label("0", x(0), box.bottom + 13, "middle");
      }
    }
    label(fmt4(lo), box.left, box.bottom + 13, "start");
    label(fmt4(hi), box.right, box.bottom + 13, "end");
    label("activation", box.left + box.width / 2, box.bottom + 26, "middle");
    label(logCounts ? `10^${top.toFixed(1)}` : fmtCount(top), box.left - 4, box.top + 8, "end");
    label("0", box.left - 4, box.bottom, "end");
    label(logCounts ? "log n" : "count", box.left - 4, box.top + box.height / 2, "end");
    const marker = svg("line", { y1: box.top, y2: box.bottom, class: "marker" });
    plot.root.append(marker);
    const mark = (value) => {
      const shown = finite(value);
      if (shown) {
        const at = Math.min(box.right, Math.max(box.left, x(value)));
        marker.setAttribute("x1", at);
        marker.setAttribute("x2", at);
      }
      marker.setAttribute("visibility", shown ? "visible" : "hidden");
    };
    mark(null);
    return { root: plot.root, mark };
  }

  // Mean activation by token position: equal widths for the power-of-two buckets, a gap where
  // a bucket holds no token.
  function positionProfile({ edges, mean, count }) {
    const plot = plotFrame("profile", 320, 130, [48, 10, 8, 32]);
    const { box, label, line } = plot;
    const values = mean.filter(finite);
    const lo = Math.min(0, ...values);
    const hi = Math.max(0, ...values);
    const step = box.width / mean.length;
    const x = (i) => box.left + i * step;
    const y = (v) => box.top + ((hi - v) / (hi - lo || 1)) * box.height;
    let path = "";
    mean.forEach((v, i) => {
      if (!finite(v)) return;
      path += `${finite(mean[i - 1]) ? "L" : "M"}${x(i + 0.5)},${y(v)}`;
      const sign = v < 0 ? "neg" : "pos";
      const point = svg("circle", { cx: x(i + 0.5), cy: y(v), r: 2.2, class: sign });
      const tokens = count ? `, ${fmtCount(count[i])} tokens` : "";
      const positions = `positions ${edges[i]}–${edges[i + 1] - 1}`;
      point.append(svg("title", {}, `${positions}: mean ${fmt(v)}${tokens}`));
      plot.root.append(point);
    });
    plot.root.prepend(svg("path", { d: path, class: "trace" }));
    line(box.left, box.top, box.left, box.bottom, "axis");
    line(box.left, box.bottom, box.right, box.bottom, "axis");
    line(box.left, y(0), box.right, y(0), "zero");
    const every = Math.ceil(edges.length / 8); // so that the position labels do not overlap
    edges.forEach((edge, i) => {
      if (i % every === 0) label(String(edge), x(i), box.bottom + 12, "middle");
    });
    label(fmt4(hi), box.left - 4, box.top + 8, "end");
    label(fmt4(lo), box.left - 4, box.bottom, "end");
    label("token position", box.left + box.width / 2, box.bottom + 28, "middle");
    plot.yTitle("mean activation");
    return plot.root;
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
    for (const { name, projection, direction } of directions(layer)) {
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

  function statsSection(layer) {
    const details = el("details", "stats");
    details.open = state.statsOpen;
    details.addEventListener("toggle", () => {
      state.statsOpen = details.open;
    });
    details.append(
      el("summary", "", `Statistics for layer ${layer.layer}`),
      statsTable(layer),
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
    state.cards = [];
    state.marks.clear();
    const grid = el("div", "modules");
    for (const d of directions(layer)) grid.append(directionCard(layer, d));
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
    for (const cell of heatmapBox.querySelectorAll(".cell")) {
      cell.classList.toggle("current", Number(cell.dataset.index) === index);
    }
    renderLayer(LAYERS[index]);
  }

  function indexFromHash() {
    const match = /^#layer-(-?\d+)$/.exec(location.hash);
    const index = match ? layerIndex(Number(match[1])) : -1;
    return Math.max(index, 0);
  }

  const layerIndex = (number) => LAYERS.findIndex((layer) => layer.layer === number);

  // Controls show the layer at once (hashchange comes later, and keys can repeat faster)
  // and record it in the hash, so that links, reloads and the back button agree with it.
  function go(index) {
    if (index < 0 || index >= LAYERS.length) return;
    show(index);
    location.hash = `layer-${LAYERS[index].layer}`;
  }

  // Shows the layer of a direction key and brings its card into view, outlined.
  function openDirection(key) {
    const match = KEY.exec(key);
    const index = match ? layerIndex(Number(match[1])) : -1;
    if (index < 0) return;
    go(index);
    for (const card of main.querySelectorAll(".card")) {
      card.classList.toggle("opened", card.dataset.key === key);
      if (card.dataset.key === key) card.scrollIntoView({ block: "start" });
    }
  }

  // A link to a direction: a real link to its layer, which opens the card itself.
  function directionLink(key, text) {
    const link = el("a", "direction-link", text);
    const match = KEY.exec(key);
    if (match) link.href = `#layer-${match[1]}`;
    link.dataset.open = key;
    return link;
  }

  // Heatmap cells and links carry the key of the direction they open.
  document.addEventListener("click", (event) => {
    const opener = event.target.closest && event.target.closest("[data-open]");
    if (!opener) return;
    event.preventDefault();
    openDirection(opener.dataset.open);
  });

  // ---- tooltip --------------------------------------------------------------------------

  const tooltip = document.getElementById("tooltip");

  // rows: [label, text] pairs; placed under (or above) `box`, in page coordinates, so that it
  // scrolls along with what it describes.
  function showTooltip(box, rows) {
    tooltip.replaceChildren(...rows.map(([label, text]) => {
      const row = el("div");
      row.append(el("span", "tip-label", label), el("span", "tip-value", text));
      return row;
    }));
    tooltip.hidden = false;
    const width = document.documentElement.clientWidth;
    const left = Math.max(4, Math.min(box.left, width - tooltip.offsetWidth - 4));
    const below = box.bottom + 6 + tooltip.offsetHeight <= window.innerHeight;
    const top = below ? box.bottom + 6 : box.top - tooltip.offsetHeight - 6;
    tooltip.style.left = `${left + window.scrollX}px`;
    tooltip.style.top = `${top + window.scrollY}px`;
  }

  function showTokenTooltip(span) {
    const info = tokenInfo.get(span);
    const offset = info.offset === 0 ? "target" : `${info.offset > 0 ? "+" : ""}${info.offset}`;
    showTooltip(span.getBoundingClientRect(), [
      ["token", escaped(info.text)],
      [info.view.tip, info.value === undefined ? "not kept (outside the window)" : fmt(info.value)],
      ["position", `example ${info.example}, token ${info.position} (${offset})`],
    ]);
    markHistograms(info.view.key, info.value);
  }

  function markHistograms(key, value) {
    for (const [k, mark] of state.marks) mark(k === key ? value : null);
  }

  function hideTooltip() {
    tooltip.hidden = true;
    markHistograms(null, null);
  }

  const tokenAt = (event) => event.target.closest && event.target.closest(".tok");

  main.addEventListener("pointerover", (event) => {
    const span = event.pointerType === "mouse" && tokenAt(event);
    if (span) showTokenTooltip(span);
  });
  main.addEventListener("pointerout", (event) => {
    if (event.pointerType === "mouse" && tokenAt(event)) hideTooltip();
  });
  // Touch has no hover: a tap (or click) on a token shows it, anywhere else hides it.
  document.addEventListener("click", (event) => {
    const span = tokenAt(event);
    if (span) showTokenTooltip(span);
    else hideTooltip();
  });

  // ---- overview: heatmap of every layer and module --------------------------------------

  const heatmapBox = document.getElementById("heatmap");
  const metricSelect = document.getElementById("heat-metric");
  const METRICS = [
    ["max |activation|", (d) => maxAbs(d.direction)],
    ["std", (d) => d.direction.stats.std],
    ["write magnitude", (d) => maxAbs(d.direction) * writeScale(d.projection, d.direction)],
  ];

  // Directions as rows (in module order), layers as columns; the colour is the metric over
  // its largest value in the whole run.
  function drawHeatmap(metric) {
    const [label, measure] = METRICS[metric];
    const columns = LAYERS.map((layer, index) => new Map(
      [...directions(layer)].map((d) => [d.name, { index, key: d.key, value: measure(d) }]),
    ));
    const names = [...new Set(columns.flatMap((cells) => [...cells.keys()]))];
    const values = columns.flatMap((cells) => [...cells.values()].map((c) => c.value));
    const largest = Math.max(0, ...values) || 1;
    const every = Math.ceil(LAYERS.length / 16); // layer numbers that fit above the columns
    heatmapBox.style.setProperty("--columns", String(LAYERS.length));
    const header = [
      el("span", "corner", "layer"),
      ...LAYERS.map((layer, i) => el("span", "col-label", i % every ? "" : String(layer.layer))),
    ];
    const rows = names.flatMap((name) => [
      el("span", "row-label", name),
      ...columns.map((cells, i) => {
        const cell = cells.get(name);
        if (!cell) return el("span", "cell none");
        const button = el("button", "cell");
        button.type = "button";
        button.dataset.index = String(cell.index);
        button.dataset.open = cell.key;
        button.classList.toggle("current", cell.index === state.index);
        button.title = `layer ${LAYERS[i].layer} ${name}: ${label} ${fmt4(cell.value)}`;
        button.style.setProperty("--a", (cell.value / largest).toFixed(3));
        return button;
      }),
    ]);
    heatmapBox.replaceChildren(...header, ...rows);
  }

  // ---- overview: cross-layer cosines ----------------------------------------------------

  const rgbOf = (name) =>
    getComputedStyle(document.documentElement).getPropertyValue(name).split(",").map(Number);

  // The matrix as an image, one pixel a cell: cheaper than tens of thousands of elements.
  function cosineImage(matrix) {
    const n = matrix.length;
    const canvas = el("canvas");
    canvas.width = canvas.height = n;
    const context = canvas.getContext("2d");
    const image = context.createImageData(n, n);
    const [pos, neg] = [rgbOf("--pos-rgb"), rgbOf("--neg-rgb")];
    matrix.forEach((row, i) => row.forEach((v, j) => {
      const at = 4 * (i * n + j);
      image.data.set([...(v < 0 ? neg : pos), Math.round(Math.min(1, Math.abs(v)) * 255)], at);
    }));
    context.putImageData(image, 0, 0);
    return canvas.toDataURL("image/png");
  }

  // Labels are "L12.gate_proj.A[0]": one tick per layer, named where the names fit.
  function crossLayerCosine({ labels, matrix }) {
    const size = 360;
    const plot = plotFrame("cross", size + 60, size + 44, [50, 10, 6, 38]);
    const { box, label, line } = plot;
    const cell = size / labels.length;
    plot.root.append(svg("image", {
      href: cosineImage(matrix), x: box.left, y: box.top, width: size, height: size,
      preserveAspectRatio: "none",
    }));
    const layerOf = (l) => l.split(".")[0];
    const startsLayer = (i) => i === 0 || layerOf(labels[i]) !== layerOf(labels[i - 1]);
    const starts = [...labels.keys()].filter(startsLayer);
    const every = Math.ceil(starts.length / 16);
    starts.forEach((start, n) => {
      const at = start * cell;
      line(box.left + at, box.bottom, box.left + at, box.bottom + 3, "axis");
      line(box.left - 3, box.top + at, box.left, box.top + at, "axis");
      if (n % every) return;
      const name = layerOf(labels[start]);
      label(name, box.left + at, box.bottom + 13, "start", { class: "tick" });
      label(name, box.left - 4, box.top + at + 8, "end", { class: "tick" });
    });
    const axis = "read (A) and write (B) vectors, by layer";
    label(axis, box.left + size / 2, box.bottom + 32, "middle");
    plot.yTitle(axis);

    // Hover a cell for its two vectors; click it to open the row's direction.
    const cellAt = (event) => {
      const rect = plot.root.querySelector("image").getBoundingClientRect();
      const i = Math.floor(((event.clientY - rect.top) / rect.height) * labels.length);
      const j = Math.floor(((event.clientX - rect.left) / rect.width) * labels.length);
      return i >= 0 && j >= 0 && i < labels.length && j < labels.length ? [i, j] : null;
    };
    plot.root.addEventListener("pointermove", (event) => {
      const at = cellAt(event);
      if (!at) return hideTooltip();
      const [i, j] = at;
      const pointer = { left: event.clientX + 8, top: event.clientY, bottom: event.clientY + 8 };
      const rows = [["row", labels[i]], ["column", labels[j]], ["cosine", fmt(matrix[i][j])]];
      showTooltip(pointer, rows);
    });
    plot.root.addEventListener("pointerleave", hideTooltip);
    plot.root.addEventListener("click", (event) => {
      const at = cellAt(event);
      const vector = at && /^(L-?\d+\.[^.]+)\.[AB](\[\d+\])$/.exec(labels[at[0]]);
      if (vector) openDirection(vector[1] + vector[2]);
    });
    const figure = el("figure", "cross-figure");
    const caption = el("figcaption", "", "cosine of every pair of residual-stream vectors ");
    caption.append(scaleLegend("−1", "+1"));
    figure.append(caption, plot.root);
    return figure;
  }

  // ---- overview: search -----------------------------------------------------------------

  const searchInput = document.getElementById("search");
  const results = document.getElementById("search-results");
  const SHOWN_DIRECTIONS = 50;
  const SHOWN_VALUES = 8;

  function* exampleRows(direction) {
    yield* direction.top_positive;
    yield* direction.top_negative;
    for (const samples of direction.quantile_samples || []) yield* samples.examples;
  }

  // Every direction whose examples (top lists and quantile samples) contain the token, with
  // the activations at its occurrences. A token matches when it equals the query, case and
  // surrounding whitespace aside (" Wait" is found by "wait").
  function findToken(query) {
    const wanted = query.trim().toLowerCase();
    const ids = new Set();
    STRINGS.forEach((text, id) => {
      if (text.trim().toLowerCase() === wanted) ids.add(id);
    });
    const found = [];
    for (const layer of LAYERS) {
      for (const d of directions(layer)) {
        const hits = [];
        const examples = [...exampleRows(d.direction)].map((row) => exampleOf(row, d.direction));
        for (const example of examples) {
          example.tokens.forEach((id, j) => {
            if (!ids.has(id)) return;
            hits.push({ value: example.activations[j], target: j === example.target });
          });
        }
        if (hits.length) found.push({ layer, d, hits });
      }
    }
    const strongest = (hits) => Math.max(...hits.map((h) => Math.abs(h.value ?? 0)));
    return found.sort((a, b) => strongest(b.hits) - strongest(a.hits));
  }

  function showResults() {
    const query = searchInput.value;
    if (!query.trim()) return results.replaceChildren();
    const found = findToken(query);
    const total = found.reduce((n, f) => n + f.hits.length, 0);
    const summary = found.length
      ? `${fmtCount(total)} occurrences in ${found.length} directions` +
        (found.length > SHOWN_DIRECTIONS ? `; the ${SHOWN_DIRECTIONS} strongest:` : ":")
      : "not in any example of this file";
    const list = el("ul", "result-list");
    for (const { layer, d, hits } of found.slice(0, SHOWN_DIRECTIONS)) {
      const item = el("li");
      item.append(
        directionLink(d.key, `layer ${layer.layer} ${d.name}`),
        el("span", "hits muted", ` ×${hits.length}`),
      );
      hits.sort((a, b) => Math.abs(b.value ?? 0) - Math.abs(a.value ?? 0));
      for (const hit of hits.slice(0, SHOWN_VALUES)) {
        const chip = el("span", hit.target ? "chip target" : "chip", fmt(hit.value));
        paint(chip, hit.value, scaleOf(d.direction));
        item.append(" ", chip);
      }
      if (hits.length > SHOWN_VALUES) item.append(" …");
      list.append(item);
    }
    results.replaceChildren(el("p", "muted", summary), list);
  }

  // ---- notes ----------------------------------------------------------------------------

  // One store per adapter: the keys (L12.gate_proj[0]) name the same directions in every file
  // of that adapter, so notes follow a re-run.
  const NOTES_STORE = `lora-dashboard-notes:${META.adapter}`;
  const notesCount = document.getElementById("notes-count");
  const notesStatus = document.getElementById("notes-status");
  const notesList = document.getElementById("notes-list");
  const notes = readNotes();

  // Only {text: string, star: boolean} entries survive: stored and imported notes are untrusted
  // input like the data.
  function validNotes(object) {
    const valid = new Map();
    if (!object || typeof object !== "object") return valid;
    for (const [key, note] of Object.entries(object)) {
      const text = typeof note?.text === "string" ? note.text : "";
      const star = note?.star === true;
      if (text || star) valid.set(key, { text, star });
    }
    return valid;
  }

  function readNotes() {
    try {
      return validNotes(JSON.parse(localStorage.getItem(NOTES_STORE)));
    } catch {
      return new Map(); // storage disabled, or not JSON
    }
  }

  function writeNotes() {
    try {
      localStorage.setItem(NOTES_STORE, JSON.stringify(Object.fromEntries(notes)));
    } catch {
      notesStatus.textContent = "this browser does not keep notes here: export them";
    }
    listNotes();
  }

  function setNote(key, change) {
    const note = { text: "", star: false, ...notes.get(key), ...change };
    if (note.text || note.star) notes.set(key, note);
    else notes.delete(key);
    writeNotes();
  }

  function listNotes() {
    notesCount.textContent = `${notes.size} ${notes.size === 1 ? "note" : "notes"}`;
    const keys = [...notes.keys()].sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
    notesList.replaceChildren(...keys.map((key) => {
      const { text, star } = notes.get(key);
      const item = el("li");
      item.append(star ? "★ " : "", directionLink(key, key), " ", el("span", "note-text", text));
      return item;
    }));
  }

  function starButton(key) {
    const button = el("button", "star");
    button.type = "button";
    const draw = () => {
      const starred = Boolean(notes.get(key)?.star);
      button.textContent = starred ? "★" : "☆";
      button.setAttribute("aria-pressed", String(starred));
      button.title = starred ? "starred: click to unstar" : "star this direction";
    };
    button.addEventListener("click", () => {
      setNote(key, { star: !notes.get(key)?.star });
      draw();
    });
    draw();
    return button;
  }

  function noteBox(key) {
    const box = el("textarea", "note");
    box.rows = 1;
    box.placeholder = "Your interpretation of this direction…";
    box.setAttribute("aria-label", `interpretation of ${key}`);
    box.value = notes.get(key)?.text || "";
    box.addEventListener("input", () => setNote(key, { text: box.value }));
    return box;
  }

  // A file a team can share: the page's adapter, and every note by key.
  function exportNotes() {
    const file = {
      adapter: META.adapter,
      base_model: META.base_model,
      exported_at: new Date().toISOString(),
      notes: Object.fromEntries(notes),
    };
    const link = el("a");
    const blob = new Blob([JSON.stringify(file, null, 2)], { type: "application/json" });
    link.href = URL.createObjectURL(blob);
    link.download = `lora-notes-${String(META.adapter).replace(/[^\w.-]+/g, "_")}.json`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  // Imported notes replace those of the same direction; the others stay.
  async function importNotes(file) {
    let imported;
    try {
      imported = JSON.parse(await file.text());
    } catch {
      notesStatus.textContent = `${file.name}: not a JSON file`;
      return;
    }
    const incoming = validNotes(imported?.notes);
    for (const [key, note] of incoming) notes.set(key, note);
    writeNotes();
    renderLayer(LAYERS[state.index]); // its cards show the imported notes
    const adapter = imported?.adapter;
    const other = adapter && adapter !== META.adapter ? ` (written for ${adapter})` : "";
    notesStatus.textContent = `imported ${incoming.size} notes from ${file.name}${other}`;
  }

  // ---- page-wide controls ---------------------------------------------------------------

  function contextWidthSwitch() {
    const box = document.getElementById("context-width");
    if (!(WINDOW > NARROW) && !Object.keys(SEQUENCES).length) return box.remove(); // one width
    box.append(el("span", "muted", "context"));
    const widths = [...new Set([Math.min(NARROW, WINDOW), WINDOW])].map((width) => ({
      label: `±${width}`,
      title: `${width} tokens on each side of the example's own token`,
      value: width,
    }));
    if (Object.keys(SEQUENCES).length) {
      widths.push({
        label: "whole",
        title: `the example's whole sequence (up to ${WHOLE} tokens around its own token), ` +
          "coloured where values were kept",
        value: Infinity,
      });
    }
    choice(box, widths, state.width, (width) => {
      state.width = width;
      state.cards.forEach(redraw);
    });
  }

  function logCountsSwitch() {
    const check = document.getElementById("log-counts");
    check.addEventListener("change", () => {
      state.logCounts = check.checked;
      state.cards.forEach(redraw);
    });
  }

  // The full matrix from its upper triangle above the diagonal (ones on it), as embedded.
  const symmetric = (upper) => upper.map((_, i) => upper.map((__, j) =>
    i === j ? 1 : i < j ? upper[i][j - i - 1] : upper[j][i - j - 1]));

  function crossLayerSection() {
    const cosine = DATA.cross_layer_cosine;
    if (!cosine) return;
    const title = `Cross-layer cosines (${cosine.labels.length} vectors)`;
    const draw = () => crossLayerCosine({ labels: cosine.labels, matrix: symmetric(cosine.upper) });
    const section = lazySection("panel cross-layer", title, draw);
    document.getElementById("overview").append(section);
  }

  // ---- start ----------------------------------------------------------------------------

  if (!LAYERS.length) {
    main.replaceChildren(el("p", "empty", "This file has no layers."));
    prev.disabled = next.disabled = select.disabled = true;
    return;
  }
  METRICS.forEach(([label], i) => metricSelect.append(new Option(label, String(i))));
  metricSelect.addEventListener("change", () => drawHeatmap(Number(metricSelect.value)));
  drawHeatmap(0);
  crossLayerSection();
  searchInput.addEventListener("input", showResults);
  document.getElementById("notes-export").addEventListener("click", exportNotes);
  const importInput = document.getElementById("notes-import");
  importInput.addEventListener("change", () => {
    if (importInput.files.length) importNotes(importInput.files[0]);
    importInput.value = ""; // the same file can be imported again
  });
  listNotes();
  contextWidthSwitch();
  logCountsSwitch();

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
