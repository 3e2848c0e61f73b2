// Element helpers, number formatting, and the page's status line and error box.

const SVG = "http://www.w3.org/2000/svg";

export const $ = (id) => document.getElementById(id);

export const pct = (x, digits = 1) => (100 * x).toFixed(digits) + " %";
export const deg = (x) => x.toFixed(1) + "°";
export const count = (n) => n.toLocaleString("en-US");

export function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// A drawing's width in its own units: the element's width in pixels, so that text keeps its size.
export function chartWidth(svg) {
  const width = svg.getBoundingClientRect().width;
  return Math.round(Math.min(900, Math.max(300, width || 640)));
}

// ---- status and errors -----------------------------------------------------------------

export function showStatus(text) {
  $("status").textContent = text;
}

export function showError(err) {
  const box = $("error");
  box.textContent = err.status
    ? "The service refused this (" + err.status + "): " + err.message
    : "Something went wrong: " + err.message;
  box.hidden = false;
}

export function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}
