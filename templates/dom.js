// Building elements. Text from the data, and from notes (stored or imported), is only ever
// inserted with textContent (or as Text nodes).
/* global Format */
/* exported Dom */
const Dom = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Special characters as faint glyphs around their raw character (see Format.isSpecial).
  function appendText(parent, text) {
    let run = "";
    for (const ch of text) {
      if (!Format.isSpecial(ch)) {
        run += ch;
        continue;
      }
      if (run) parent.append(run);
      run = "";
      const mark = el("span", "ws", ch);
      mark.dataset.glyph = Format.glyph(ch);
      parent.append(mark);
    }
    if (run) parent.append(run);
  }

  function tokenText(text, className = "tok-text") {
    const span = el("span", className);
    appendText(span, text);
    return span;
  }

  // Background alpha is |value| / scale, with scale shared by every token of one view. A value
  // that was NaN or Inf in the run (null here) is drawn grey.
  function paint(node, value, scale) {
    if (!Format.finite(value)) {
      node.classList.add("void");
      return;
    }
    const alpha = Math.min(1, Math.abs(value) / scale);
    node.classList.add(value < 0 ? "neg" : "pos");
    if (alpha > 0.6) node.classList.add("strong");
    node.style.setProperty("--a", alpha.toFixed(3));
  }

  // low to high: negative to positive colour, or from the background ("one-sided").
  function scaleLegend(low, high, kind = "") {
    const legend = el("span", kind ? `scale ${kind}` : "scale");
    legend.append(el("span", "", low), el("span", "scale-bar"), el("span", "", high));
    return legend;
  }

  function scroller(child) {
    const box = el("div", "scroll");
    box.append(child);
    return box;
  }

  // A collapsed section whose content is built the first time it is opened.
  function lazySection(className, title, build) {
    const details = el("details", className);
    details.append(el("summary", "", title));
    details.addEventListener("toggle", () => {
      if (details.open && details.childElementCount === 1) details.append(build());
    });
    return details;
  }

  // Buttons of which one is on (a card's view, the context width): `pick` gets its value.
  function choice(group, items, current, pick) {
    const buttons = items.map(({ label, title, value }) => {
      const button = el("button", "", label);
      button.type = "button";
      button.title = title;
      button.setAttribute("aria-pressed", String(value === current));
      button.addEventListener("click", () => {
        for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
        pick(value);
      });
      return button;
    });
    group.append(...buttons);
  }

  return { el, svg, tokenText, paint, scaleLegend, scroller, lazySection, choice };
})();
