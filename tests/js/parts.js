// The dashboard's parts (templates/*.js) loaded as the page joins them: each part sees the
// constants of those loaded before it. Each test file runs in a process of its own.
const fs = require("node:fs");
const path = require("node:path");
const vm = require("node:vm");

const TEMPLATES = path.join(__dirname, "..", "..", "templates");

// load("format.js", "contexts.js") -> {Format, Contexts}: each file's constant, named after it.
function load(...files) {
  const loaded = {};
  for (const file of files) {
    vm.runInThisContext(fs.readFileSync(path.join(TEMPLATES, file), "utf8"), { filename: file });
    const name = path.basename(file, ".js");
    const exported = name[0].toUpperCase() + name.slice(1);
    loaded[exported] = vm.runInThisContext(exported);
  }
  return loaded;
}

module.exports = { load };
