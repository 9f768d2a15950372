// A layer on screen: one card per direction (its examples, histogram and sections), and the
// layer's statistics and cosines; the baseline neurons' and SAE features' cards, drawn by the
// same code.
/* global Contexts, Dom, Effects, Explanations, Format, Plots */
/* exported Cards */
const Cards = (() => {
  const { el, paint, scaleLegend, scroller, lazySection, choice } = Dom;
  const { fmt, fmtCount, round4, finite, scaleOf } = Format;

  const STATS_COLUMNS = [
    "direction", "count", "min", "max", "mean", "std", "‖A‖", "‖B‖", "scaling",
  ];
  const SPACES = {
    mlp_hidden: "MLP hidden space: gate/up write vectors (B), down read vector (A)",
    residual: "residual stream: gate/up read vectors (A), down write vector (B)",
  };

  // Every direction of a layer, in the page's (module) order.
  function* directions(layer) {
    for (const [module, projection] of Object.entries(layer.projections)) {
      for (const direction of projection.directions) yield { module, projection, direction };
    }
  }

  // page: {strings, metadata, example_fields, overview, and where the run has them,
  // attribution_fields, effects and explanations} of the index; settings: the page's {width,
  // logCounts, statsOpen, sequences, colourKL, kl}, read whenever something is drawn; notes:
  // Notes.create's; sae (runs with --sae): Features.data's, whose contributors(key) gives the
  // features a direction weighs most in.
  function create(page, settings, notes, sae) {
    const strings = page.strings;
    const klRanks = page.effects && Effects.ranks(page.overview, "ablation_kl");
    const explained = Explanations.byKey(page.explanations?.features ?? []);
    const tokenInfo = new WeakMap(); // token <span> -> what its tooltip shows
    // The cards on screen (the layer's and the neurons'), each with its key and what its view
    // and the page's settings redraw.
    let cards = [];
    const neuronCards = [];
    let featureCards = []; // the SAE feature's card on screen
    const marks = new Map(); // direction key -> draws a value on that direction's histogram

    const redraw = (card) => card.redraws.forEach((draw) => draw());
    const token = (id, className) => Dom.tokenText(strings[id], className);

    // What a card's tokens show: its own activations, or, where the examples carry them, those
    // of the layer's other modules (same component) at the same tokens, and gate × up.
    function cardViews(layer, d, examples) {
      const own = ownView(d.direction, d.module);
      const carried = new Set(d.direction.siblings || []);
      const views = [own];
      for (const [module, projection] of Object.entries(layer.projections)) {
        const sibling = projection.directions.find((x) => x.component === d.direction.component);
        if (!carried.has(module) || !sibling) continue;
        views.push({
          label: module,
          tip: module,
          key: sibling.key,
          scale: scaleOf(sibling.stats),
          values: (e) => e.sibling_activations?.[module] ?? e.tokens.map(() => null),
        });
      }
      const gate = views.find((v) => v.label === "gate_proj");
      const up = views.find((v) => v.label === "up_proj");
      if (gate && up) views.push(productView(gate, up, examples));
      return views;
    }

    // label: on the switch; tip: in the tooltip; key: the histogram that shows the value.
    const ownView = (direction, label) => ({
      label, tip: "activation", key: direction.key, scale: scaleOf(direction.stats),
      values: (e) => e.activations,
    });

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

    // view: what the tokens show (cardViews'); where it has `side`, the value beside the row
    // is that (else the activation), and `also`, a second value its tooltip gives.
    function exampleRow(example, view) {
      const row = el("li", "example");
      const side = el("div", "side");
      const shown = view.side ? view.side(example) : example.activation;
      const value = el("span", "value", fmt(shown));
      value.classList.add(shown < 0 ? "neg" : "pos");
      const where = el("span", "where", `#${example.example_index} t${example.token_index}`);
      where.title = `example ${example.example_index}, token ${example.token_index}`;
      side.append(value, where);

      const context = el("div", "context");
      const sequence = settings.sequences?.[example.example_index];
      const window = page.metadata.context_window;
      const byKL = klView(example, sequence);
      const shownView = byKL || view;
      const { tokens, values, first, cut } = Contexts.shownTokens(
        byKL ? byKL.anchor : example, shownView.values(example), settings.width, window, sequence);
      const also = !byKL && view.also &&
        Contexts.shownTokens(example, view.also.values(example), settings.width, window, sequence);
      if (first > 0) context.append(el("span", "muted", "… "));
      tokens.forEach((id, i) => {
        const offset = first + i - example.token_index; // from the example's own token
        const span = token(id, "tok");
        if (values[i] === undefined) span.classList.add("unrecorded");
        else paint(span, values[i], shownView.scale);
        if (offset === 0) span.classList.add("target");
        tokenInfo.set(span, {
          text: strings[id],
          value: values[i],
          also: also && [view.also.tip, also.values[i]],
          view: shownView,
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

    // At the whole width with settings.colourKL on, a row of the effects shows KL vs base at
    // each token of its stored sequence (value t: of the prediction made at token t), over the
    // row's largest; `anchor` puts the KL values at their sequence positions (from 0).
    function klView(example, sequence) {
      const kl = settings.colourKL && sequence && settings.width === Infinity &&
        settings.kl?.[example.example_index];
      if (!kl) return null;
      return {
        tip: "KL vs base", key: null, scale: Math.max(0, ...kl) || 1, values: () => kl,
        missing: "not measured (the last token, or past the cut)",
        anchor: { ...example, target: example.token_index },
      };
    }

    // Drawn in its card's view (or the view `viewOf()` gives) and the page's context width;
    // registered with the card, so that switching either redraws it.
    function exampleList(examples, card, viewOf = () => card.view) {
      const list = el("ol", "example-list");
      const draw = () => list.replaceChildren(...examples.map((e) => exampleRow(e, viewOf())));
      card.redraws.push(draw);
      draw();
      return list;
    }

    const examplesOrNone = (examples, card, viewOf) =>
      examples.length ? exampleList(examples, card, viewOf) : el("p", "empty", "none");

    // explanation (optional): the explanation of these examples' sign, shown above them.
    function exampleSection(title, examples, card, sign, viewOf, explanation) {
      const section = el("div", `examples ${sign}`);
      section.append(el("h4", "", `${title} (${examples.length})`));
      if (explanation) section.append(Explanations.block(explanation));
      section.append(examplesOrNone(examples, card, viewOf));
      return section;
    }

    function directionCard(layer, d) {
      const { projection, direction } = d;
      const meta = el(
        "div",
        "card-meta",
        `reads ${projection.read_site} · scaling ${fmt(projection.scaling)} · ` +
          `‖A‖ ${fmt(direction.a_norm)} · ‖B‖ ${fmt(direction.b_norm)} · ` +
          `write scale ${fmt(direction.write_norm_scale)}`,
      );
      const viewsOf = (examples) => cardViews(layer, d, examples);
      const more = sae ? [lazySection("more", "SAE features", () => contributions(direction))] : [];
      return featureCard(direction, meta, viewsOf, { list: cards, notes: true, more });
    }

    // The SAE features whose composition weighs this direction most, each a link to its card.
    function contributions(direction) {
      const box = el("div", "contributions");
      sae.contributors(direction.key).then((found) => {
        if (!found.length) box.append(el("p", "empty", "in no feature's 16 largest weights"));
        else box.append(el("p", "muted", "features whose decoder weighs this direction most"));
        const list = el("ol", "feature-links");
        for (const { index, weight } of found) {
          const item = el("li");
          const value = el("span", `value ${weight < 0 ? "neg" : "pos"}`, fmt(weight));
          item.append(featureLink(index), " ", value);
          list.append(item);
        }
        box.append(list);
      });
      return box;
    }

    // A link to an SAE feature: opens its card in the Features view.
    function featureLink(index, text = `feature ${index}`) {
      const link = el("a", "feature-link", text);
      link.href = "#features";
      link.dataset.feature = String(index);
      return link;
    }

    // A baseline neuron: a direction whose A is a unit vector, without B, siblings or effects.
    function neuronCard(neuron) {
      const meta = el("div", "card-meta",
        `coordinate ${neuron.neuron} of the MLP hidden space, read at down_proj's input`);
      const viewsOf = () => [ownView(neuron, "neuron")];
      return featureCard(neuron, meta, viewsOf, { list: neuronCards, notes: false });
    }

    // An SAE feature (>= 0: no negative side, siblings or effects), with its explanation and
    // `sections` (its composition) under its histogram; it replaces the one drawn before.
    function saeFeatureView(feature, meta, sections) {
      for (const card of featureCards) marks.delete(card.key);
      featureCards = [];
      const viewsOf = () => [ownView(feature, "feature")];
      const explanation = { positive: feature.explanation };
      return featureCard(feature, meta, viewsOf, {
        list: featureCards, notes: false, explanation, sections,
      });
    }

    // The card of a direction or of anything shaped like one (a baseline neuron, an SAE
    // feature, which has no top_negative): `meta` its line under the title, viewsOf(examples)
    // what its tokens can show (the first on at first); `list` gets the card, and where `notes`
    // is set, the card has a star and a note; `explanation` ({positive, negative}) overrides
    // the run's explanations of its key; `sections` go after its histogram, `more` (collapsed
    // sections) after its own.
    function featureCard(direction, meta, viewsOf, options) {
      const { list, notes: withNotes, explanation: given, sections = [], more = [] } = options;
      const toExample = (row) => Contexts.exampleOf(row, page.example_fields, direction.siblings);
      const positive = direction.top_positive.map(toExample);
      const negative = (direction.top_negative ?? []).map(toExample);
      const samples = direction.quantile_samples.map((s) => ({
        ...s, examples: s.examples.map(toExample),
      }));
      const sampled = samples.flatMap((s) => s.examples);
      const views = viewsOf([...positive, ...negative, ...sampled]);
      // redraws: what a view or setting changes
      const card = { key: direction.key, view: views[0], redraws: [] };
      list.push(card);

      const node = el("section", "card");
      node.dataset.key = direction.key;
      const head = el("header", "card-head");
      const title = el("div", "card-title");
      const legend = el("span");
      title.append(el("h3", "", direction.name), legend);
      if (withNotes) title.append(notes.starButton(direction.key));
      const nonfinite = direction.stats.nonfinite;
      if (nonfinite > 0) {
        meta.append(" · ", el("span", "warn", `${fmtCount(nonfinite)} non-finite left out`));
      }
      head.append(title, meta);
      if (withNotes) head.append(notes.noteBox(direction.key));

      const showView = (view) => {
        card.view = view;
        const scale = fmt(round4(view.scale));
        // An SAE feature is >= 0: its scale runs from 0, in the positive colour only.
        legend.replaceChildren(direction.top_negative
          ? scaleLegend(`−${scale}`, `+${scale}`) : scaleLegend("0", `+${scale}`, "one-sided"));
        legend.title = `colour scale of ${view.label}`;
        redraw(card);
      };
      if (views.length > 1) head.append(viewSwitch(views, showView));
      showView(card.view);

      const explanation = given ?? explained.get(direction.key) ?? {};
      node.append(
        head,
        cardHistogram(direction, card),
        ...sections,
        exampleSection("Top positive", positive, card, "pos", undefined, explanation.positive),
      );
      if (direction.top_negative) {
        node.append(
          exampleSection("Top negative", negative, card, "neg", undefined, explanation.negative));
      }
      if (direction.effects) {
        meta.after(effectsLine(direction));
        node.append(...attributionSections(direction, views[0], card));
      }
      node.append(...moreSections(direction, samples, card), ...more);
      return node;
    }

    // The direction's three effects and its rank by ablation KL among all directions.
    function effectsLine(direction) {
      const { ablation_kl: kl, ablation_dloss: dloss, attribution } = direction.effects;
      const rank = `#${klRanks.rank.get(direction.key)} of ${fmtCount(klRanks.total)}`;
      const line = el("div", "card-effects");
      line.title = "what removing this direction does, on the effects' rows; its rank by " +
        "ablation KL among all the directions of the run";
      line.append(
        el("span", "", `ablation KL ${fmt(kl)}`), " ", el("span", "effect-rank", rank),
        ` · Δloss ${fmt(dloss)} · attribution ${fmt(attribution)}`,
      );
      return line;
    }

    // Where the direction helps and hurts the loss most (attr = −a·∂L/∂a at the token), its
    // tokens coloured by attr, or by activation with the switch; the tooltip gives both.
    function attributionSections(direction, own, card) {
      const toExample = (row) =>
        Contexts.exampleOf(row, page.attribution_fields);
      const top = direction.effects.top_attribution.map(toExample);
      const bottom = direction.effects.bottom_attribution.map(toExample);
      const magnitudes = [...top, ...bottom].flatMap((e) => e.attributions.filter(finite));
      const byAttribution = {
        label: "attribution", tip: "attribution", key: null,
        scale: Math.max(0, ...magnitudes.map(Math.abs)) || 1,
        values: (e) => e.attributions, side: (e) => e.attribution,
        also: { tip: "activation", values: (e) => e.activations },
      };
      const byActivation = { ...own, label: "activation", side: byAttribution.side,
        also: { tip: "attribution", values: (e) => e.attributions } };
      let shown = byAttribution;
      const viewOf = () => shown;
      const sections = [
        exampleSection("Top attribution", top, card, "pos", viewOf),
        exampleSection("Bottom attribution", bottom, card, "neg", viewOf),
      ];
      const colour = el("div", "seg views");
      colour.setAttribute("role", "group");
      colour.setAttribute("aria-label", "Attribution examples coloured by");
      colour.append(el("span", "muted", "colour"));
      choice(colour, [byAttribution, byActivation].map((view) => ({
        label: view.label, title: `these tokens coloured by ${view.label}`, value: view,
      })), shown, (view) => {
        shown = view;
        redraw(card);
      });
      sections[0].querySelector("h4").after(colour);
      return sections;
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

    // An SAE feature's histogram leaves out its tokens at 0 (`zeros`, most of them), and says so.
    function cardHistogram(direction, card) {
      const figure = el("figure", "card-hist");
      const { zeros = 0, stats } = direction;
      const draw = () => {
        const { root, mark } = Plots.histogram(direction.histogram, settings.logCounts);
        marks.set(direction.key, mark);
        figure.replaceChildren(root);
        if (zeros) {
          const fires = stats.count - zeros;
          figure.append(el("figcaption", "muted", `the ${fmtCount(fires)} tokens where it ` +
            `fires; ${fmtCount(zeros)} at 0 not drawn`));
        }
      };
      card.redraws.push(draw);
      draw();
      return figure;
    }

    function moreSections(direction, samples, card) {
      const sections = [];
      const add = (title, build) => sections.push(lazySection("more", title, build));
      if (samples.length) add("Quantile samples", () => quantileSamples(samples, card));
      add(direction.bottom_tokens ? "Top and bottom tokens" : "Top tokens",
        () => tokenTables(direction));
      if (direction.logit_effects) add("Logit effects", () => logitEffects(direction.logit_effects));
      const pinned = direction.effects?.pinned ?? [];
      if (pinned.length) add("Pinned samples", () => pinnedSamples(pinned));
      add("Position profile", () => Plots.positionProfile(direction.position_profile));
      return sections;
    }

    function quantileSamples(samples, card) {
      const box = el("div", "quantiles");
      for (const { sign, quantile_range: [q0, q1], value_range: [lo, hi], examples } of samples) {
        const side = sign > 0 ? "positive" : "negative";
        const heading = el("h5", "", `${side} · quantiles ${q0}–${q1} · values ${lo} … ${hi}`);
        box.append(heading, examplesOrNone(examples, card));
      }
      return box;
    }

    // Per prompt, the continuations under each clamp side by side; in each, every token from the
    // first where it departs from the plain ("none") continuation is marked.
    function pinnedSamples(pinned) {
      const box = el("div", "pinned");
      box.append(el("p", "muted", "Greedy continuations with the activation held at its " +
        "observed minimum, at 0, at its observed maximum (at every position, prompt and " +
        "continuation alike), or left as is (none). Marked: every token from the first one " +
        "where a continuation departs from the none one."));
      const clamps = page.effects.clamps;
      const prompts = [...new Set(pinned.map((s) => s.prompt_index))].sort((a, b) => a - b);
      for (const p of prompts) {
        const prompt = page.effects.prompts[p];
        const heading = el("h5", "", `prompt ${p} (row #${prompt.example_index}) `);
        const text = el("span", "context");
        for (const id of prompt.tokens) text.append(token(id, "tok-text prompt-tok"));
        heading.append(text);
        const of = (clamp) => pinned.find((s) => s.prompt_index === p && s.clamp === clamp);
        const plain = of("none");
        const columns = el("div", "clamps");
        for (const clamp of clamps) {
          const sample = of(clamp);
          if (sample) columns.append(clampColumn(sample, plain));
        }
        box.append(heading, columns);
      }
      return box;
    }

    function clampColumn(sample, plain) {
      const column = el("div", "clamp");
      column.dataset.clamp = sample.clamp;
      const held = sample.value === null ? "as is" : `= ${fmt(sample.value)}`;
      column.append(el("h6", "", `${sample.clamp} ${held}`));
      const from = plain && sample !== plain ? Effects.divergence(sample.tokens, plain.tokens)
        : sample.tokens.length;
      const text = el("div", "context");
      sample.tokens.forEach((id, i) => {
        const span = token(id, "tok");
        if (i >= from) span.classList.add("diverged");
        tokenInfo.set(span, { rows: [
          ["token", Format.escaped(strings[id])],
          ["continuation", `${sample.clamp}, token ${i}${i >= from ? ", after it departs" : ""}`],
        ] });
        text.append(span);
      });
      if (!sample.tokens.length) text.append(el("span", "muted", "(nothing: EOS at once)"));
      column.append(text);
      return column;
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
      cell.append(token(id));
      return cell;
    }

    function tokenTables(direction) {
      const scale = scaleOf(direction.stats);
      const table = (caption, rows) => valueTable(
        caption,
        ["token", "count", "mean", "min", "max"],
        rows.map((r) => [
          tokenCell(r.token), numberCell(fmtCount(r.count)), numberCell(r.mean, scale),
          numberCell(r.min), numberCell(r.max),
        ]),
      );
      const box = el("div", "pair");
      const seen = `, seen ≥ ${page.metadata.min_token_count}×`;
      box.append(scroller(table(`highest mean${seen}`, direction.top_tokens)));
      if (direction.bottom_tokens) {
        box.append(scroller(table(`lowest mean${seen}`, direction.bottom_tokens)));
      }
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

    function statsTable(layer) {
      const table = el("table", "stats-table");
      const head = table.createTHead().insertRow();
      for (const label of STATS_COLUMNS) head.append(el("th", "", label));
      const body = table.createTBody();
      for (const { projection, direction } of directions(layer)) {
        const row = body.insertRow();
        const s = direction.stats;
        const values = [
          s.min, s.max, s.mean, s.std, direction.a_norm, direction.b_norm, projection.scaling,
        ];
        row.append(el("th", "", direction.name));
        row.append(el("td", "", fmtCount(s.count)), ...values.map((v) => el("td", "", fmt(v))));
      }
      return scroller(table);
    }

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
      details.open = settings.statsOpen;
      details.addEventListener("toggle", () => {
        settings.statsOpen = details.open;
      });
      details.append(
        el("summary", "", `Statistics for layer ${layer.layer}`),
        statsTable(layer),
        cosines(layer),
      );
      return details;
    }

    // The layer's title, cards and statistics; these cards replace those on screen.
    function layerView(layer) {
      for (const card of cards) marks.delete(card.key);
      cards = [];
      const grid = el("div", "modules");
      for (const d of directions(layer)) grid.append(directionCard(layer, d));
      return [el("h2", "layer-title", `Layer ${layer.layer}`), grid, statsSection(layer)];
    }

    // Cards of baseline neurons, drawn once each (the neuron section draws a layer's once).
    function neuronView(neurons) {
      const grid = el("div", "modules");
      for (const neuron of neurons) grid.append(neuronCard(neuron));
      return grid;
    }

    // A token's tooltip rows, and the histogram to mark with its value.
    function tokenTip(span) {
      const info = tokenInfo.get(span);
      if (info.rows) return { rows: info.rows, key: null, value: null };
      const offset = info.offset === 0 ? "target" : `${info.offset > 0 ? "+" : ""}${info.offset}`;
      const missing = info.view.missing ?? "not kept (outside the window)";
      const value = info.value === undefined ? missing : fmt(info.value);
      const also = info.also ? [[info.also[0], Format.finite(info.also[1]) ? fmt(info.also[1])
        : "not kept"]] : [];
      return {
        rows: [
          ["token", Format.escaped(info.text)],
          [info.view.tip, value],
          ...also,
          ["position", `example ${info.example}, token ${info.position} (${offset})`],
        ],
        key: info.view.key,
        value: info.value,
      };
    }

    // Draws `value` on the histogram of direction `key`, and hides the marks of the others.
    function mark(key, value) {
      for (const [k, draw] of marks) draw(k === key ? value : null);
    }

    const redrawAll = () => [...cards, ...neuronCards, ...featureCards].forEach(redraw);
    return { layerView, neuronView, saeFeatureView, featureLink, redrawAll, tokenTip, mark };
  }

  return { create };
})();
