// The embedded data: named blobs of gzip-compressed JSON in base 85, decompressed by the
// browser's own DecompressionStream when first asked for, each once.
/* exported Data */
const Data = (() => {
  // generate_html_dashboard.base85's alphabet: RFC 1924's, "." for "<".
  const ALPHABET =
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;.=>?@^_`{|}~";
  const DIGITS = new Uint8Array(128).fill(255); // character code -> digit (255: none)
  [...ALPHABET].forEach((ch, i) => (DIGITS[ch.charCodeAt(0)] = i));

  // Each 5 characters are 4 bytes (big-endian base 85 digits); a last group of n < 5 is n - 1
  // bytes, read as if padded with the largest digit.
  function bytesOf(text) {
    const rest = text.length % 5;
    if (rest === 1) throw new Error("not base 85: a group of one character");
    const padded = rest ? text + "~".repeat(5 - rest) : text;
    const bytes = new Uint8Array((padded.length / 5) * 4);
    for (let at = 0, out = 0; at < padded.length; at += 5, out += 4) {
      let value = 0;
      for (let i = at; i < at + 5; i++) {
        const digit = DIGITS[padded.charCodeAt(i)] ?? 255;
        if (digit === 255) throw new Error(`not base 85: ${padded[i]}`);
        value = value * 85 + digit; // < 2 ** 32: exact
      }
      // Each byte truncates to its lowest 8 bits.
      bytes[out] = value >>> 24;
      bytes[out + 1] = value >>> 16;
      bytes[out + 2] = value >>> 8;
      bytes[out + 3] = value;
    }
    return rest ? bytes.subarray(0, bytes.length - (5 - rest)) : bytes;
  }

  // The element's text: one blob a line, "name text".
  function blobs(text) {
    const found = new Map();
    for (const line of text.split("\n")) {
      const space = line.indexOf(" ");
      if (space > 0) found.set(line.slice(0, space), line.slice(space + 1));
    }
    return found;
  }

  async function inflate(text) {
    const stream = new Blob([bytesOf(text)]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  // has(name), and get(name): a promise of the blob's value.
  function open(element) {
    const encoded = blobs(element.textContent);
    const decoded = new Map();
    const get = (name) => {
      if (!decoded.has(name)) decoded.set(name, inflate(encoded.get(name)));
      return decoded.get(name);
    };
    return { has: (name) => encoded.has(name), get };
  }

  return { bytesOf, blobs, inflate, open };
})();
