// The one tooltip of the page.
/* global Dom */
/* exported Tooltip */
const Tooltip = (() => {
  // show(box, rows): rows of [label, text], placed under (or above) `box`, in page
  // coordinates, so that it scrolls along with what it describes; hide() calls `onHide` too.
  function create(tooltip, onHide) {
    function show(box, rows) {
      tooltip.replaceChildren(...rows.map(([label, text]) => {
        const row = Dom.el("div");
        row.append(Dom.el("span", "tip-label", label), Dom.el("span", "tip-value", text));
        return row;
      }));
      tooltip.hidden = false;
      const width = document.documentElement.clientWidth;
      const left = Math.max(4, Math.min(box.left, width - tooltip.offsetWidth - 4));
      const below = box.bottom + 6 + tooltip.offsetHeight <= window.innerHeight;
      const top = below ? box.bottom + 6 : box.top - tooltip.offsetHeight - 6;
      tooltip.style.left = `${left + window.scrollX}px`;
      tooltip.style.top = `${top + window.scrollY}px`;
    }

    function hide() {
      tooltip.hidden = true;
      onHide();
    }

    return { show, hide };
  }

  return { create };
})();
