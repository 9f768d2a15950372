// Examples and their contexts, pure: rows to objects, what a row shows at a width.
/* global Format */
/* exported Contexts */
const Contexts = (() => {
  const NARROW = 3; // the narrow context width, in tokens on each side of the target
  const WHOLE = 1000; // a stored sequence longer than this is cut around the target

  // Examples are embedded as rows of `fields` (the page's example_fields), without
  // "activation" (it is the activation at the target), their sibling activations in the order
  // of the direction's `siblings`: objects are made only for the examples in use. Attribution
  // examples (fields: the page's attribution_fields) get their attributions and attribution.
  function exampleOf(row, fields, siblings) {
    const example = Object.fromEntries(fields.map((field, i) => [field, row[i]]));
    example.activations = Format.unfixed(example.activations);
    if (example.attributions) {
      example.attributions = Format.unfixed(example.attributions);
      example.attribution = example.attributions[example.target];
    }
    if (example.sibling_activations) {
      example.sibling_activations = Object.fromEntries(
        siblings.map((m, i) => [m, Format.unfixed(example.sibling_activations[i])]));
    }
    example.activation = example.activations[example.target];
    return example;
  }

  // Every example row of a direction: its top lists, then its quantile samples.
  const exampleRows = (direction) => [
    ...direction.top_positive,
    ...direction.top_negative,
    ...direction.quantile_samples.flatMap((samples) => samples.examples),
  ];

  // What a row shows at context width `width` (tokens on each side; Infinity: the whole stored
  // `sequence`, if any) of a run with window `window`: ±width, the kept window, or the
  // sequence (values undefined outside the window). first: the sequence position of tokens[0].
  function shownTokens(example, values, width, window, sequence) {
    const start = example.token_index - example.target; // the window's place in its sequence
    if (width === Infinity && sequence) {
      const first = Math.max(0, example.token_index - WHOLE / 2);
      const tokens = sequence.slice(first, first + WHOLE);
      const known = (p) => (p >= 0 && p < values.length ? values[p] : undefined);
      return {
        tokens, first, cut: first + tokens.length < sequence.length,
        values: tokens.map((_, i) => known(first + i - start)),
      };
    }
    const lo = width >= window ? 0 : Math.max(0, example.target - width);
    const hi = width >= window
      ? example.tokens.length : Math.min(example.tokens.length, example.target + width + 1);
    return {
      tokens: example.tokens.slice(lo, hi), values: values.slice(lo, hi), first: start + lo,
      cut: false,
    };
  }

  return { NARROW, WHOLE, exampleOf, exampleRows, shownTokens };
})();
