// The page: decodes the index, draws the overview and the layer of the address, and wires
// every control. Only the layer on screen is in the DOM, decoded and built when it is shown,
// and a card's collapsed sections are built when first opened, so first paint does not grow
// with the run. #layer's data-state is "loading" while something is being decoded or drawn,
// "ready" once it is on screen.
/* global Cards, Contexts, Data, Dom, Effects, Explanations, Features, Format, Heatmap, Notes, Plots,
   Search, Tooltip */
(async () => {
  const $ = (id) => document.getElementById(id);
  const { el } = Dom;
  const store = Data.open($("dashboard-data"));
  const page = await store.get("index");
  const META = page.metadata;
  const OVERVIEW = page.overview; // per layer: its number and its directions' scalars
  const main = $("layer");
  const select = $("layer-select");
  const prev = $("prev-layer");
  const next = $("next-layer");
  const position = $("layer-position");
  // The page's settings, which the cards read whenever they draw.
  const settings = {
    width: META.context_window, // context tokens shown on each side of the target
    logCounts: false,
    statsOpen: false,
    sequences: null, // --store-sequences: example index -> its whole sequence, once decoded
    colourKL: false, // --effects: the whole width colours the effects' rows by KL vs base
    kl: null, // --effects: example index -> KL vs base at each position, once decoded
  };
  const layerOfKey = new Map(
    OVERVIEW.flatMap((layer, index) => layer.directions.map((d) => [d.key, index])));
  const layerData = (index) => store.get(`layer-${index}`);
  // --baseline-neurons: per layer, its neurons' keys; key -> the index of its layer's group.
  const neuronLayers = page.baseline_neuron_layers ?? [];
  const neuronKeys = new Map(neuronLayers.flatMap(({ keys }, i) => keys.map((key) => [key, i])));
  const neuronBox = el("section", "neurons"); // their cards, a layer's drawn when first opened

  let pending = 0;
  // Runs `work` (async) with #layer marked "loading" until it is done.
  async function busy(work) {
    pending++;
    main.dataset.state = "loading";
    try {
      return await work();
    } finally {
      if (--pending === 0) main.dataset.state = "ready";
    }
  }

  // A link to a direction: a real link to its layer, which opens the card itself.
  function directionLink(key, text) {
    const link = el("a", "direction-link", text);
    if (layerOfKey.has(key)) link.href = `#layer-${OVERVIEW[layerOfKey.get(key)].layer}`;
    link.dataset.open = key;
    return link;
  }

  const notesElements = { count: $("notes-count"), status: $("notes-status"), list: $("notes-list") };
  const notes = Notes.create(META, notesElements, directionLink);
  const sae = page.sae && Features.data(page, store); // runs with --sae: decoded on demand
  const cards = Cards.create(page, settings, notes, sae);
  const features = sae && Features.view(sae, cards, { busy, directionLink, strings: page.strings });
  const tooltip = Tooltip.create($("tooltip"), () => cards.mark(null, null));

  // ---- layers and navigation ------------------------------------------------------------

  let current = -1;
  let shown = Promise.resolve(); // the layer being shown, or on screen

  // Shows the index-th layer (a repeated request gets the same promise).
  function show(index) {
    if (index === current) return shown;
    current = index;
    tooltip.hide();
    select.value = String(index);
    prev.disabled = index === 0;
    next.disabled = index === OVERVIEW.length - 1;
    position.textContent = `${index + 1} of ${OVERVIEW.length}`;
    heatmap.markCurrent(index);
    shown = busy(() => drawLayer(index));
    return shown;
  }

  async function drawLayer(index) {
    const started = performance.now();
    const layer = await layerData(index);
    if (index !== current) return; // another layer was asked for meanwhile
    main.replaceChildren(...cards.layerView(layer));
    // Measured once the frame with the new layer is painted.
    requestAnimationFrame(() => setTimeout(() => {
      performance.measure("dashboard-layer", { start: started });
    }));
    for (const near of [index + 1, index - 1]) { // decoded ahead, for the ← → keys
      if (near >= 0 && near < OVERVIEW.length) layerData(near);
    }
  }

  function indexFromHash() {
    const match = /^#layer-(-?\d+)$/.exec(location.hash);
    const index = match ? OVERVIEW.findIndex((layer) => layer.layer === Number(match[1])) : -1;
    return Math.max(index, 0);
  }

  // Controls show the layer at once (hashchange comes later, and keys can repeat faster)
  // and record it in the hash, so that links, reloads and the back button agree with it.
  function go(index) {
    if (index < 0 || index >= OVERVIEW.length) return shown;
    const showing = show(index);
    location.hash = `layer-${OVERVIEW[index].layer}`;
    return showing;
  }

  // Shows the layer of a direction key (or the neuron section, for a neuron's key) and brings
  // its card into view, outlined.
  async function openDirection(key) {
    if (neuronKeys.has(key)) await openNeurons[neuronKeys.get(key)]();
    else if (layerOfKey.has(key)) await go(layerOfKey.get(key));
    else return;
    for (const card of document.querySelectorAll(".card")) {
      card.classList.toggle("opened", card.dataset.key === key);
      if (card.dataset.key === key) card.scrollIntoView({ block: "start" });
    }
  }

  // Heatmap cells and links carry the key of the direction they open.
  document.addEventListener("click", (event) => {
    const feature = features && event.target.closest?.("[data-feature]");
    if (feature) {
      event.preventDefault();
      features.open(Number(feature.dataset.feature));
      return;
    }
    const opener = event.target.closest && event.target.closest("[data-open]");
    if (!opener) return;
    event.preventDefault();
    openDirection(opener.dataset.open);
  });

  // ---- tooltips ---------------------------------------------------------------------------

  function showTokenTooltip(span) {
    const { rows, key, value } = cards.tokenTip(span);
    tooltip.show(span.getBoundingClientRect(), rows);
    cards.mark(key, value);
  }

  const tokenAt = (event) => event.target.closest && event.target.closest(".tok");
  const boxes = [main, neuronBox, ...(features ? [features.section] : [])];
  const inCards = (span) => boxes.some((box) => box.contains(span));
  for (const box of boxes) {
    box.addEventListener("pointerover", (event) => {
      const span = event.pointerType === "mouse" && tokenAt(event);
      if (span) showTokenTooltip(span);
    });
    box.addEventListener("pointerout", (event) => {
      if (event.pointerType === "mouse" && tokenAt(event)) tooltip.hide();
    });
  }
  // Touch has no hover: a tap (or click) on a token shows it, anywhere else hides it (but on
  // what shows its own tip: the effects section's data-tip elements).
  document.addEventListener("click", (event) => {
    const span = tokenAt(event);
    if (span && inCards(span)) showTokenTooltip(span);
    else if (!event.target.closest?.("[data-tip]")) tooltip.hide();
  });

  // ---- overview: search -------------------------------------------------------------------

  const searchInput = $("search");
  const results = $("search-results");
  const SHOWN_DIRECTIONS = 50;
  const SHOWN_VALUES = 8;
  let searchIndex = null; // built on the first search, from every layer

  // Draws the results for the input's text; #search-results' data-query is the query drawn.
  async function showResults() {
    const query = searchInput.value;
    if (!query.trim()) {
      results.replaceChildren();
      results.dataset.query = query;
      return;
    }
    searchIndex ??= Promise.all(OVERVIEW.map((_, i) => layerData(i)))
      .then((layers) => Search.buildIndex(page.strings, layers, page.example_fields));
    const found = (await searchIndex).find(query);
    const featuresFound = features ? await features.search(query) : [];
    if (searchInput.value !== query) return; // typed on meanwhile
    const explained = Explanations.matching(page.explanations?.features ?? [], query);
    const total = found.reduce((n, f) => n + f.hits.length, 0);
    const summary = found.length
      ? `${Format.fmtCount(total)} occurrences in ${found.length} directions` +
        (found.length > SHOWN_DIRECTIONS ? `; the ${SHOWN_DIRECTIONS} strongest:` : ":")
      : "not in any example of this file";
    const list = el("ul", "result-list");
    for (const { layer, direction, hits } of found.slice(0, SHOWN_DIRECTIONS)) {
      const item = el("li");
      item.append(
        directionLink(direction.key, `layer ${layer} ${direction.name}`),
        el("span", "hits muted", ` ×${hits.length}`),
      );
      hits.sort((a, b) => Math.abs(b.value ?? 0) - Math.abs(a.value ?? 0));
      for (const hit of hits.slice(0, SHOWN_VALUES)) {
        const chip = el("span", hit.target ? "chip target" : "chip", Format.fmt(hit.value));
        Dom.paint(chip, hit.value, Format.scaleOf(direction.stats));
        item.append(" ", chip);
      }
      if (hits.length > SHOWN_VALUES) item.append(" …");
      list.append(item);
    }
    results.replaceChildren(el("p", "muted", summary), list);
    if (explained.length) results.append(...explanationResults(explained));
    results.append(...featuresFound);
    results.dataset.query = query;
  }

  // The features whose explanation contains the query: each its link, sign and text.
  function explanationResults(explained) {
    const list = el("ul", "result-list explained");
    for (const feature of explained.slice(0, SHOWN_DIRECTIONS)) {
      const item = el("li");
      item.append(directionLink(feature.key, feature.name), ` ${feature.sign}: `,
        el("span", "explanation-text", feature.text));
      list.append(item);
    }
    const more = explained.length > SHOWN_DIRECTIONS ? `; the first ${SHOWN_DIRECTIONS}:` : ":";
    const count = `${Format.fmtCount(explained.length)} explanation${explained.length > 1 ? "s" : ""}`;
    return [el("p", "muted", `in ${count}${more}`), list];
  }

  // ---- page-wide controls -----------------------------------------------------------------

  function contextWidthSwitch() {
    const box = $("context-width");
    const window = META.context_window;
    const stored = store.has("sequences");
    if (!(window > Contexts.NARROW) && !stored) return box.remove(); // one width
    box.append(el("span", "muted", "context"));
    const widths = [...new Set([Math.min(Contexts.NARROW, window), window])].map((width) => ({
      label: `±${width}`,
      title: `${width} tokens on each side of the example's own token`,
      value: width,
    }));
    if (stored) {
      widths.push({
        label: "whole",
        title: `the example's whole sequence (up to ${Contexts.WHOLE} tokens around its own ` +
          "token), coloured where values were kept",
        value: Infinity,
      });
    }
    Dom.choice(box, widths, settings.width, (width) => busy(async () => {
      if (width === Infinity) settings.sequences ??= await store.get("sequences");
      settings.width = width;
      cards.redrawAll();
    }));
  }

  // Runs with --effects: at the whole width, the rows of the effects coloured by KL vs base.
  // Ticking it shows the whole width.
  function klSwitch() {
    const label = el("label", "control");
    const check = el("input");
    check.type = "checkbox";
    check.id = "colour-kl";
    label.append(check, " whole sequences by KL vs base");
    label.title = "the rows the effects ran on, coloured by KL(adapted ‖ base) at each token";
    $("context-width").after(label);
    check.addEventListener("change", () => busy(async () => {
      settings.kl ??= await store.get("kl-tokens");
      settings.colourKL = check.checked;
      const whole = $("context-width").querySelector("button:last-of-type");
      if (check.checked && settings.width !== Infinity) whole.click();
      else cards.redrawAll();
    }));
    return () => check.checked || check.click();
  }

  function logCountsSwitch() {
    const check = $("log-counts");
    check.addEventListener("change", () => {
      settings.logCounts = check.checked;
      cards.redrawAll();
    });
  }

  function crossLayerSection() {
    if (!store.has("cross-layer-cosine")) return;
    const title = `Cross-layer cosines (${page.cross_layer_vectors} vectors)`;
    const section = Dom.lazySection("panel cross-layer", title, () => {
      const figure = el("figure", "cross-figure");
      const caption = el("figcaption", "", "cosine of every pair of residual-stream vectors ");
      caption.append(Dom.scaleLegend("−1", "+1"));
      figure.append(caption);
      busy(async () => {
        const cosine = await store.get("cross-layer-cosine");
        figure.append(Plots.crossLayerCosine(cosine, tooltip, openDirection));
      });
      return figure;
    });
    $("overview").append(section);
  }

  // Runs with --baseline-neurons: their cards, in a section of their own below the layer's,
  // one collapsed group per layer; openNeurons[i]() opens the i-th, drawn the first time.
  const openNeurons = [];
  function neuronSection() {
    neuronBox.id = "neurons";
    neuronBox.setAttribute("aria-label", "Baseline neurons");
    neuronBox.append(
      el("h2", "", `Baseline neurons (${Format.fmtCount(neuronKeys.size)})`),
      el("p", "muted", "The base model's own MLP neurons (coordinates of the hidden space, " +
        "read at down_proj's input), summarised and explained as the directions are: the " +
        "control of the explanations' scores."),
    );
    for (const { layer, keys } of neuronLayers) {
      const details = el("details", "panel");
      details.append(el("summary", "", `layer ${layer} (${keys.length} neurons)`));
      const wanted = new Set(keys);
      let drawn = null;
      const open = () => {
        details.open = true;
        drawn ??= busy(async () => {
          const neurons = await store.get("baseline-neurons");
          details.append(cards.neuronView(neurons.filter((n) => wanted.has(n.key))));
        });
        return drawn;
      };
      details.addEventListener("toggle", () => details.open && open());
      openNeurons.push(open);
      neuronBox.append(details);
    }
    main.after(neuronBox);
  }

  // ---- start ------------------------------------------------------------------------------

  // Runs with --effects: the overview can also be ordered, largest first.
  const order = page.effects && el("span", "seg");
  if (order) {
    order.id = "heat-order";
    order.setAttribute("role", "group");
    order.setAttribute("aria-label", "Order");
    $("heat-scale").after(order);
  }
  const heatmap = Heatmap.create(
    $("heatmap"),
    { metric: $("heat-metric"), scale: $("heat-scale"), legend: $("heat-legend"), order },
    OVERVIEW,
  );
  if (page.effects) $("overview").after(Effects.section(page, store, tooltip, busy, klSwitch()));
  if (page.explanations) {
    ($("effects") ?? $("overview")).after(Explanations.section(page.explanations));
  }
  if (neuronKeys.size) neuronSection();
  if (features) (neuronBox.isConnected ? neuronBox : main).after(features.section);
  if (!OVERVIEW.length) {
    main.replaceChildren(el("p", "empty", "This file has no layers."));
    prev.disabled = next.disabled = select.disabled = true;
    main.dataset.state = "ready";
    return;
  }
  crossLayerSection();
  const search = Search.debounce(showResults, 150);
  searchInput.addEventListener("input", () => (searchInput.value.trim() ? search() : showResults()));
  $("notes-export").addEventListener("click", notes.exportAll);
  const importInput = $("notes-import");
  importInput.addEventListener("change", () => {
    const [file] = importInput.files;
    importInput.value = ""; // the same file can be imported again
    if (!file) return;
    busy(async () => {
      if (!(await notes.importFile(file))) return;
      main.replaceChildren(...cards.layerView(await layerData(current))); // with the imported notes
    });
  });
  contextWidthSwitch();
  logCountsSwitch();

  OVERVIEW.forEach((layer, i) => select.append(new Option(`Layer ${layer.layer}`, String(i))));
  select.addEventListener("change", () => go(Number(select.value)));
  prev.addEventListener("click", () => go(current - 1));
  next.addEventListener("click", () => go(current + 1));
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
    if (event.target.closest("input, select, textarea")) return; // they use arrows themselves
    const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    if (!step) return;
    event.preventDefault();
    go(current + step);
  });
  window.addEventListener("hashchange", () => show(indexFromHash()));
  await show(indexFromHash());
  performance.mark("dashboard-ready");
})();
