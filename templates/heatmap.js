// The overview heatmap of every layer and direction, from the index's per-direction scalars.
/* global Dom, Format */
/* exported Heatmap */
const Heatmap = (() => {
  const { el } = Dom;
  const { fmt4, maxAbs } = Format;
  // [label, measure, whether it may be coloured per module]. Write magnitude compares
  // directions across module types, so it always has one scale for the whole run.
  const METRICS = [
    ["max |activation|", (d) => maxAbs(d), true],
    ["std", (d) => d.std, true],
    ["write magnitude", (d) => maxAbs(d) * d.write_norm_scale, false],
  ];
  const SCALES = [
    { label: "per module", title: "each module's cells over that module's largest", value: "module" },
    { label: "whole run", title: "every cell over the run's largest", value: "run" },
  ];

  // The module a direction belongs to: its name without the component ("up_proj[1]" -> up_proj),
  // so that a module's components share its scale.
  const moduleOf = (name) => name.replace(/\[\d+\]$/, "");

  // What the colour means, for the legend.
  function legendText(label, perModule) {
    return perModule
      ? `colour: ${label} over its module's largest in any layer (each module uses the whole scale)`
      : `colour: ${label} over the largest in the whole run (one scale for every module)`;
  }

  // overview: per layer {layer, directions: [{key, name, min, max, std, write_norm_scale}]}.
  // Directions are rows (in the page's order), layers columns; a cell's colour is the metric
  // over its largest value in its module (by default) or in the whole run, and the cell opens
  // its direction (data-open). controls: {metric: <select>, scale: a .seg group, legend}.
  function create(box, controls, overview) {
    let current = -1;
    let metric = 0;
    let scale = "module";

    function draw() {
      const [label, measure, scalable] = METRICS[metric];
      const perModule = scalable && scale === "module";
      const group = (name) => (perModule ? moduleOf(name) : "");
      const columns = overview.map((layer, index) => new Map(layer.directions.map(
        (d) => [d.name, { index, key: d.key, value: measure(d) }])));
      const names = [...new Set(columns.flatMap((cells) => [...cells.keys()]))];
      const largest = new Map(); // group -> its largest value
      for (const cells of columns) {
        for (const [name, { value }] of cells) {
          largest.set(group(name), Math.max(largest.get(group(name)) ?? 0, value));
        }
      }
      const every = Math.ceil(overview.length / 16); // layer numbers that fit above the columns
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
          const alpha = cell.value / (largest.get(group(name)) || 1);
          button.style.setProperty("--a", alpha.toFixed(3));
          return button;
        }),
      ]);
      box.replaceChildren(...header, ...rows);
      for (const button of controls.scale.querySelectorAll("button")) button.disabled = !scalable;
      controls.legend.textContent = legendText(label, perModule);
      box.dataset.scale = perModule ? "module" : "run";
    }

    // Outlines the column of the layer on screen.
    function markCurrent(index) {
      current = index;
      for (const cell of box.querySelectorAll(".cell")) {
        cell.classList.toggle("current", Number(cell.dataset.index) === index);
      }
    }

    METRICS.forEach(([label], i) => controls.metric.append(new Option(label, String(i))));
    controls.metric.addEventListener("change", () => {
      metric = Number(controls.metric.value);
      draw();
    });
    Dom.choice(controls.scale, SCALES, scale, (value) => {
      scale = value;
      draw();
    });
    draw();
    return { markCurrent };
  }

  return { create };
})();
