const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Format } = load("format.js");

test("unfixed gives back the rounded decimals exactly", () => {
  assert.deepEqual(Format.unfixed([3, 1234, -5, null, 0]), [1.234, -0.005, null, 0]);
  assert.deepEqual(Format.unfixed([-2, 12, -3]), [1200, -300]); // large values: e < 0
  assert.deepEqual(Format.unfixed([0]), []);
  // Division by the power of ten, not multiplication by its inverse: 0.3, not 0.30000000000000004.
  assert.equal(Format.unfixed([1, 3])[0], 0.3);
  assert.equal(Format.unfixed([5, 12345])[0], 0.12345);
});

test("numbers are shown as embedded; missing values are not finite", () => {
  assert.equal(Format.fmt(0.1234), "0.1234");
  assert.equal(Format.fmt(null), "not finite");
  assert.equal(Format.fmt(undefined), "not finite");
  assert.equal(Format.fmt4(1 / 3), "0.3333");
  assert.equal(Format.fmtCount(1234567), "1,234,567");
});

test("special characters: glyphs, and escapes in the tooltip", () => {
  assert.equal(Format.glyph(" "), "␣");
  assert.equal(Format.glyph("\u0007"), "⟨07⟩");
  assert.equal(Format.glyph("\u200b"), "⟨200B⟩");
  assert.ok(Format.isSpecial("\u202e") && !Format.isSpecial("a"));
  assert.equal(Format.escaped(" a\u200b"), '" a\\u200B"');
});

test("a direction's colour scale is its largest |activation|, never 0", () => {
  assert.equal(Format.maxAbs({ min: -3, max: 2 }), 3);
  assert.equal(Format.scaleOf({ min: 0, max: 0 }), 1);
});
