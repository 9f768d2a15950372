// `make lint` for the dashboard's JavaScript: the parts under templates/ are browser scripts
// joined into one (each declares the one constant it exports, used by the parts after it);
// tests/js are Node's test runner files.
const js = require("@eslint/js");
const globals = require("globals");

module.exports = [
  js.configs.recommended,
  {
    files: ["templates/**/*.js"],
    languageOptions: { sourceType: "script", globals: globals.browser },
  },
  {
    files: ["tests/js/**/*.js", "eslint.config.js"],
    languageOptions: { sourceType: "commonjs", globals: globals.node },
  },
  {
    rules: {
      "no-unused-vars": ["error", { argsIgnorePattern: "^_" }],
      "prefer-const": "error",
      eqeqeq: "error",
      "no-var": "error",
    },
  },
];
