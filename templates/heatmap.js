// The overview heatmap of every layer and direction, from the index's per-direction scalars.
/* global Dom, Effects, Format */
/* exported Heatmap */
const Heatmap = (() => {
  const { el } = Dom;
  const { fmt4, maxAbs, moduleOf } = Format;
  // [label, measure, whether it may be coloured per module]. Write magnitude compares
  // directions across module types, so it always has one scale for the whole run.
  const METRICS = [
    ["max |activation|", (d) => maxAbs(d), true],
    ["std", (d) => d.std, true],
    ["write magnitude", (d) => maxAbs(d) * d.write_norm_scale, false],
  ];
  // Runs with --effects: the effects of removing a direction, in one unit across modules (one
  // scale for the whole run); Δloss and attribution are signed, coloured by sign.
  const EFFECT_METRICS = Object.entries(Effects.MEASURES)
    .map(([key, label]) => [label, (d) => d[key], false]);
  const ORDERS = [
    { label: "by layer", title: "directions as rows, layers as columns", value: "layers" },
    { label: "largest first", title: "every direction, ranked by the measure", value: "ranked" },
  ];
  const RANKED_SHOWN = 100; // directions listed when ranked
  const SCALES = [
    { label: "per module", title: "each module's cells over that module's largest", value: "module" },
    { label: "whole run", title: "every cell over the run's largest", value: "run" },
  ];

  // What the colour means, for the legend.
  function legendText(label, perModule, order) {
    if (order === "ranked") {
      return `directions by ${label}, largest first (at most ${RANKED_SHOWN}); bar: |${label}| ` +
        "over the largest |value| in the whole run, red positive, blue negative";
    }
    return perModule
      ? `colour: ${label} over its module's largest in any layer (each module uses the whole scale)`
      : `colour: ${label} over the largest in the whole run (one scale for every module)`;
  }

  // A cell or bar coloured by |value| / largest |value|, its sign as pos/neg where signed.
  function paintCell(node, value, largest, signed) {
    node.style.setProperty("--a", (Math.abs(value) / (largest || 1)).toFixed(3));
    if (signed) node.classList.add(value < 0 ? "neg" : "pos");
  }

  // overview: per layer {layer, directions: [{key, name, min, max, std, write_norm_scale}]}.
  // Directions are rows (in the page's order), layers columns; a cell's colour is the metric
  // over its largest value in its module (by default) or in the whole run, and the cell opens
  // its direction (data-open). controls: {metric: <select>, scale: a .seg group, legend, and,
  // where the run has effects, order: an element to put the order switch in}.
  function create(box, controls, overview) {
    const metrics = controls.order ? [...METRICS, ...EFFECT_METRICS] : METRICS;
    let current = -1;
    let metric = 0;
    let scale = "module";
    let order = "layers";

    function draw() {
      const [label, measure, scalable] = metrics[metric];
      const perModule = scalable && scale === "module";
      if (order === "ranked") drawRanked(label, measure);
      else drawGrid(label, measure, perModule);
      for (const button of controls.scale.querySelectorAll("button")) button.disabled = !scalable;
      controls.legend.textContent = legendText(label, perModule, order);
      box.dataset.scale = perModule ? "module" : "run";
      box.dataset.order = order;
    }

    function drawGrid(label, measure, perModule) {
      const group = (name) => (perModule ? moduleOf(name) : "");
      const columns = overview.map((layer, index) => new Map(layer.directions.map(
        (d) => [d.name, { index, key: d.key, value: measure(d) }])));
      const names = [...new Set(columns.flatMap((cells) => [...cells.keys()]))];
      const signed = columns.some((cells) => [...cells.values()].some((c) => c.value < 0));
      const largest = new Map(); // group -> its largest |value|
      for (const cells of columns) {
        for (const [name, { value }] of cells) {
          largest.set(group(name), Math.max(largest.get(group(name)) ?? 0, Math.abs(value)));
        }
      }
      const every = Math.ceil(overview.length / 16); // layer numbers that fit above the columns
      box.classList.remove("ranked");
      box.style.setProperty("--columns", String(overview.length));
      const header = [
        el("span", "corner", "layer"),
        ...overview.map((layer, i) => el("span", "col-label", i % every ? "" : String(layer.layer))),
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
          button.classList.toggle("current", cell.index === current);
          button.title = `layer ${overview[i].layer} ${name}: ${label} ${fmt4(cell.value)}`;
          paintCell(button, cell.value, largest.get(group(name)), signed);
          return button;
        }),
      ]);
      box.replaceChildren(...header, ...rows);
    }

    // The RANKED_SHOWN directions of largest value, one row each: rank, direction, bar, value.
    function drawRanked(label, measure) {
      const all = overview.flatMap((layer, index) => layer.directions.map((d) => ({
        index, layer: layer.layer, name: d.name, key: d.key, value: measure(d),
      })));
      all.sort((a, b) => b.value - a.value);
      const signed = all.some((d) => d.value < 0);
      const largest = Math.max(...all.map((d) => Math.abs(d.value)));
      box.classList.add("ranked");
      box.replaceChildren(...all.slice(0, RANKED_SHOWN).flatMap((d, i) => {
        const button = el("button", "cell");
        button.type = "button";
        button.dataset.index = String(d.index);
        button.dataset.open = d.key;
        button.classList.toggle("current", d.index === current);
        button.title = `layer ${d.layer} ${d.name}: ${label} ${fmt4(d.value)}`;
        paintCell(button, d.value, largest, signed);
        button.style.setProperty("--w", (Math.abs(d.value) / (largest || 1)).toFixed(3));
        return [
          el("span", "rank", `#${i + 1}`), el("span", "row-label", `L${d.layer} ${d.name}`),
          button, el("span", "rank-value", fmt4(d.value)),
        ];
      }));
    }

    // Outlines the column of the layer on screen.
    function markCurrent(index) {
      current = index;
      for (const cell of box.querySelectorAll(".cell")) {
        cell.classList.toggle("current", Number(cell.dataset.index) === index);
      }
    }

    metrics.forEach(([label], i) => controls.metric.append(new Option(label, String(i))));
    controls.metric.addEventListener("change", () => {
      metric = Number(controls.metric.value);
      draw();
    });
    Dom.choice(controls.scale, SCALES, scale, (value) => {
      scale = value;
      draw();
    });
    if (controls.order) {
      Dom.choice(controls.order, ORDERS, order, (value) => {
        order = value;
        draw();
      });
    }
    draw();
    return { markCurrent };
  }

  return { create };
})();
