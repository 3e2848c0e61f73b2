// The live panel: the service's own counters (GET /stats), polled while the page is shown.

import { api } from "./api.js";
import { $, chartWidth, count, el, pct, svgEl } from "./dom.js";

const LIVE_POLL_MS = 5000;

let liveTimer = null;

export async function refreshLive() {
  clearTimeout(liveTimer);
  if (document.hidden) return; // polled again when the page is shown
  try {
    renderLive(await api("/stats"));
  } catch (err) {
    $("live-summary").textContent = "The service's counters cannot be read: " + err.message;
  }
  liveTimer = setTimeout(refreshLive, LIVE_POLL_MS);
}

function renderLive(s) {
  const minutes = Math.round(s.window_s / 60);
  const span = s.covered_s < s.window_s - 15
    ? "Since the service started " + Math.round(s.covered_s) + " s ago"
    : "Last " + minutes + " min";
  const ratio = s.rejection_ratio === null ? "" : " (" + pct(s.rejection_ratio) + ")";
  $("live-summary").textContent = span + ": " + count(s.requests) + " request" + (s.requests === 1 ? "" : "s") +
    ", " + count(s.errors) + " refused; " + count(s.classified) + " input" + (s.classified === 1 ? "" : "s") +
    " classified, " + count(s.rejected) + " rejected" + ratio + "; " + count(s.attack_queries) +
    " attack quer" + (s.attack_queries === 1 ? "y" : "ies") + " (near-copies of recent queries).";

  // one bar per interval on a fixed time axis: the window, "now" at the right
  const svg = $("live-chart");
  svg.replaceChildren();
  const W = chartWidth(svg), H = 90, base = H - 18;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const x = (secondsAgo) => W * (1 - secondsAgo / s.window_s);
  const peak = Math.max(1, ...s.intervals.map((i) => i.classified));
  for (const iv of s.intervals) {
    const x0 = x(iv.seconds_ago + iv.duration_s), x1 = x(iv.seconds_ago);
    const width = Math.max(1, x1 - x0 - 1);
    const okHeight = (base - 4) * (iv.classified - iv.rejected) / peak;
    const badHeight = (base - 4) * iv.rejected / peak;
    svg.append(svgEl("rect", { class: "ok", x: x0, y: base - okHeight - badHeight, width, height: okHeight }));
    svg.append(svgEl("rect", { class: "bad", x: x0, y: base - badHeight, width, height: badHeight }));
  }
  svg.append(svgEl("line", { class: "axis", x1: 0, x2: W, y1: base, y2: base }));
  svg.append(svgEl("text", { x: 0, y: H - 2 }, "−" + minutes + " min"));
  svg.append(svgEl("text", { x: W, y: H - 2, "text-anchor": "end" }, "now"));

  const body = $("live-classes").tBodies[0];
  body.replaceChildren();
  const rows = s.per_class.filter((c) => c.accepted + c.rejected > 0);
  for (const c of rows) {
    const tr = el("tr");
    tr.append(el("th", { scope: "row" }, c.class_name), el("td", {}, count(c.accepted)), el("td", {}, count(c.rejected)));
    body.append(tr);
  }
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: "3" }, "No input classified in this window."));
    body.append(tr);
  }
}
