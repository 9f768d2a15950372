const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Effects, Contexts } = load("format.js", "contexts.js", "dom.js", "effects.js");

// Two layers; rank-2 gate_proj in both, up_proj only in layer 7.
const OVERVIEW = [
  {
    layer: 3,
    directions: [
      { key: "L3.gate_proj[0]", name: "gate_proj[0]", ablation_kl: 0.25 },
      { key: "L3.gate_proj[1]", name: "gate_proj[1]", ablation_kl: 0.5 },
    ],
  },
  {
    layer: 7,
    directions: [
      { key: "L7.gate_proj[0]", name: "gate_proj[0]", ablation_kl: 0.125 },
      { key: "L7.gate_proj[1]", name: "gate_proj[1]", ablation_kl: 0.0625 },
      { key: "L7.up_proj", name: "up_proj", ablation_kl: 0.5 },
    ],
  },
];

test("the module × layer grid sums a module's components and opens the largest", () => {
  const cells = Effects.grid(OVERVIEW, ["gate_proj", "up_proj"], "ablation_kl");
  assert.deepEqual(cells, [
    [
      { value: 0.75, key: "L3.gate_proj[1]", components: 2 },
      { value: 0.1875, key: "L7.gate_proj[0]", components: 2 },
    ],
    [null, { value: 0.5, key: "L7.up_proj", components: 1 }],
  ]);
});

test("ranks: largest first, ties share a rank, out of every direction", () => {
  const { rank, total } = Effects.ranks(OVERVIEW, "ablation_kl");
  assert.equal(total, 5);
  assert.equal(rank.get("L3.gate_proj[1]"), 1);
  assert.equal(rank.get("L7.up_proj"), 1); // tied with it
  assert.equal(rank.get("L3.gate_proj[0]"), 3);
  assert.equal(rank.get("L7.gate_proj[0]"), 4);
  assert.equal(rank.get("L7.gate_proj[1]"), 5);
});

test("divergence: the first token where a continuation departs from the plain one", () => {
  assert.equal(Effects.divergence([1, 2, 3, 4], [1, 2, 9, 4]), 2); // marked from index 2 on
  assert.equal(Effects.divergence([5, 2], [1, 2]), 0);
  assert.equal(Effects.divergence([1, 2, 3], [1, 2, 3]), 3); // the same: nothing marked
  assert.equal(Effects.divergence([1, 2], [1, 2, 3]), 2); // stops earlier: nothing to mark
  assert.equal(Effects.divergence([1, 2, 3, 4], [1, 2]), 2); // goes on: the rest is marked
  assert.equal(Effects.divergence([], [1]), 0);
});

test("an attribution example row: attributions decoded, attribution at the target", () => {
  const fields = ["example_index", "token_index", "target", "tokens", "activations",
    "attributions"];
  const row = [2, 9, 1, [5, 6, 7], [2, 150, -275, 10], [5, 12, -340, 7]];
  const e = Contexts.exampleOf(row, fields, undefined);
  assert.deepEqual(e.attributions, [0.00012, -0.0034, 0.00007]);
  assert.equal(e.attribution, -0.0034);
  assert.equal(e.activation, -2.75);
});
