// dsphere's page: try an image and see why it was accepted or rejected.
// Talks to the service's own JSON API only: GET /models, GET /models/{name}, POST /explain, GET /stats.
"use strict";

const LIVE_POLL_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,        // the chosen model's name
  details: new Map(), // name -> GET /models/{name}
  last: null,         // {blob, name}: re-classified when another model is chosen
  seq: 0,             // the newest request; older answers are dropped
  objectUrl: null,
};

class ServiceError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// fetch + JSON; a non-2xx answer throws ServiceError with the service's own reason.
async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ServiceError(0, "the service cannot be reached (" + err.message + ")");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && (body.detail || body.error);
    throw new ServiceError(response.status, detail || response.statusText || "no reason given");
  }
  return body;
}

const pct = (x, digits = 1) => (100 * x).toFixed(digits) + " %";
const deg = (x) => x.toFixed(1) + "°";
const count = (n) => n.toLocaleString("en-US");

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- status and errors -----------------------------------------------------------------

function showStatus(text) {
  $("status").textContent = text;
}

function showError(err) {
  const box = $("error");
  box.textContent = err.status
    ? "The service refused this (" + err.status + "): " + err.message
    : "Something went wrong: " + err.message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- models and their figures --------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const { models } = await api("/models");
    select.replaceChildren();
    for (const m of models) {
      const version = m.served_version || m.latest;
      const role = m.served_version ? "served" : "latest";
      select.append(el("option", { value: m.name }, m.name + " (" + role + " " + (version || "none") + ")"));
    }
    const served = models.find((m) => m.served_version) || models[0];
    if (!served) throw new ServiceError(0, "the model store is empty");
    select.value = served.name;
    select.disabled = false;
    await chooseModel(served.name);
  } catch (err) {
    select.replaceChildren(el("option", {}, "no model"));
    showError(err);
  }
}

async function modelDetail(name) {
  if (!state.details.has(name)) {
    state.details.set(name, await api("/models/" + encodeURIComponent(name)));
  }
  return state.details.get(name);
}

async function chooseModel(name) {
  state.model = name;
  try {
    showFigures(await modelDetail(name));
  } catch (err) {
    showError(err);
  }
}

function showFigures(detail) {
  const box = $("figures");
  box.replaceChildren();
  const m = detail.manifest;
  if (!m) {
    box.append(el("p", {}, "This model's manifest cannot be read: " + (detail.manifest_error || "unknown reason")));
    return;
  }
  const x = m.metrics;
  const cal = m.calibration;
  const atk = x.pgd_attack;
  const rows = [
    ["Version", m.version + (detail.served_version ? " (served)" : " (latest; loaded on first use)") +
      ", exported " + m.created_at.slice(0, 10)],
    ["Clean test images", pct(x.clean_accuracy) + " right, " + pct(x.clean_reject_rate) + " rejected (" +
      count(x.n_test) + " images)"],
    ["ρ", m.rho.toFixed(3) + ": " + pct(cal.target_false_reject_rate, 0) + " of " + count(cal.n_validation) +
      " clean validation images rejected" + (m.rho !== m.manifest_rho ? " (manifest: " + m.manifest_rho.toFixed(3) + ")" : "")],
    ["PGD-" + atk.steps + " at ε = " + atk.eps, pct(x.pgd_robust_accuracy) + " still right, " +
      pct(x.pgd_defended_rate) + " right or rejected (" + atk.restarts + " restart" + (atk.restarts > 1 ? "s" : "") +
      ", " + count(atk.n_examples) + " images)"],
  ];
  if (x.worst_case_defended_rate != null) {
    rows.push(["Worst case over " + (x.worst_case_attacks ? x.worst_case_attacks.length : "all") + " attacks",
      pct(x.worst_case_robust_accuracy) + " still right, " + pct(x.worst_case_defended_rate) + " right or rejected"]);
  }
  if (x.adaptive_defended_rate != null) {
    rows.push(["Attack that knows the rule", pct(x.adaptive_defended_rate) + " right or rejected"]);
  }
  const dl = el("dl");
  for (const [term, value] of rows) dl.append(el("dt", {}, term), el("dd", {}, value));
  box.append(dl);
  if (!m.angle_histogram) {
    box.append(el("p", { class: "note" }, "This version's manifest has no angle histogram (it was exported " +
      "before histograms were recorded): the angle chart shows its classes' mean and spread only."));
  }
}

// ---- classifying -----------------------------------------------------------------------

async function classify(blob, name) {
  const seq = ++state.seq;
  state.last = { blob, name };
  clearError();
  showStatus("Classifying " + name + " with " + state.model + "…");
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const query = state.model ? "?model=" + encodeURIComponent(state.model) : "";
    const [result, detail] = await Promise.all([
      api("/explain" + query, { method: "POST", body: form }),
      modelDetail(state.model),
    ]);
    if (seq !== state.seq) return;
    render(result, detail, blob, name);
    showStatus("");
  } catch (err) {
    if (seq !== state.seq) return;
    $("result").hidden = true;
    showStatus("");
    showError(err);
  }
  refreshLive();
}

async function classifyExample(file) {
  try {
    const response = await fetch("/assets/page/examples/" + file);
    if (!response.ok) throw new ServiceError(response.status, "example " + file + " not found");
    await classify(await response.blob(), file);
  } catch (err) {
    showError(err);
  }
}

function render(r, detail, blob, name) {
  $("result").hidden = false;
  const accepted = r.verdict === "accept";
  const verdict = $("verdict");
  verdict.className = "verdict " + r.verdict;
  verdict.dataset.verdict = r.verdict;
  $("verdict-word").textContent = r.verdict;
  const guess = r.class_name + " (" + pct(r.probability) + ")";
  $("verdict-text").textContent = accepted
    ? guess + ". The image lies as close to the " + r.class_name + " class as the model's own training " +
      "images of it do, so the service trusts this label."
    : r.reason === "query_history"
    ? "The model's best guess is " + guess + ", but the image is a near-copy of recent queries, the way a " +
      "query attack probes a model: the service does not trust this answer."
    : "The model's best guess is " + guess + ", but the image lies farther from the " + r.class_name +
      " class than its training images do: the service does not trust this label. It may not be clothing " +
      "at all, or not the kind of picture the model was trained on.";
  $("reason").textContent = "angle " + deg(r.angle_deg) + (accepted ? " ≤ " : " > ") + "threshold " +
    deg(r.threshold_deg) + " = ρ " + r.rho.toFixed(3) + " × (mean " + deg(r.angle_mean_deg) + " + std " +
    deg(r.angle_std_deg) + ") of " + r.class_name + " · " + r.model.name + " " + r.model.version;

  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = URL.createObjectURL(blob);
  $("original").src = state.objectUrl;
  const [w, h] = r.input.original_size;
  $("original-caption").textContent = "You sent: " + name + ", " + w + "×" + h + " " + r.input.format;
  drawModelInput(r.input);

  const list = $("top-classes");
  list.replaceChildren();
  for (const c of r.top_classes) {
    const row = el("span", { class: "row" });
    const track = el("span", { class: "track", "aria-hidden": "true" });
    const fill = el("span", { class: "fill" });
    fill.style.width = (100 * c.probability).toFixed(1) + "%";
    track.append(fill);
    row.append(el("span", { class: "name" }, c.class_name), track, el("span", {}, pct(c.probability)));
    const item = el("li");
    item.append(row);
    list.append(item);
  }

  const recorded = detail.manifest && detail.manifest.angle_histogram;
  const hist = recorded ? { edges: recorded.bin_edges_deg, counts: recorded.counts[r.label] } : null;
  drawAngleChart(r, hist);
  $("angle-summary").textContent = angleSummary(r, hist);
  const note = $("histogram-note");
  note.hidden = Boolean(hist);
  note.textContent = hist ? "" : "This model's manifest has no angle histogram (the version was exported before " +
    "histograms were recorded): the band shows the class's mean ± standard deviation instead of its distribution.";
}

// The model's input: C x H x W values 0..255 drawn pixel for pixel (CSS scales it up, pixelated).
function drawModelInput(input) {
  const [c, h, w] = input.shape;
  const canvas = $("model-input");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  const plane = w * h;
  for (let i = 0; i < plane; i++) {
    const r = input.pixels[i];
    const g = c === 3 ? input.pixels[plane + i] : r;
    const b = c === 3 ? input.pixels[2 * plane + i] : r;
    image.data.set([r, g, b, 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  const kind = c === 3 ? "RGB" : "grayscale";
  $("input-caption").textContent = "The model sees: " + w + "×" + h + " " + kind + ", after the service's decoding and resizing";
  canvas.setAttribute("aria-label", "The image as the model sees it: " + w + " by " + h + " " + kind + " pixels");
}

// Share of the class's training images at least as far from its weight as this image (from the bins).
function shareBeyond(angle, hist) {
  let total = 0;
  let beyond = 0;
  hist.counts.forEach((n, b) => {
    const lo = hist.edges[b];
    const hi = hist.edges[b + 1];
    total += n;
    if (lo >= angle) beyond += n;
    else if (hi > angle) beyond += n * (hi - angle) / (hi - lo);
  });
  return total ? beyond / total : null;
}

function angleSummary(r, hist) {
  let text = "This image: " + deg(r.angle_deg) + " from the " + r.class_name + " weight; threshold " +
    deg(r.threshold_deg) + ".";
  if (hist) {
    const share = shareBeyond(r.angle_deg, hist);
    if (share !== null) {
      text += " About " + pct(share) + " of the " + r.class_name + " training images lie at least this far from it.";
    }
  } else {
    text += " The class's training images lie at " + deg(r.angle_mean_deg) + " ± " + deg(r.angle_std_deg) + ".";
  }
  return text;
}

// The class's training angles (histogram bars, or a mean ± std band), its threshold and this image's angle.
function drawAngleChart(r, hist) {
  state.chart = { r, hist };
  const svg = $("angle-chart");
  svg.replaceChildren();
  const W = chartWidth(svg), H = 236, left = 16, right = 16, top = 44, bottom = 44;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  let lo = Math.min(r.angle_deg, r.angle_mean_deg - 3 * r.angle_std_deg);
  let hi = Math.max(r.angle_deg, r.threshold_deg, r.angle_mean_deg + 3 * r.angle_std_deg);
  if (hist) {
    const used = hist.counts.map((n, b) => (n > 0 ? b : -1)).filter((b) => b >= 0);
    if (used.length) {
      lo = Math.min(lo, hist.edges[used[0]]);
      hi = Math.max(hi, hist.edges[used[used.length - 1] + 1]);
    }
  }
  lo = Math.max(0, Math.floor((lo - 2) / 10) * 10);
  hi = Math.min(180, Math.ceil((hi + 2) / 10) * 10);
  const x = (a) => left + (W - left - right) * (a - lo) / (hi - lo);
  const base = H - bottom;

  svg.append(svgEl("rect", { class: "zone", x: x(r.threshold_deg), y: top, width: Math.max(0, x(hi) - x(r.threshold_deg)), height: base - top }));
  svg.append(svgEl("text", { x: Math.min(x(r.threshold_deg) + 6, W - 150), y: top + 16 }, "rejected beyond"));

  if (hist) {
    const peak = Math.max(...hist.counts, 1);
    hist.counts.forEach((n, b) => {
      const a0 = hist.edges[b], a1 = hist.edges[b + 1];
      if (n === 0 || a1 <= lo || a0 >= hi) return;
      const height = (base - top - 24) * n / peak;
      svg.append(svgEl("rect", { class: "bin", x: x(a0) + 0.5, y: base - height, width: Math.max(1, x(a1) - x(a0) - 1), height }));
    });
  } else {
    const a0 = Math.max(lo, r.angle_mean_deg - r.angle_std_deg), a1 = Math.min(hi, r.angle_mean_deg + r.angle_std_deg);
    svg.append(svgEl("rect", { class: "band", x: x(a0), y: top + 24, width: x(a1) - x(a0), height: base - top - 24 }));
    svg.append(svgEl("text", { x: x(r.angle_mean_deg), y: base - 8, "text-anchor": "middle" }, "mean ± std"));
  }

  svg.append(svgEl("line", { class: "axis", x1: left, x2: W - right, y1: base, y2: base }));
  const step = hi - lo > 90 ? 20 : 10;
  for (let a = lo; a <= hi; a += step) {
    svg.append(svgEl("line", { class: "axis", x1: x(a), x2: x(a), y1: base, y2: base + 5 }));
    svg.append(svgEl("text", { x: x(a), y: base + 20, "text-anchor": "middle" }, a + "°"));
  }
  svg.append(svgEl("text", { x: W - right, y: H - 4, "text-anchor": "end" }, "angle to the " + r.class_name + " weight"));

  const xt = x(r.threshold_deg), xa = x(r.angle_deg);
  svg.append(svgEl("line", { class: "threshold", x1: xt, x2: xt, y1: top - 8, y2: base }));
  svg.append(svgEl("line", { class: "angle", x1: xa, x2: xa, y1: top - 26, y2: base }));
  // two labels close together go to either side of their lines
  const near = Math.abs(xa - xt) < 130;
  svg.append(svgEl("text", labelAt(xt, top - 12, W, near ? (xt >= xa ? "start" : "end") : null),
    "threshold " + deg(r.threshold_deg)));
  svg.append(svgEl("text", labelAt(xa, top - 30, W, near ? (xa > xt ? "start" : "end") : null),
    "this image " + deg(r.angle_deg)));
}

// The drawing's width in its own units: the element's width in pixels, so that text keeps its size.
function chartWidth(svg) {
  const width = svg.getBoundingClientRect().width;
  return Math.round(Math.min(900, Math.max(300, width || 640)));
}

function labelAt(px, y, width, side) {
  const anchor = side || (px > width - 120 ? "end" : px < 120 ? "start" : "middle");
  const fits = anchor === "end" ? px > 110 : anchor === "start" ? px < width - 110 : true;
  const chosen = fits ? anchor : (anchor === "end" ? "start" : "end");
  const dx = chosen === "end" ? -4 : chosen === "start" ? 4 : 0;
  return { x: px + dx, y, "text-anchor": chosen };
}

// ---- the live panel --------------------------------------------------------------------

let liveTimer = null;

async function refreshLive() {
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

// ---- inputs: pick, drop, paste, examples -----------------------------------------------

function firstFile(files) {
  return files && files.length ? files[0] : null;
}

function wireInputs() {
  $("model").addEventListener("change", async (event) => {
    await chooseModel(event.target.value);
    if (state.last) classify(state.last.blob, state.last.name);
  });

  $("file").addEventListener("change", (event) => {
    const file = firstFile(event.target.files);
    if (file) classify(file, file.name);
    event.target.value = ""; // the same file again is a new choice
  });

  // a file dropped anywhere on the page is classified (never opened by the browser instead)
  const drop = $("drop");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = firstFile(event.dataTransfer && event.dataTransfer.files);
    if (file) classify(file, file.name || "dropped image");
  });

  document.addEventListener("paste", (event) => {
    const items = Array.from((event.clipboardData && event.clipboardData.items) || []);
    const item = items.find((i) => i.kind === "file");
    if (!item) return; // text pasted into the page: not ours
    event.preventDefault();
    const file = item.getAsFile();
    if (file) classify(file, file.name || "pasted image");
  });

  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", () => classifyExample(button.dataset.example));
  }
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refreshLive();
});

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (state.chart && !$("result").hidden) drawAngleChart(state.chart.r, state.chart.hist);
  }, 150);
});

wireInputs();
loadModels();
refreshLive();
