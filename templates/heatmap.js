// The overview heatmap of every layer and direction, from the index's per-direction scalars.
/* global Dom, Format */
/* exported Heatmap */
const Heatmap = (() => {
  const { el } = Dom;
  const { fmt4, maxAbs } = Format;
  const METRICS = [
    ["max |activation|", (d) => maxAbs(d)],
    ["std", (d) => d.std],
    ["write magnitude", (d) => maxAbs(d) * d.write_norm_scale],
  ];

  // overview: per layer {layer, directions: [{key, name, min, max, std, write_norm_scale}]}.
  // Directions are rows (in the page's order), layers columns; a cell's colour is the metric
  // over its largest value in the whole run, and the cell opens its direction (data-open).
  function create(box, select, overview) {
    let current = -1;

    function draw(metric) {
      const [label, measure] = METRICS[metric];
      const columns = overview.map((layer, index) => new Map(layer.directions.map(
        (d) => [d.name, { index, key: d.key, value: measure(d) }])));
      const names = [...new Set(columns.flatMap((cells) => [...cells.keys()]))];
      const values = columns.flatMap((cells) => [...cells.values()].map((c) => c.value));
      const largest = Math.max(0, ...values) || 1;
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
          button.style.setProperty("--a", (cell.value / largest).toFixed(3));
          return button;
        }),
      ]);
      box.replaceChildren(...header, ...rows);
    }

    // Outlines the column of the layer on screen.
    function markCurrent(index) {
      current = index;
      for (const cell of box.querySelectorAll(".cell")) {
        cell.classList.toggle("current", Number(cell.dataset.index) === index);
      }
    }

    METRICS.forEach(([label], i) => select.append(new Option(label, String(i))));
    select.addEventListener("change", () => draw(Number(select.value)));
    draw(0);
    return { markCurrent };
  }

  return { create };
})();
