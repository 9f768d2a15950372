const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Explanations } = load("format.js", "contexts.js", "search.js", "dom.js",
  "explanations.js");

const score = (value, ci = null, n = 8) => ({ score: value, ci, n });
// A feature as the page embeds it; `shuffled` scores both measures alike.
function feature(key, sign, detection, fuzzing, { group = "lora", shuffled = 0.5, text = "" } = {}) {
  return {
    key, name: key, group, sign, text, detection: score(detection), fuzzing: score(fuzzing),
    shuffled: { detection: score(shuffled), fuzzing: score(shuffled) },
  };
}

test("scores: two decimals, the interval, n; nothing scored is a dash", () => {
  assert.equal(Explanations.fmtScore(score(0.8125, [0.7, 0.9], 16)), "0.81 [0.70, 0.90] n=16");
  assert.equal(Explanations.fmtScore(score(1, [1, 1], 2)), "1.00 [1.00, 1.00] n=2");
  assert.equal(Explanations.fmtScore(score(null, null, 0)), "— n=0");
  assert.equal(Explanations.fmtScore(score(0.5, null, 1234)), "0.50 n=1,234");
  assert.equal(Explanations.fmtMean({ mean: 0.74, ci: [0.64, 0.82], n: 12 }),
    "0.74 [0.64, 0.82] n=12");
});

test("the headline's difference: signed, a true minus sign", () => {
  assert.equal(Explanations.fmtDifference({ mean: 0.04, ci: [-0.02, 0.1] }),
    "+0.04 [\u22120.02, 0.10]");
  assert.equal(Explanations.fmtDifference({ mean: -0.125, ci: [-0.3, -0.01] }),
    "\u22120.13 [\u22120.30, \u22120.01]");
  assert.equal(Explanations.fmtDifference({ mean: 0, ci: null }), "+0.00");
  assert.equal(Explanations.fmtDifference({ mean: null, ci: null }), "—");
});

test("a score line: detection with its AUROC where a local scorer gave one, then fuzzing", () => {
  const f = feature("a", "positive", 0.75, 0.5);
  f.detection.auroc = 0.875;
  assert.equal(Explanations.scoreLine(f), "detection 0.75 n=8, AUROC 0.88 · fuzzing 0.50 n=8");
  assert.equal(Explanations.scoreLine(f.shuffled), "detection 0.50 n=8 · fuzzing 0.50 n=8");
  f.detection.auroc = null;
  assert.equal(Explanations.scoreLine(f), "detection 0.75 n=8 · fuzzing 0.50 n=8");
});

test("sorting: by either score, either way; unscored last; ties and the default in page order", () => {
  const features = [
    feature("a", "positive", 0.5, 0.9),
    feature("a", "negative", null, 0.1),
    feature("b", "positive", 0.75, null),
    feature("c", "negative", 0.5, 0.6),
    feature("d", "positive", 1, 0.6),
  ];
  const order = (column, descending) => Explanations.sortFeatures(features, column, descending)
    .map((f) => features.indexOf(f));
  assert.deepEqual(order("detection", true), [4, 2, 0, 3, 1]);
  assert.deepEqual(order("detection", false), [0, 3, 2, 4, 1]);
  assert.deepEqual(order("fuzzing", true), [0, 3, 4, 1, 2]);
  assert.deepEqual(order("fuzzing", false), [1, 3, 4, 0, 2]);
  assert.deepEqual(order(null, true), [0, 1, 2, 3, 4]);
  assert.notEqual(Explanations.sortFeatures(features, null), features); // a copy
});

test("by key: each direction's or neuron's signs", () => {
  const features = [feature("a", "positive", 1, 1), feature("a", "negative", 0, 0),
    feature("n", "negative", 0.5, 0.5, { group: "neurons" })];
  const found = Explanations.byKey(features);
  assert.deepEqual([...found.keys()], ["a", "n"]);
  assert.equal(found.get("a").negative, features[1]);
  assert.deepEqual(Object.keys(found.get("n")), ["negative"]);
});

test("the groups' scores: LoRA and neurons their own, shuffled the LoRA features' baseline", () => {
  const features = [
    feature("a", "positive", 0.75, 0.5, { shuffled: 0.25 }),
    feature("a", "negative", null, 0.5, { shuffled: 0.5 }),
    feature("n", "positive", 1, 0, { group: "neurons", shuffled: 0 }),
  ];
  assert.deepEqual(Explanations.groupScores(features, "detection"),
    { lora: [0.75], neurons: [1], shuffled: [0.25, 0.5] });
  assert.deepEqual(Explanations.groupScores(features, "fuzzing"),
    { lora: [0.5, 0.5], neurons: [0], shuffled: [0.25, 0.5] });
});

test("the strip plot's geometry: bands side by side, values upwards, dots inside their band", () => {
  const groups = [
    { scores: [0, 0.5, 1, 1, 1], mean: 0.7, ci: [0.4, 0.9] },
    { scores: [0.25], mean: 0.25, ci: null },
    { scores: [], mean: null, ci: null },
  ];
  const { y, groups: placed } = Explanations.stripGeometry(groups);
  // pad: left 34, right 8, top 10, bottom 34 of 300 × 190: bands of (300 - 42) / 3 = 86.
  assert.equal(y(1), 10);
  assert.equal(y(0), 156);
  assert.equal(y(0.5), 83);
  assert.deepEqual(placed.map((g) => g.center), [77, 163, 249]);
  assert.deepEqual(placed.map((g) => g.half), [34.4, 34.4, 34.4]);
  placed.forEach((g, i) => {
    assert.deepEqual(g.dots.map((d) => d.cy), groups[i].scores.map(y));
    for (const dot of g.dots) assert.ok(Math.abs(dot.cx - g.center) <= 86 * 0.35);
  });
  const xs = placed[0].dots.map((d) => d.cx);
  assert.equal(new Set(xs).size, xs.length); // equal scores are spread apart
  assert.deepEqual(Explanations.stripGeometry(groups).groups, placed); // the same every time
  assert.equal(placed[0].mean, y(0.7));
  assert.deepEqual(placed[0].ci, [y(0.9), y(0.4)]);
  assert.equal(placed[2].mean, null);
  assert.equal(placed[1].ci, null);
});

test("matching: explanation text containing the query, case and surrounding space aside", () => {
  const features = [
    feature("a", "positive", 1, 1, { text: "Dates in French" }),
    feature("b", "negative", 1, 1, { text: "the word 'date' after a number" }),
    feature("c", "positive", 1, 1, { text: "closing brackets" }),
  ];
  const keys = (query) => Explanations.matching(features, query).map((f) => f.key);
  assert.deepEqual(keys("date"), ["a", "b"]);
  assert.deepEqual(keys("  FRENCH "), ["a"]);
  assert.deepEqual(keys("in french"), ["a"]);
  assert.deepEqual(keys("nowhere"), []);
  assert.deepEqual(keys("   "), []);
});
