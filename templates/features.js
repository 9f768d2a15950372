// Runs with --sae: the SAE's features. data(): the feature list (decoded once, when first
// needed), a feature's card (its chunk of features decoded when one of them is opened) and
// each direction's features (the compositions inverted once); view(): the Features section,
// with the SAE's figures at once and, when opened, the list (sortable, drawn a page at a time)
// and the card of the feature opened, drawn by Cards, with its composition chart.
/* global Dom, Format, Search */
/* exported Features */
const Features = (() => {
  const { el, paint } = Dom;
  const { fmt, fmtCount } = Format;
  const PAGE = 100; // rows of the list drawn at once
  const CONTRIBUTORS = 10; // features listed in a direction's card
  const SORTS = [
    { label: "index", title: "by latent index", value: "index" },
    { label: "frequency", title: "most frequent first", value: "frequency" },
    { label: "score", title: "best explanation (detection) first, unexplained last",
      value: "detection" },
    { label: "composition", title: "by the direction of largest |weight|: layer, then module",
      value: "composition" },
  ];

  // The page's directions in its order (a composition names one by its number).
  const directionsOf = (overview) => overview.flatMap((layer) =>
    layer.directions.map((d) => ({ layer: layer.layer, key: d.key, name: d.name })));

  // The rows in the order `by` (SORTS' values); ties, and "index", in the list's own order.
  function sortRows(rows, by) {
    const top = (row) => (row.composition.length ? row.composition[0][0] : Infinity);
    const weight = (row) => (row.composition.length ? Math.abs(row.composition[0][1]) : 0);
    const orders = {
      index: () => 0,
      frequency: (a, b) => b.frequency - a.frequency,
      detection: (a, b) => (a.detection === null) - (b.detection === null) ||
        (b.detection ?? 0) - (a.detection ?? 0),
      composition: (a, b) => (top(a) === top(b) ? weight(b) - weight(a) : top(a) < top(b) ? -1 : 1),
    };
    const keyed = rows.map((row, i) => [row, i]);
    keyed.sort(([a, i], [b, j]) => orders[by](a, b) || i - j);
    return keyed.map(([row]) => row);
  }

  // Direction key -> the features that weigh it most: [{index, weight}], largest |weight|
  // first, at most CONTRIBUTORS.
  function invert(rows, directions) {
    const found = new Map();
    for (const row of rows) {
      for (const [number, weight] of row.composition) {
        const key = directions[number].key;
        if (!found.has(key)) found.set(key, []);
        found.get(key).push({ index: row.index, weight });
      }
    }
    for (const [key, list] of found) {
      list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight) || a.index - b.index);
      found.set(key, list.slice(0, CONTRIBUTORS));
    }
    return found;
  }

  // The rows whose explanation contains the query, or one of whose top tokens it is (as the
  // search finds a token: case and surrounding whitespace aside).
  function matching(rows, query, strings) {
    const wanted = Search.normal(query);
    if (!wanted) return [];
    return rows.filter((row) => row.text?.toLowerCase().includes(wanted) ||
      row.tokens.some((id) => Search.normal(strings[id]) === wanted));
  }

  // Evenly spaced edges, embedded as their first and their step, expanded (to the digits
  // the page keeps of edges).
  function expandEdges(histogram) {
    if (histogram.edges) return histogram;
    const { first, step, counts } = histogram;
    const edges = Array.from({ length: counts.length + 1 },
      (_, i) => Number((first + i * step).toPrecision(6)));
    return { edges, counts };
  }

  // page: the index; store: Data.open's.
  function data(page, store) {
    const header = page.sae;
    const directions = directionsOf(page.overview);
    let rows = null;
    let inverse = null;
    const list = () => (rows ??= store.get("sae-list"));
    async function contributors(key) {
      inverse ??= list().then((found) => invert(found, directions));
      return (await inverse).get(key) ?? [];
    }
    // The card data of the feature at `position` in the list.
    async function feature(position) {
      const chunk = await store.get(`sae-${Math.floor(position / header.chunk)}`);
      const found = chunk[position % header.chunk];
      found.histogram = expandEdges(found.histogram);
      return found;
    }
    return { header, directions, list, contributors, feature };
  }

  const percent = (x) => `${fmt(Number((100 * x).toPrecision(4)))}%`;

  function figures(header) {
    const list = el("dl", "meta sae-meta");
    const add = (label, value, title) => {
      const item = el("div");
      item.append(el("dt", "", label), el("dd", "", value));
      if (title) item.title = title;
      list.append(item);
    };
    add("FVU", fmt(header.fvu), "fraction of variance unexplained, scaled space, all tokens");
    add("FVU held-out", fmt(header.fvu_heldout), "on the 5% of tokens training did not see");
    add("L0", fmt(header.l0), "mean features > 0 per token");
    add("dead", `${percent(header.dead_fraction)} (${fmtCount(header.num_dead)})`,
      "latents that never fire");
    add("latents", fmtCount(header.num_latents));
    add("k", fmtCount(header.k));
    add("tokens", fmtCount(header.num_tokens));
    add("threshold", fmt(header.threshold), "a feature is 0 at or below it");
    const shares = Object.entries(header.error_share);
    if (shares.length) {
      add("error share", shares.map(([m, x]) => `${m} ${percent(x)}`).join(" · "),
        "each module type's share of the squared reconstruction error");
    }
    return list;
  }

  // The composition over layers × direction names: one cell per direction of the page, those
  // of the feature's composition coloured by their signed weight (each opens its direction),
  // and the same as a list of links.
  function compositionChart(row, directions, directionLink) {
    const weights = new Map(row.composition.map(([number, weight]) => [number, weight]));
    const scale = Math.max(0, ...row.composition.map(([, w]) => Math.abs(w))) || 1;
    const names = [...new Set(directions.map((d) => d.name))];
    const layers = [...new Set(directions.map((d) => d.layer))];
    const at = new Map(directions.map((d, number) => [`${d.layer} ${d.name}`, number]));
    const grid = el("div", "composition-grid");
    grid.style.setProperty("--columns", String(names.length));
    grid.append(el("span"), ...names.map((name) => el("span", "col", name)));
    layers.forEach((layer, i) => {
      const cells = names.map((name) => {
        const number = at.get(`${layer} ${name}`);
        const cell = el("span", "cell");
        if (number === undefined) cell.classList.add("absent");
        else if (weights.has(number)) {
          const { key } = directions[number];
          paint(cell, weights.get(number), scale);
          cell.dataset.open = key;
          cell.title = `${key} · weight ${fmt(weights.get(number))}`;
        }
        return cell;
      });
      const used = cells.some((cell) => cell.dataset.open);
      grid.append(el("span", "row", used || i % 8 === 0 ? `L${layer}` : ""), ...cells);
    });
    const list = el("ol", "composition-list");
    for (const [number, weight] of row.composition) {
      const { key, layer, name } = directions[number];
      const item = el("li");
      const value = el("span", "chip", fmt(weight));
      paint(value, weight, scale);
      item.append(directionLink(key, `layer ${layer} ${name}`), " ", value);
      list.append(item);
    }
    const figure = el("figure", "composition");
    figure.append(el("figcaption", "", "composition: its 16 directions of largest |W_dec| " +
      "(scaled units), by layer and module "), Dom.scaleLegend(`−${fmt(scale)}`, `+${fmt(scale)}`));
    figure.append(grid, list);
    return figure;
  }

  // sae: data()'s; cards: Cards.create's; busy, directionLink: main.js's; strings: the page's.
  function view(sae, cards, { busy, directionLink, strings }) {
    const { header, directions } = sae;
    const section = el("section", "features");
    section.id = "features";
    section.setAttribute("aria-label", "SAE features");
    section.append(
      el("h2", "", `SAE features (${fmtCount(header.num_features)} of ` +
        `${fmtCount(header.num_latents)} latents)`),
      figures(header),
    );
    const details = el("details", "panel features-view");
    details.append(el("summary", "", "Features: the list, and the card of one"));
    const listBox = el("div", "feature-list");
    const cardBox = el("div", "feature-card");
    details.append(listBox, cardBox);
    section.append(details);

    let rows = [];
    let sorted = [];
    let first = 0;
    const body = el("tbody");
    const position = el("span", "muted");
    const prev = el("button", "page-prev", "◀");
    const next = el("button", "page-next", "▶");

    function drawPage() {
      const shown = sorted.slice(first, first + PAGE);
      body.replaceChildren(...shown.map(listRow));
      position.textContent = shown.length ? `${fmtCount(first + 1)}–` +
        `${fmtCount(first + shown.length)} of ${fmtCount(sorted.length)}` : "no feature fires";
      prev.disabled = first === 0;
      next.disabled = first + PAGE >= sorted.length;
    }

    function listRow(row) {
      const tr = el("tr");
      tr.dataset.index = String(row.index);
      const cell = (content, className = "") => {
        const td = el("td", className);
        td.append(content);
        return td;
      };
      const [number, weight] = row.composition[0] ?? [];
      const top = number === undefined ? "—" : directionLink(directions[number].key,
        `L${directions[number].layer} ${directions[number].name} ${fmt(weight)}`);
      tr.append(
        cell(cards.featureLink(row.index)),
        cell(percent(row.frequency), "num"),
        cell(fmt(row.max), "num"),
        cell(row.detection === null ? "—" : row.detection.toFixed(2), "num"),
        cell(top),
        cell(row.text ?? "", "explanation-text"),
      );
      return tr;
    }

    function drawList() {
      const toolbar = el("div", "toolbar");
      const order = el("span", "seg sort");
      order.setAttribute("role", "group");
      order.setAttribute("aria-label", "Order");
      order.append(el("span", "muted", "order"));
      Dom.choice(order, SORTS, "index", (by) => {
        sorted = sortRows(rows, by);
        first = 0;
        drawPage();
      });
      prev.type = next.type = "button";
      prev.title = `the ${PAGE} before`;
      next.title = `the next ${PAGE}`;
      prev.addEventListener("click", () => { first -= PAGE; drawPage(); });
      next.addEventListener("click", () => { first += PAGE; drawPage(); });
      toolbar.append(order, prev, position, next);
      const table = el("table", "value-table feature-table");
      const head = table.createTHead().insertRow();
      for (const label of ["feature", "frequency", "max", "score", "top direction", "explanation"]) {
        head.append(el("th", "", label));
      }
      table.append(body);
      listBox.append(toolbar, Dom.scroller(table));
      sorted = rows;
      drawPage();
    }

    let listed = null;
    function openList() {
      details.open = true;
      listed ??= busy(async () => {
        const started = performance.now();
        rows = await sae.list();
        drawList();
        // Measured once the frame with the list is painted (benchmarks/bench_page.py).
        requestAnimationFrame(() => setTimeout(() => {
          performance.measure("dashboard-features", { start: started });
        }));
      });
      return listed;
    }
    details.addEventListener("toggle", () => details.open && openList());

    // Opens the view and draws the card of feature `index`, scrolled into view.
    async function open(index) {
      await openList();
      const at = rows.findIndex((row) => row.index === index);
      if (at < 0) return;
      await busy(async () => {
        const feature = await sae.feature(at);
        const row = rows[at];
        const meta = el("div", "card-meta", `latent ${row.index} · fires on ` +
          `${percent(row.frequency)} of tokens · max ${fmt(row.max)}`);
        const chart = compositionChart(row, directions, directionLink);
        const grid = el("div", "modules"); // a card as wide as a layer's
        grid.append(cards.saeFeatureView(feature, meta, [chart]));
        cardBox.replaceChildren(grid);
      });
      cardBox.scrollIntoView({ block: "start" });
    }

    // The search's results among the features: each its link and explanation.
    function results(found) {
      if (!found.length) return [];
      const list = el("ul", "result-list features-found");
      for (const row of found.slice(0, PAGE)) {
        const item = el("li");
        item.append(cards.featureLink(row.index));
        if (row.text) item.append(": ", el("span", "explanation-text", row.text));
        list.append(item);
      }
      const more = found.length > PAGE ? `; the first ${PAGE}:` : ":";
      const count = `${fmtCount(found.length)} SAE feature${found.length > 1 ? "s" : ""}`;
      return [el("p", "muted", `in ${count}${more}`), list];
    }

    const search = async (query) => results(matching(await sae.list(), query, strings));
    return { section, open, search };
  }

  return { data, view, sortRows, invert, matching, expandEdges };
})();
