// Building the page without innerHTML: every value from the fleet (device ids come from the
// field) lands in a text node or an attribute value, never in markup the browser parses.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** An HTML element: h("td", {class: "num"}, "12", h("span", {}, "new")). */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element, the same way. */
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/** A number for people: "12,345", "0.1234", "-" for none. */
export function num(value, digits = 4) {
  if (!isNumber(value)) return "\u2013";
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
  return String(Number(value.toPrecision(digits)));
}

export function version(value) {
  return isNumber(value) && value >= 0 ? "v" + value : "\u2013";
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** Wall clock of a unix time: "14:03:22" today (by `now`), "2025-03-01 14:03" otherwise. */
export function clock(ts, now) {
  if (!isNumber(ts) || ts <= 0) return "\u2013";
  const t = new Date(ts * 1000);
  const today = new Date((isNumber(now) ? now : ts) * 1000);
  const time = pad(t.getHours()) + ":" + pad(t.getMinutes());
  if (t.toDateString() === today.toDateString()) return time + ":" + pad(t.getSeconds());
  return t.getFullYear() + "-" + pad(t.getMonth() + 1) + "-" + pad(t.getDate()) + " " + time;
}

/** How long ago, against the server's clock: "45 s", "12 min", "3 h 5 min", "2 d 4 h". */
export function ago(ts, now) {
  if (!isNumber(ts) || ts <= 0 || !isNumber(now)) return "";
  const s = Math.max(0, Math.round(now - ts));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

/** "reason 3, other 1" from {reason: count}, sorted by reason; "" when empty. */
export function counts(byReason) {
  return Object.keys(byReason || {}).sort().map((k) => k + " " + num(byReason[k])).join(", ");
}

/** "rmse 0.12, mae 0.3" from a metrics object; "-" when empty. */
export function metrics(values) {
  const keys = Object.keys(values || {}).sort();
  return keys.length ? keys.map((k) => k + " " + num(values[k])).join(", ") : "\u2013";
}
