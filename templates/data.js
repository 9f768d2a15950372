// The embedded data: named blobs of gzip-compressed JSON in base64, decompressed by the
// browser's own DecompressionStream when first asked for, each once.
/* exported Data */
const Data = (() => {
  // The element's text: one blob a line, "name base64".
  function blobs(text) {
    const found = new Map();
    for (const line of text.split("\n")) {
      const space = line.indexOf(" ");
      if (space > 0) found.set(line.slice(0, space), line.slice(space + 1));
    }
    return found;
  }

  async function inflate(base64) {
    const binary = atob(base64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
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

  return { blobs, inflate, open };
})();
