const assert = require("node:assert/strict");
const { test } = require("node:test");
const { load } = require("./parts");

const { Data } = load("data.js");

// Known answers: bytes and what generate_html_dashboard.base85 writes for them.
const VECTORS = [
  [[], ""],
  [[68], "L;"],
  [[32, 130], "Ac6"],
  [[60, 253, 230], "JpJY"],
  [[241, 194, 107, 48], "@xp5`"],
  [[249, 14, 199, 221, 1], "`3}e30R"],
  [[228, 136, 117, 52, 162, 15, 11, 13, 4], ".cM`Nq7MrV1O"], // "." is RFC 1924's "<"
  [[0, 0, 0, 0, 255, 255, 255, 255, 0x3c], "00000|NsC0JO"],
];

test("base 85 text gives back its bytes, a last short group included", () => {
  for (const [bytes, text] of VECTORS) assert.deepEqual([...Data.bytesOf(text)], bytes, text);
  assert.throws(() => Data.bytesOf("abcdef"), /a group of one character/);
  assert.throws(() => Data.bytesOf("ab<de"), /not base 85: </);
});

test("a blob is gzip-compressed JSON: lone surrogates and line separators survive", async () => {
  // generate_html_dashboard._compressed({"a": [1, 2.5, None], "s": "\ud800<\u2028"})
  const blob = "ABzY8000000t2g7N>s9nHq.fFGu6o}&B=+?Q7TrlQi>@}u`n>OdDO5%sTKfSk^)O30000";
  assert.deepEqual(await Data.inflate(blob), { a: [1, 2.5, null], s: "\ud800<\u2028" });
});

test("the data element's lines: a name, a space, the blob", () => {
  const found = Data.blobs("\nindex AB\nlayer-0 C.D\n");
  assert.deepEqual([...found], [["index", "AB"], ["layer-0", "C.D"]]);
});
