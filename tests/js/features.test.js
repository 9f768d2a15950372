const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Features } = load("format.js", "contexts.js", "search.js", "dom.js", "features.js");

// Three directions (numbers 0, 1, 2) and four features' list rows.
const DIRECTIONS = [
  { layer: 0, key: "L0.gate_proj[0]", name: "gate_proj" },
  { layer: 0, key: "L0.up_proj[0]", name: "up_proj" },
  { layer: 1, key: "L1.gate_proj[0]", name: "gate_proj" },
];
const ROWS = [
  { index: 0, frequency: 0.1, detection: null, text: null, tokens: [0], composition: [[2, 0.9], [0, -0.1]] },
  { index: 2, frequency: 0.3, detection: 0.7, text: "Wait, then", tokens: [1], composition: [[0, -0.8], [1, 0.5]] },
  { index: 3, frequency: 0.3, detection: 0.9, text: null, tokens: [2], composition: [[0, 0.6]] },
  { index: 5, frequency: 0.05, detection: 0.7, text: "numbers", tokens: [], composition: [] },
];
const STRINGS = ["a", " Wait", "x"];
const order = (by) => Features.sortRows(ROWS, by).map((row) => row.index);

test("the list sorts by frequency, score and composition; ties keep the list's order", () => {
  assert.deepEqual(order("index"), [0, 2, 3, 5]);
  assert.deepEqual(order("frequency"), [2, 3, 0, 5]);
  assert.deepEqual(order("detection"), [3, 2, 5, 0]); // unexplained last
  // by the top direction's place in the page, then its |weight|; no composition last
  assert.deepEqual(order("composition"), [2, 3, 0, 5]);
});

test("each direction's features: the compositions inverted, largest |weight| first", () => {
  const found = Features.invert(ROWS, DIRECTIONS);
  assert.deepEqual(found.get("L0.gate_proj[0]"), [
    { index: 2, weight: -0.8 }, { index: 3, weight: 0.6 }, { index: 0, weight: -0.1 },
  ]);
  assert.deepEqual(found.get("L0.up_proj[0]"), [{ index: 2, weight: 0.5 }]);
  assert.deepEqual(found.get("L1.gate_proj[0]"), [{ index: 0, weight: 0.9 }]);
});

test("search finds a feature by its explanation or a top token", () => {
  const found = (query) => Features.matching(ROWS, query, STRINGS).map((row) => row.index);
  assert.deepEqual(found("NUMBERS"), [5]);
  assert.deepEqual(found("wait"), [2]); // in the text, and the top token " Wait"
  assert.deepEqual(found("x"), [3]);
  assert.deepEqual(found("  "), []);
});

test("evenly spaced edges are expanded from their first and step", () => {
  const { edges, counts } = Features.expandEdges({ first: 0, step: 0.1, counts: [5, 1, 1] });
  assert.deepEqual(edges, [0, 0.1, 0.2, 0.3]);
  assert.deepEqual(counts, [5, 1, 1]);
  const given = { edges: [0, 1, 3], counts: [1, 1] };
  assert.equal(Features.expandEdges(given), given);
});
