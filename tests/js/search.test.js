const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Search } = load("format.js", "contexts.js", "search.js");
const FIELDS = ["example_index", "token_index", "target", "tokens", "activations"];
const STRINGS = [" Wait", "wait", "the", "WAIT ", "x"];

const row = (tokens, values, target = 0) => [0, target, target, tokens, [1, ...values]];
const direction = (key, top, samples = []) => ({
  key, name: key, top_positive: top, top_negative: [], quantile_samples: [{ examples: samples }],
});
const LAYERS = [
  { layer: 0, projections: { gate_proj: { directions: [
    direction("a", [row([0, 2, 1], [10, 20, 30])], [row([4, 3], [5, -90], 1)]),
  ] } } },
  { layer: 1, projections: { up_proj: { directions: [
    direction("b", [row([2, 2], [1, 2])]),
    direction("c", [row([0], [-40])]),
  ] } } },
];

test("a token is found case and surrounding whitespace aside, strongest direction first", () => {
  const index = Search.buildIndex(STRINGS, LAYERS, FIELDS);
  const found = index.find("  wAit");
  assert.deepEqual(found.map((f) => f.direction.key), ["a", "c"]); // |-9.0| beats |-4.0|
  assert.deepEqual(found.map((f) => f.layer), [0, 1]);
  // " Wait", "wait" and "WAIT " all match, in the examples' order.
  assert.deepEqual(found[0].hits, [
    { value: 1, target: true }, { value: 3, target: false }, { value: -9, target: true },
  ]);
  assert.deepEqual(found[1].hits, [{ value: -4, target: true }]);
  assert.deepEqual(index.find("the").map((f) => [f.direction.key, f.hits.length]), [["a", 1], ["b", 2]]);
  assert.deepEqual(index.find("nothing"), []);
  assert.deepEqual(index.find("wai"), []); // whole tokens only
});

test("the index decodes each example once, not per query", () => {
  let decoded = 0;
  const counting = LAYERS.map((layer) => ({
    ...layer,
    projections: Object.fromEntries(Object.entries(layer.projections).map(([m, p]) => [m, {
      directions: p.directions.map((d) => ({
        ...d,
        get top_positive() { decoded++; return d.top_positive; },
      })),
    }])),
  }));
  const index = Search.buildIndex(STRINGS, counting, FIELDS);
  const once = decoded;
  for (const query of ["wait", "the", "x", "w", "wa"]) index.find(query);
  assert.equal(decoded, once);
});

test("debounce: one call, with the last arguments, once calls pause", async () => {
  const calls = [];
  const f = Search.debounce((x) => calls.push(x), 20);
  f(1);
  f(2);
  f(3);
  assert.deepEqual(calls, []);
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.deepEqual(calls, [3]);
  f(4);
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.deepEqual(calls, [3, 4]);
});
