// Line charts of a task's history, drawn as SVG by hand. One point (circle.pt) per round
// with a value; a round without one (null) breaks the line instead of inventing a value.

import { h, s, isNumber, num } from "./dom.js";

const W = 420;
const H = 200;
const PAD = { left: 58, right: 14, top: 14, bottom: 34 };

function scale(lo, hi, from, to) {
  const span = hi - lo || 1;
  return (v) => from + ((v - lo) / span) * (to - from);
}

// Counts get a round top (0, half, top all whole numbers); other values a margin.
function niceHalf(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (m * power >= value && Number.isInteger(m * power)) return m * power;
  }
  return Math.ceil(value);
}

function yRange(values, counts) {
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  if (counts) return [Math.min(0, lo), 2 * niceHalf(Math.max(hi, 1) / 2)];
  const margin = hi === lo ? Math.abs(hi) * 0.1 || 1 : (hi - lo) * 0.08;
  return [lo - margin, hi + margin];
}

function segments(rows) {
  const out = [];
  let current = [];
  for (const row of rows) {
    if (isNumber(row.x) && isNumber(row.y)) {
      current.push(row);
    } else if (current.length) {
      out.push(current);
      current = [];
    }
  }
  if (current.length) out.push(current);
  return out;
}

function axes(x, y, xs, yLo, yHi) {
  const parts = [];
  for (const v of [yLo, (yLo + yHi) / 2, yHi]) {
    parts.push(s("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    parts.push(s("text", { class: "tick", x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, num(v, 3)));
  }
  const first = xs[0];
  const last = xs[xs.length - 1];
  const ticks = first === last ? [first] : [first, Math.round((first + last) / 2), last];
  for (const v of new Set(ticks)) {
    parts.push(s("text", { class: "tick", x: x(v), y: H - PAD.bottom + 16, "text-anchor": "middle" }, String(v)));
  }
  parts.push(s("text", { class: "axis-label", x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle" }, "round"));
  return parts;
}

/**
 * A figure with a caption and an SVG line chart.
 * id: data-chart name; title, note: caption; rows: [{x: round, y: value or null}];
 * counts: whole numbers from 0 (participants, rows).
 */
export function lineChart({ id, title, note, rows, counts = false }) {
  const good = rows.filter((r) => isNumber(r.x) && isNumber(r.y));
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, "data-points": good.length,
  });
  const lastValue = good.length ? good[good.length - 1].y : null;
  const caption = h("figcaption", {},
    h("span", { class: "chart-title" }, title),
    note ? h("span", { class: "muted" }, " " + note) : null,
    h("span", { class: "chart-last" }, lastValue === null ? "" : "last " + num(lastValue)));
  const figure = h("figure", { class: "chart", "data-chart": id }, caption, svg);
  if (!good.length) {
    svg.append(s("text", { class: "chart-empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "no rounds yet"));
    return figure;
  }
  const xs = good.map((r) => r.x);
  const [xLo, xHi] = [Math.min(...xs), Math.max(...xs)];
  const x = xLo === xHi
    ? () => (PAD.left + W - PAD.right) / 2
    : scale(xLo, xHi, PAD.left + 6, W - PAD.right - 6);
  const [yLo, yHi] = yRange(good.map((r) => r.y), counts);
  const y = scale(yLo, yHi, H - PAD.bottom, PAD.top);
  svg.append(...axes(x, y, [xLo, xHi], yLo, yHi));
  for (const segment of segments(rows)) {
    const points = segment.map((r) => `${x(r.x).toFixed(1)},${y(r.y).toFixed(1)}`).join(" ");
    svg.append(s("polyline", { class: "line", points }));
  }
  for (const r of good) {
    svg.append(s("circle", { class: "pt", cx: x(r.x).toFixed(1), cy: y(r.y).toFixed(1), r: 3 },
      s("title", {}, `round ${r.x}: ${num(r.y)}`)));
  }
  return figure;
}
