// Finding a token in every stored example: an index built once, queried per keystroke.
/* global Contexts */
/* exported Search */
const Search = (() => {
  // A token matches a query when they are equal, case and surrounding whitespace aside
  // (" Wait" is found by "wait").
  const normal = (text) => text.trim().toLowerCase();

  // The index of every token occurrence in the examples (top lists and quantile samples) of
  // `layers`, each decoded once: string id -> [[direction number, occurrence number, value,
  // is the example's own token]]. `find(query)` lists every direction whose examples contain
  // the token, strongest |value| first, with the activations at its occurrences.
  function buildIndex(strings, layers, fields) {
    const ids = new Map(); // normal text -> string ids
    strings.forEach((text, id) => {
      const key = normal(text);
      if (!ids.has(key)) ids.set(key, []);
      ids.get(key).push(id);
    });
    const directions = []; // [{layer, direction}]
    const hits = new Map();
    let occurrence = 0;
    for (const layer of layers) {
      for (const projection of Object.values(layer.projections)) {
        for (const direction of projection.directions) {
          const number = directions.push({ layer: layer.layer, direction }) - 1;
          for (const row of Contexts.exampleRows(direction)) {
            const example = Contexts.exampleOf(row, fields, direction.siblings);
            example.tokens.forEach((id, j) => {
              if (!hits.has(id)) hits.set(id, []);
              hits.get(id).push([number, occurrence++, example.activations[j], j === example.target]);
            });
          }
        }
      }
    }

    function find(query) {
      const found = new Map(); // direction number -> occurrences, in the examples' order
      for (const id of ids.get(normal(query)) || []) {
        for (const hit of hits.get(id) || []) {
          if (!found.has(hit[0])) found.set(hit[0], []);
          found.get(hit[0]).push(hit);
        }
      }
      const strongest = (list) => Math.max(...list.map((h) => Math.abs(h.value ?? 0)));
      return [...found.keys()].sort((a, b) => a - b).map((number) => ({
        ...directions[number],
        hits: found.get(number).sort((a, b) => a[1] - b[1])
          .map(([, , value, target]) => ({ value, target })),
      })).sort((a, b) => strongest(b.hits) - strongest(a.hits));
    }

    return { find };
  }

  // `f`, called once typing has paused for `wait` ms, with the last arguments.
  function debounce(f, wait) {
    let timer;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => f(...args), wait);
    };
  }

  return { buildIndex, debounce, normal };
})();
