// The explanations of a run with --explain: pure helpers (scores and differences as text, the
// table's order, the comparison plot's geometry, the features a query finds) and the
// "Explanations" section: the headline, the comparison plot and the table of every feature.
/* global Dom, Format, Search */
/* exported Explanations */
const Explanations = (() => {
  const { el, svg } = Dom;
  const { fmtCount, finite } = Format;
  const MEASURES = ["detection", "fuzzing"];
  // The groups compared, in the plot's order: the directions with their own explanations, the
  // baseline neurons with theirs, the directions with another direction's (the chance level).
  const GROUPS = [
    { key: "lora", label: "LoRA" },
    { key: "neurons", label: "neurons" },
    { key: "shuffled", label: "shuffled" },
  ];
  const MINUS = "\u2212";
  const PLOT = { width: 300, height: 190, pad: [34, 8, 10, 34] }; // pad: left, right, top, bottom

  // Scores are accuracies in [0, 1]: two decimals, a true minus sign.
  const fixed2 = (v) => v.toFixed(2).replace("-", MINUS);
  const signed = (v) => (v < 0 ? fixed2(v) : `+${fixed2(v)}`);
  const interval = (ci) => (ci ? ` [${fixed2(ci[0])}, ${fixed2(ci[1])}]` : "");

  // A score and its interval as "0.81 [0.70, 0.90]"; "—" where nothing was scored.
  const fmtValue = (score, ci) => (score === null ? "—" : fixed2(score) + interval(ci));
  // A Score ({score, ci, n}) as "0.81 [0.70, 0.90] n=16".
  const fmtScore = ({ score, ci, n }) => `${fmtValue(score, ci)} n=${fmtCount(n)}`;
  // A group's mean ({mean, ci, n}) likewise.
  const fmtMean = ({ mean, ci, n }) => fmtScore({ score: mean, ci, n });
  // The headline's difference ({mean, ci}): "+0.04 [−0.02, 0.10]".
  const fmtDifference = ({ mean, ci }) => (mean === null ? "—" : signed(mean) + interval(ci));

  // An explanation's (or its shuffled baseline's) two scores on one line.
  function scoreLine(scores) {
    const auroc = finite(scores.detection.auroc) ? `, AUROC ${fixed2(scores.detection.auroc)}` : "";
    return `detection ${fmtScore(scores.detection)}${auroc} · fuzzing ${fmtScore(scores.fuzzing)}`;
  }

  // The features by key: key -> {positive, negative} (a sign absent where it was not explained).
  function byKey(features) {
    const found = new Map();
    for (const feature of features) {
      if (!found.has(feature.key)) found.set(feature.key, {});
      found.get(feature.key)[feature.sign] = feature;
    }
    return found;
  }

  // The table's rows ordered by `column` ("detection" or "fuzzing": that score; null: the
  // page's order), largest first where `descending`; unscored rows last, ties in page order.
  function sortFeatures(features, column, descending) {
    if (!column) return features.slice();
    const rows = features.map((feature, i) => [feature[column].score, i, feature]);
    rows.sort(([x, i], [y, j]) => {
      if (x === null || y === null) return (x === null) - (y === null) || i - j;
      return (descending ? y - x : x - y) || i - j;
    });
    return rows.map(([, , feature]) => feature);
  }

  // Each group's scores of `measure` (nulls left out): {lora, neurons, shuffled}.
  function groupScores(features, measure) {
    const scores = (group, of) => features.filter((f) => f.group === group)
      .map((f) => of(f)[measure].score).filter((v) => v !== null);
    return {
      lora: scores("lora", (f) => f),
      neurons: scores("neurons", (f) => f),
      shuffled: scores("lora", (f) => f.shuffled),
    };
  }

  // A number in [0, 1) for the j-th dot of a group: the golden ratio's multiples modulo 1, so
  // dots spread evenly across their band and the same file always draws the same plot.
  const spread = (j) => (j * 0.6180339887) % 1;

  // The comparison plot's geometry in a PLOT-sized box: `groups` ([{scores, mean, ci}]) side
  // by side, each in a band; a score's dot sits at the height of its value (0 at the bottom, 1
  // at the top) and somewhere across the middle 70% of its band; the group's mean is a line
  // across the band, its interval a bar at its center.
  function stripGeometry(groups) {
    const [left, right, top, bottom] = PLOT.pad;
    const band = (PLOT.width - left - right) / Math.max(1, groups.length);
    const y = (v) => top + (1 - v) * (PLOT.height - top - bottom);
    return {
      y,
      groups: groups.map((group, i) => {
        const center = left + band * (i + 0.5);
        return {
          center,
          half: band * 0.4, // the mean's line reaches this far on either side
          dots: group.scores.map((v, j) => ({ cx: center + band * 0.7 * (spread(j) - 0.5), cy: y(v) })),
          mean: group.mean === null ? null : y(group.mean),
          ci: group.ci ? [y(group.ci[1]), y(group.ci[0])] : null, // top, bottom
        };
      }),
    };
  }

  // The features whose explanation contains the query (case and surrounding space aside).
  function matching(features, query) {
    const wanted = Search.normal(query);
    return wanted ? features.filter((f) => f.text.toLowerCase().includes(wanted)) : [];
  }

  // ---- on the page --------------------------------------------------------------------

  // A card's explanation of one sign: its text, its scores, its shuffled baseline's smaller.
  function block(feature) {
    const box = el("div", "explanation");
    box.append(el("p", "explanation-text", feature.text));
    const scores = el("p", "explanation-scores", scoreLine(feature));
    if (feature.shuffled) { // a direction's features only: neurons have no shuffled baseline
      scores.append(" ", el("span", "shuffled", `shuffled: ${scoreLine(feature.shuffled)}`));
    }
    box.append(scores);
    return box;
  }

  // explanations: the index's (run, summary, features). Rows and links carry data-open: the
  // page opens the card of that direction or neuron.
  function section(explanations) {
    const box = el("section", "explanations");
    box.id = "explanations";
    box.setAttribute("aria-label", "Explanations");
    box.append(
      el("h2", "", "Explanations"),
      el("p", "muted", runLine(explanations)),
      headline(explanations.summary),
      groupTable(explanations.summary),
      comparison(explanations),
      // Built when first opened: a full-size run's table has thousands of rows.
      Dom.lazySection("panel features", `Every feature (${fmtCount(explanations.features.length)})` +
        ": sortable by score; a row opens its card", () => featureTable(explanations.features)),
    );
    return box;
  }

  function runLine({ explainer, scorer, num_prompts, num_tokens, seconds, settings }) {
    const done = `Explained by ${explainer}, scored by ${scorer} on held-out contexts the ` +
      `explainer never saw: ${fmtCount(num_prompts)} prompts, ${fmtCount(num_tokens)} tokens, ` +
      `${seconds} s.`;
    const how = [];
    if (settings.contexts_per_class) {
      how.push(`up to ${settings.contexts_per_class} activating and as many non-activating ` +
        "contexts per feature");
    }
    if (finite(settings.context_tokens)) how.push(`±${settings.context_tokens} tokens each`);
    if (settings.bootstrap_resamples) {
      how.push(`95% intervals from ${fmtCount(settings.bootstrap_resamples)} bootstrap resamples`);
    }
    if (finite(settings.seed)) how.push(`seed ${settings.seed}`);
    return how.length ? `${done} Settings: ${how.join(", ")}.` : done;
  }

  function headline(summary) {
    const list = el("dl", "meta headline");
    const differences = summary.lora_minus_neurons;
    for (const measure of MEASURES) {
      const item = el("div");
      const value = differences ? fmtDifference(differences[measure]) : "no baseline neurons";
      item.append(el("dt", "", `LoRA ${MINUS} neurons, ${measure}`), el("dd", "", value));
      list.append(item);
    }
    return list;
  }

  function groupTable(summary) {
    const table = el("table", "value-table groups");
    table.createCaption().textContent = "mean score of each group, 95% interval, features";
    const head = table.createTHead().insertRow();
    for (const label of ["group", ...MEASURES]) head.append(el("th", "", label));
    const body = table.createTBody();
    for (const { key, label } of GROUPS) {
      if (!summary[key]) continue;
      const row = body.insertRow();
      row.append(el("th", "", label));
      for (const measure of MEASURES) row.append(el("td", "", fmtMean(summary[key][measure])));
    }
    return table;
  }

  // Per measure, the three groups' scores as dots, each group's mean and interval over them.
  function comparison({ features, summary }) {
    const box = el("div", "pair comparison");
    for (const measure of MEASURES) {
      const scores = groupScores(features, measure);
      const groups = GROUPS.filter(({ key }) => summary[key])
        .map(({ key, label }) => ({ key, label, scores: scores[key], ...summary[key][measure] }));
      box.append(stripPlot(measure, groups));
    }
    return box;
  }

  function stripPlot(measure, groups) {
    const { width, height, pad } = PLOT;
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, width, class: "plot strip", role: "img",
      "aria-label": `${measure} scores by group`,
    });
    root.dataset.measure = measure;
    const { y, groups: placed } = stripGeometry(groups);
    const right = width - pad[1];
    for (const [v, cls] of [[0, "axis"], [0.5, "chance"], [1, "grid"]]) {
      root.append(svg("line", { x1: pad[0], x2: right, y1: y(v), y2: y(v), class: cls }));
      root.append(svg("text", { x: pad[0] - 4, y: y(v) + 3, "text-anchor": "end" }, String(v)));
    }
    groups.forEach((group, i) => {
      const at = placed[i];
      const dots = svg("g", { class: `dots ${group.key}` });
      for (const dot of at.dots) dots.append(svg("circle", { ...dot, r: 2.5 }));
      root.append(dots);
      if (at.ci) {
        root.append(svg("line", { x1: at.center, x2: at.center, y1: at.ci[0], y2: at.ci[1],
          class: "ci" }));
      }
      if (at.mean !== null) {
        const mean = svg("line", { x1: at.center - at.half, x2: at.center + at.half, y1: at.mean,
          y2: at.mean, class: "mean" });
        mean.append(svg("title", {}, `${group.label}: mean ${fmtMean(group)}`));
        root.append(mean);
      }
      root.append(svg("text", { x: at.center, y: height - pad[3] + 14, "text-anchor": "middle" },
        group.label));
      root.append(svg("text", { x: at.center, y: height - pad[3] + 26, "text-anchor": "middle",
        class: "muted" }, `${fmtValue(group.mean, null)} n=${fmtCount(group.n)}`));
    });
    const figure = el("figure", "strip-figure");
    figure.append(el("figcaption", "", `${measure}: each feature's score, each group's mean ` +
      "(line) and 95% interval (bar); 0.5 is chance"), root);
    return figure;
  }

  // Every feature, sortable by either score; a row opens its card.
  function featureTable(features) {
    const table = el("table", "value-table feature-table");
    table.id = "feature-table";
    table.createCaption().textContent = "the shuffled baseline's score in small";
    const head = table.createTHead().insertRow();
    const body = table.createTBody();
    const rows = new Map(features.map((f) => [f, featureRow(f)]));
    let sorted = { column: null, descending: true };
    const draw = () => {
      const order = sortFeatures(features, sorted.column, sorted.descending);
      body.replaceChildren(...order.map((f) => rows.get(f)));
      table.dataset.sort = sorted.column ? `${sorted.column} ${sorted.descending ? "desc" : "asc"}`
        : "page";
      for (const th of head.cells) {
        if (th.dataset.column === undefined) continue;
        const on = (th.dataset.column || null) === sorted.column;
        const descending = sorted.column && sorted.descending; // the page's order ascends
        th.setAttribute("aria-sort", on ? (descending ? "descending" : "ascending") : "none");
      }
    };
    const columns = [["feature", ""], ["sign"], ["detection", "detection"],
      ["fuzzing", "fuzzing"], ["explanation"]];
    for (const [label, column] of columns) {
      const th = el("th");
      if (column === undefined) th.textContent = label;
      else {
        th.dataset.column = column;
        const button = el("button", "sort", label);
        button.type = "button";
        button.title = column ? `sort by ${label} score (again: the other way)` : "the page's order";
        button.addEventListener("click", () => {
          const again = sorted.column === (column || null);
          sorted = { column: column || null, descending: again ? !sorted.descending : true };
          draw();
        });
        th.append(button);
      }
      head.append(th);
    }
    draw();
    return Dom.scroller(table);
  }

  function featureRow(feature) {
    const row = el("tr", `feature ${feature.group}`);
    row.dataset.open = feature.key;
    const name = el("th");
    const link = el("a", "direction-link", feature.name);
    link.href = "#";
    link.dataset.open = feature.key;
    name.append(link);
    row.append(name, el("td", feature.sign === "positive" ? "pos" : "neg", feature.sign));
    for (const measure of MEASURES) {
      const cell = el("td", "score", fmtValue(feature[measure].score, feature[measure].ci));
      cell.title = `${measure} ${fmtScore(feature[measure])}`;
      if (feature.shuffled) {
        cell.title += `; shuffled ${fmtScore(feature.shuffled[measure])}`;
        const { score } = feature.shuffled[measure];
        cell.append(" ", el("span", "shuffled", score === null ? "—" : fixed2(score)));
      }
      row.append(cell);
    }
    row.append(el("td", "explanation-text", feature.text));
    return row;
  }

  return {
    MEASURES, fmtValue, fmtScore, fmtMean, fmtDifference, scoreLine, byKey, sortFeatures, groupScores,
    stripGeometry, matching, block, section,
  };
})();
