// The causal effects of a run with --effects: pure helpers (the module × layer grid, ranks,
// where a pinned continuation departs from the plain one) and the "Effects" section.
/* global Dom, Format */
/* exported Effects */
const Effects = (() => {
  const { el, svg } = Dom;
  const { fmt, fmt4, fmtCount, moduleOf } = Format;
  // The measures of each direction, as the overview and the cards name them.
  const MEASURES = {
    ablation_kl: "ablation KL",
    ablation_dloss: "ablation Δloss",
    attribution: "attribution",
  };
  const SPEARMAN = "how far the one-backward attribution estimate orders directions as the " +
    "measured ablation Δloss does (1: the same order)";

  // The reference study's figure: rows `modules`, columns the overview's layers; a cell is the
  // sum of `measure` over the module's components in that layer ({value, key: its largest
  // component's, components}), or null where the layer does not adapt the module.
  function grid(overview, modules, measure) {
    return modules.map((module) => overview.map((layer) => {
      const parts = layer.directions.filter((d) => moduleOf(d.name) === module);
      if (!parts.length) return null;
      const largest = parts.reduce((a, b) => (b[measure] > a[measure] ? b : a));
      const value = parts.reduce((sum, d) => sum + d[measure], 0);
      return { value, key: largest.key, components: parts.length };
    }));
  }

  // Each direction's rank by `measure` among all directions of the overview, largest first:
  // 1 + the number of directions with a larger value (ties share a rank).
  function ranks(overview, measure) {
    const values = overview.flatMap((layer) => layer.directions.map((d) => [d.key, d[measure]]));
    const sorted = values.map(([, v]) => v).sort((a, b) => b - a);
    const first = new Map(); // value -> its first place in `sorted`
    sorted.forEach((v, i) => first.has(v) || first.set(v, i));
    const rank = new Map(values.map(([key, v]) => [key, first.get(v) + 1]));
    return { rank, total: values.length };
  }

  // Where a continuation first departs from the plain one (`reference`), both token id lists:
  // the first index at which they differ, or the length of `tokens` where it is `reference`
  // or a prefix of it (nothing to mark).
  function divergence(tokens, reference) {
    const i = tokens.findIndex((t, j) => t !== reference[j]);
    return i < 0 ? tokens.length : i;
  }

  // ---- the section --------------------------------------------------------------------

  // effects: the index's effects; overview: per layer its directions' scalars; strings: the
  // token table; store: the page's blobs; tooltip: Tooltip.create's; busy(work): marks the
  // page loading while `work` runs; inCards(): colours those rows by KL in the cards' whole
  // sequences. Elements with a data-tip show their tip on hover.
  function section({ effects, overview, metadata, strings }, store, tooltip, busy, inCards) {
    const tips = new WeakMap(); // element -> its tooltip rows
    const box = el("section", "effects");
    box.id = "effects";
    box.setAttribute("aria-label", "Effects");
    const tipped = (node, rows) => {
      node.dataset.tip = "";
      tips.set(node, rows);
      return node;
    };
    const showTip = (event) => {
      const node = event.target.closest && event.target.closest("[data-tip]");
      if (node && tips.has(node)) tooltip.show(node.getBoundingClientRect(), tips.get(node));
    };
    box.addEventListener("pointerover", showTip);
    box.addEventListener("click", showTip);
    box.addEventListener("pointerout", (event) => {
      if (event.target.closest && event.target.closest("[data-tip]")) tooltip.hide();
    });

    box.append(
      el("h2", "", "Effects"),
      el("p", "muted", `On the first ${fmtCount(effects.num_examples)} rows ` +
        `(${fmtCount(effects.num_tokens)} positions, each cut to ${effects.max_length} tokens). ` +
        "Ablating a direction removes its whole contribution at every position; KL in nats, " +
        "Δloss = CE ablated − CE full (positive: the direction lowers the loss)."),
      headline(effects),
      moduleLayerGrid(overview, metadata.modules, tipped),
      barCharts(effects, tipped),
      klRows(effects, strings, store, tipped, busy, inCards),
    );
    return box;
  }

  function headline(effects) {
    const list = el("dl", "meta headline");
    const spearman = effects.attribution_spearman;
    const items = [
      ["KL(adapted ‖ base)", fmt(effects.kl_vs_base)],
      ["rows", fmtCount(effects.num_examples)],
      ["positions", fmtCount(effects.num_tokens)],
      ["attribution ~ Δloss (Spearman)", spearman === null ? "—" : fmt(spearman)],
    ];
    for (const [label, value] of items) {
      const item = el("div");
      item.append(el("dt", "", label), el("dd", "", value));
      list.append(item);
    }
    const box = el("div");
    box.append(list, el("p", "muted", `Spearman: ${SPEARMAN}.`));
    return box;
  }

  function moduleLayerGrid(overview, modules, tipped) {
    const figure = el("figure", "effects-figure");
    figure.append(el("figcaption", "", "ablation KL by module and layer (a cell: its module's " +
      "directions in that layer, summed over components; a cell opens its largest direction)"));
    const cells = grid(overview, modules, "ablation_kl");
    const largest = Math.max(0, ...cells.flat().filter(Boolean).map((c) => c.value)) || 1;
    const map = el("div", "heatmap effects-grid");
    map.style.setProperty("--columns", String(overview.length));
    const every = Math.ceil(overview.length / 16);
    map.append(
      el("span", "corner", "layer"),
      ...overview.map((layer, i) => el("span", "col-label", i % every ? "" : String(layer.layer))),
    );
    modules.forEach((module, m) => {
      map.append(el("span", "row-label", module));
      cells[m].forEach((cell, i) => {
        if (!cell) return map.append(el("span", "cell none"));
        const button = el("button", "cell");
        button.type = "button";
        button.dataset.open = cell.key;
        button.style.setProperty("--a", (cell.value / largest).toFixed(3));
        const summed = cell.components > 1 ? ` (${cell.components} components)` : "";
        map.append(tipped(button, [
          ["cell", `layer ${overview[i].layer} ${module}`],
          ["ablation KL", fmt4(cell.value) + summed],
        ]));
      });
    });
    figure.append(map);
    return figure;
  }

  // Bar charts of the group ablations, per layer and per module, of one measure at a time.
  function barCharts(effects, tipped) {
    const box = el("div", "effects-bars");
    const switcher = el("span", "seg");
    switcher.setAttribute("role", "group");
    switcher.setAttribute("aria-label", "Bars show");
    const charts = el("div", "pair");
    const draw = (measure) => charts.replaceChildren(
      barChart("per layer: all its directions ablated at once", effects.layers,
        (g) => `layer ${g.layer}`, (g) => String(g.layer), measure, tipped),
      barChart("per module: in every layer at once", effects.modules, (g) => g.module,
        (g) => g.module.replace(/_proj$/, ""), measure, tipped),
    );
    Dom.choice(switcher, ["ablation_kl", "ablation_dloss"].map((m) => ({
      label: MEASURES[m], title: `bars: ${MEASURES[m]} of each group`, value: m,
    })), "ablation_kl", draw);
    box.append(switcher, charts);
    draw("ablation_kl");
    return box;
  }

  function barChart(title, groups, name, tick, measure, tipped) {
    const width = Math.max(220, Math.min(640, 40 + groups.length * 14));
    const [left, right, top, bottom] = [48, 8, 8, 26];
    const root = svg("svg", {
      viewBox: `0 0 ${width} 150`, width, class: "plot bars", role: "img", "aria-label": title,
    });
    const inner = { width: width - left - right, height: 150 - top - bottom };
    const values = groups.map((g) => g[measure]);
    const lo = Math.min(0, ...values);
    const hi = Math.max(0, ...values);
    const y = (v) => top + ((hi - v) / (hi - lo || 1)) * inner.height;
    const step = inner.width / Math.max(1, groups.length);
    const every = Math.ceil(groups.length / 12);
    groups.forEach((g, i) => {
      const v = g[measure];
      const bar = svg("rect", {
        x: left + i * step + step * 0.1, width: Math.max(step * 0.8, 1),
        y: Math.min(y(v), y(0)), height: Math.max(Math.abs(y(v) - y(0)), 0.5),
        class: v < 0 ? "bar neg" : "bar pos",
      });
      root.append(tipped(bar, [
        ["group", name(g)], ["ablation KL", fmt(g.ablation_kl)],
        ["ablation Δloss", fmt(g.ablation_dloss)],
      ]));
      if (i % every === 0) {
        root.append(svg("text", { x: left + (i + 0.5) * step, y: 150 - bottom + 12,
          "text-anchor": "middle" }, tick(g)));
      }
    });
    root.append(svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), class: "axis" }));
    root.append(svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, fmt4(hi)));
    root.append(svg("text", { x: left - 4, y: 150 - bottom, "text-anchor": "end" }, fmt4(lo)));
    const figure = el("figure", "bar-figure");
    figure.append(el("figcaption", "", `${MEASURES[measure]} ${title}`), root);
    return figure;
  }

  // The rows with per-token KL vs base: each opens its stored sequence, coloured by it.
  function klRows(effects, strings, store, tipped, busy, inCards) {
    const box = el("div", "kl-rows");
    box.append(el("h3", "", "KL vs base by token"));
    box.append(el("p", "muted", "Where the adapter changes the prediction: a token is " +
      "coloured by KL(adapted ‖ base) of the prediction made at it (of the next token), over " +
      "the largest in its row; the last token predicts nothing."));
    const links = el("div", "seg");
    const view = el("div", "context kl-sequence");
    const open = (index) => busy(async () => {
      const [sequences, kl] = await Promise.all([store.get("sequences"), store.get("kl-tokens")]);
      view.replaceChildren(...klTokens(sequences[index], kl[index], index, strings, tipped));
      view.dataset.row = index;
    });
    Dom.choice(links, effects.kl_rows.map((index) => ({
      label: `#${index}`, title: `row ${index}: its stored sequence, coloured by KL vs base`,
      value: index,
    })), null, open);
    const cards = el("button", "kl-in-cards", "in the cards' whole sequences");
    cards.type = "button";
    cards.title = "colour these rows by KL vs base wherever the cards show them, at the whole width";
    cards.addEventListener("click", inCards);
    box.append(links, " ", cards, view);
    return box;
  }

  function klTokens(sequence, values, index, strings, tipped) {
    const scale = Math.max(0, ...values) || 1;
    return sequence.map((id, t) => {
      const span = Dom.tokenText(strings[id], "tok");
      const value = values[t];
      if (value === undefined) span.classList.add("unrecorded");
      else Dom.paint(span, value, scale);
      return tipped(span, [
        ["token", Format.escaped(strings[id])],
        ["KL vs base", value === undefined ? "not measured (the last token, or past the cut)" : fmt(value)],
        ["position", `example ${index}, token ${t}`],
      ]);
    });
  }

  return { MEASURES, grid, ranks, divergence, section };
})();
