// SVG plots: histograms, position profiles and the cross-layer cosine matrix.
/* global Dom, Format */
/* exported Plots */
const Plots = (() => {
  const { el, svg } = Dom;
  const { fmt, fmt4, fmtCount, finite } = Format;

  // An SVG plot: its root, the inner box, and helpers for labels and lines.
  function plotFrame(className, width, height, [left, right, top, bottom]) {
    const viewBox = `0 0 ${width} ${height}`;
    const root = svg("svg", { viewBox, class: `plot ${className}`, role: "img" });
    const box = {
      left, top, right: width - right, bottom: height - bottom,
      width: width - left - right, height: height - top - bottom,
    };
    const label = (text, x, y, anchor, attrs = {}) =>
      root.append(svg("text", { x, y, "text-anchor": anchor, ...attrs }, text));
    const line = (x1, y1, x2, y2, cls) => root.append(svg("line", { x1, y1, x2, y2, class: cls }));
    const yTitle = (text) =>
      label(text, -(box.top + box.height / 2), 10, "middle", { transform: "rotate(-90)" });
    return { root, box, label, line, yTitle };
  }

  // The histogram, and `mark(value)`, which draws a value as a line on it (null: none).
  function histogram(hist, logCounts) {
    const plot = plotFrame("hist", 320, 120, [44, 10, 8, 28]);
    const { box, label, line } = plot;
    const { edges, counts } = hist;
    const lo = edges[0];
    const hi = edges[edges.length - 1];
    const x = (v) => box.left + ((v - lo) / (hi - lo || 1)) * box.width;
    const f = logCounts ? (c) => Math.log10(1 + c) : (c) => c;
    const top = Math.max(...counts.map(f)) || 1;
    counts.forEach((count, i) => {
      if (!count) return;
      const h = Math.max((f(count) / top) * box.height, 0.5);
      const center = (edges[i] + edges[i + 1]) / 2;
      const bar = svg("rect", {
        x: x(edges[i]),
        y: box.bottom - h,
        width: Math.max(x(edges[i + 1]) - x(edges[i]) - 0.4, 0.6),
        height: h,
        class: center < 0 ? "bar neg" : "bar pos",
      });
      const range = `[${fmt4(edges[i])}, ${fmt4(edges[i + 1])})`;
      bar.append(svg("title", {}, `${range}: ${fmtCount(count)}`));
      plot.root.append(bar);
    });
    line(box.left, box.bottom, box.right, box.bottom, "axis");
    line(box.left, box.top, box.left, box.bottom, "axis");
    if (lo < 0 && hi > 0) {
      line(x(0), box.top, x(0), box.bottom + 4, "zero");
      const clear = 28; // px: "0" where it does not run into the end labels
      if (x(0) - box.left > clear && box.right - x(0) > clear) {
        label("0", x(0), box.bottom + 13, "middle");
      }
    }
    label(fmt4(lo), box.left, box.bottom + 13, "start");
    label(fmt4(hi), box.right, box.bottom + 13, "end");
    label("activation", box.left + box.width / 2, box.bottom + 26, "middle");
    label(logCounts ? `10^${top.toFixed(1)}` : fmtCount(top), box.left - 4, box.top + 8, "end");
    label("0", box.left - 4, box.bottom, "end");
    label(logCounts ? "log n" : "count", box.left - 4, box.top + box.height / 2, "end");
    const marker = svg("line", { y1: box.top, y2: box.bottom, class: "marker" });
    plot.root.append(marker);
    const mark = (value) => {
      const shown = finite(value);
      if (shown) {
        const at = Math.min(box.right, Math.max(box.left, x(value)));
        marker.setAttribute("x1", at);
        marker.setAttribute("x2", at);
      }
      marker.setAttribute("visibility", shown ? "visible" : "hidden");
    };
    mark(null);
    return { root: plot.root, mark };
  }

  // Mean activation by token position: equal widths for the power-of-two buckets, a gap where
  // a bucket holds no token.
  function positionProfile({ edges, mean, count }) {
    const plot = plotFrame("profile", 320, 130, [48, 10, 8, 32]);
    const { box, label, line } = plot;
    const values = mean.filter(finite);
    const lo = Math.min(0, ...values);
    const hi = Math.max(0, ...values);
    const step = box.width / mean.length;
    const x = (i) => box.left + i * step;
    const y = (v) => box.top + ((hi - v) / (hi - lo || 1)) * box.height;
    let path = "";
    mean.forEach((v, i) => {
      if (!finite(v)) return;
      path += `${finite(mean[i - 1]) ? "L" : "M"}${x(i + 0.5)},${y(v)}`;
      const sign = v < 0 ? "neg" : "pos";
      const point = svg("circle", { cx: x(i + 0.5), cy: y(v), r: 2.2, class: sign });
      const positions = `positions ${edges[i]}–${edges[i + 1] - 1}`;
      point.append(svg("title", {}, `${positions}: mean ${fmt(v)}, ${fmtCount(count[i])} tokens`));
      plot.root.append(point);
    });
    plot.root.prepend(svg("path", { d: path, class: "trace" }));
    line(box.left, box.top, box.left, box.bottom, "axis");
    line(box.left, box.bottom, box.right, box.bottom, "axis");
    line(box.left, y(0), box.right, y(0), "zero");
    const every = Math.ceil(edges.length / 8); // so that the position labels do not overlap
    edges.forEach((edge, i) => {
      if (i % every === 0) label(String(edge), x(i), box.bottom + 12, "middle");
    });
    label(fmt4(hi), box.left - 4, box.top + 8, "end");
    label(fmt4(lo), box.left - 4, box.bottom, "end");
    label("token position", box.left + box.width / 2, box.bottom + 28, "middle");
    plot.yTitle("mean activation");
    return plot.root;
  }

  const rgbOf = (name) =>
    getComputedStyle(document.documentElement).getPropertyValue(name).split(",").map(Number);

  // The matrix as an image, one pixel a cell: cheaper than tens of thousands of elements.
  function cosineImage(matrix) {
    const n = matrix.length;
    const canvas = el("canvas");
    canvas.width = canvas.height = n;
    const context = canvas.getContext("2d");
    const image = context.createImageData(n, n);
    const [pos, neg] = [rgbOf("--pos-rgb"), rgbOf("--neg-rgb")];
    matrix.forEach((row, i) => row.forEach((v, j) => {
      const at = 4 * (i * n + j);
      image.data.set([...(v < 0 ? neg : pos), Math.round(Math.min(1, Math.abs(v)) * 255)], at);
    }));
    context.putImageData(image, 0, 0);
    return canvas.toDataURL("image/png");
  }

  // The full matrix from its upper triangle above the diagonal (ones on it), as embedded.
  const symmetric = (upper) => upper.map((_, i) => upper.map((__, j) =>
    i === j ? 1 : i < j ? upper[i][j - i - 1] : upper[j][i - j - 1]));

  // One tick per layer, named where the names fit; hovering a cell shows its two vectors
  // (`tooltip`), clicking it opens the row's direction (`open(key)`).
  function crossLayerCosine({ labels, vectors, upper }, tooltip, open) {
    const matrix = symmetric(upper);
    const size = 360;
    const plot = plotFrame("cross", size + 60, size + 44, [50, 10, 6, 38]);
    const { box, label, line } = plot;
    const cell = size / labels.length;
    plot.root.append(svg("image", {
      href: cosineImage(matrix), x: box.left, y: box.top, width: size, height: size,
      preserveAspectRatio: "none",
    }));
    const startsLayer = (i) => i === 0 || vectors[i].layer !== vectors[i - 1].layer;
    const starts = [...labels.keys()].filter(startsLayer);
    const every = Math.ceil(starts.length / 16);
    starts.forEach((start, n) => {
      const at = start * cell;
      line(box.left + at, box.bottom, box.left + at, box.bottom + 3, "axis");
      line(box.left - 3, box.top + at, box.left, box.top + at, "axis");
      if (n % every) return;
      const name = `L${vectors[start].layer}`;
      label(name, box.left + at, box.bottom + 13, "start", { class: "tick" });
      label(name, box.left - 4, box.top + at + 8, "end", { class: "tick" });
    });
    const axis = "read (A) and write (B) vectors, by layer";
    label(axis, box.left + size / 2, box.bottom + 32, "middle");
    plot.yTitle(axis);

    const cellAt = (event) => {
      const rect = plot.root.querySelector("image").getBoundingClientRect();
      const i = Math.floor(((event.clientY - rect.top) / rect.height) * labels.length);
      const j = Math.floor(((event.clientX - rect.left) / rect.width) * labels.length);
      return i >= 0 && j >= 0 && i < labels.length && j < labels.length ? [i, j] : null;
    };
    plot.root.addEventListener("pointermove", (event) => {
      const at = cellAt(event);
      if (!at) return tooltip.hide();
      const [i, j] = at;
      const pointer = { left: event.clientX + 8, top: event.clientY, bottom: event.clientY + 8 };
      tooltip.show(pointer, [["row", labels[i]], ["column", labels[j]], ["cosine", fmt(matrix[i][j])]]);
    });
    plot.root.addEventListener("pointerleave", () => tooltip.hide());
    plot.root.addEventListener("click", (event) => {
      const at = cellAt(event);
      if (at) open(vectors[at[0]].key);
    });
    return plot.root;
  }

  return { histogram, positionProfile, crossLayerCosine, symmetric };
})();
