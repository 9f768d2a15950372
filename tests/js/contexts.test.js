const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Contexts } = load("format.js", "contexts.js");
const FIELDS = ["example_index", "token_index", "target", "tokens", "activations",
  "sibling_activations"];

// A window of `length` tokens (ids 100..), its target at `target`, at sequence position `at`.
function example(length, target, at, index = 7) {
  const row = [index, at, target, [...Array(length).keys()].map((i) => 100 + i),
    [0, ...[...Array(length).keys()].map((i) => i * 10)]];
  return Contexts.exampleOf(row, FIELDS, []);
}

test("a row becomes an example: fixed-point values, its activation at the target", () => {
  const row = [3, 40, 1, [5, 6, 7], [2, 150, -275, null], [[1, 5, 6, 7], [0, 1, 2, 3]]];
  const e = Contexts.exampleOf(row, FIELDS, ["up_proj", "down_proj"]);
  assert.deepEqual(e.activations, [1.5, -2.75, null]);
  assert.equal(e.activation, -2.75);
  assert.deepEqual(e.sibling_activations, { up_proj: [0.5, 0.6, 0.7], down_proj: [1, 2, 3] });
  const bare = Contexts.exampleOf(row.slice(0, 5), FIELDS, undefined);
  assert.equal(bare.sibling_activations, undefined);
});

test("shown tokens at a narrow width, the window, and whole sequences", () => {
  const e = example(21, 10, 50); // window 10 on each side
  const values = e.activations;
  const narrow = Contexts.shownTokens(e, values, 3, 10, undefined);
  assert.deepEqual(narrow.tokens, [107, 108, 109, 110, 111, 112, 113]);
  assert.deepEqual(narrow.values, [70, 80, 90, 100, 110, 120, 130]);
  assert.equal(narrow.first, 47); // the sequence position of the first shown token
  const all = Contexts.shownTokens(e, values, 10, 10, undefined);
  assert.equal(all.tokens.length, 21);
  assert.equal(all.first, 40);
  // Clipped at the sequence's start: the target is the window's second token.
  const early = example(5, 1, 1);
  assert.deepEqual(Contexts.shownTokens(early, early.activations, 3, 10).tokens, [100, 101, 102, 103, 104]);
  assert.deepEqual(Contexts.shownTokens(early, early.activations, 0, 10).tokens, [101]);
  // Whole: the stored sequence, values only on the window; without one, the window.
  const sequence = [...Array(70).keys()].map((i) => 1000 + i);
  const whole = Contexts.shownTokens(e, values, Infinity, 10, sequence);
  assert.equal(whole.tokens.length, 70);
  assert.equal(whole.first, 0);
  assert.equal(whole.cut, false);
  assert.equal(whole.values[39], undefined);
  assert.equal(whole.values[40], 0);
  assert.equal(whole.values[60], 200);
  assert.equal(whole.values[61], undefined);
  assert.equal(Contexts.shownTokens(e, values, Infinity, 10, undefined).tokens.length, 21);
});

test("a long sequence is cut to WHOLE tokens around the target", () => {
  const far = example(21, 10, 5000);
  const sequence = [...Array(8000).keys()];
  const { tokens, first, cut, values } = Contexts.shownTokens(far, far.activations, Infinity, 10, sequence);
  assert.equal(tokens.length, Contexts.WHOLE);
  assert.equal(first, 5000 - Contexts.WHOLE / 2);
  assert.ok(cut);
  assert.equal(values[Contexts.WHOLE / 2], 100); // the target's value, at its place
});
