// The drawings of a verdict: the model's input, pixel for pixel, and the angle chart.

import { $, chartWidth, deg, pct, svgEl } from "./dom.js";

let lastChart = null; // {r, hist}: the angle chart drawn last, drawn again at a new width

// The model's input: C x H x W values 0..255 drawn pixel for pixel (CSS scales it up, pixelated).
export function drawModelInput(input) {
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

export function angleSummary(r, hist) {
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

// No chart (a withheld answer has no angle); a resize draws nothing again.
export function clearAngleChart() {
  lastChart = null;
  $("angle-chart").replaceChildren();
}

// The class's training angles (histogram bars, or a mean ± std band), its threshold and this image's angle.
export function drawAngleChart(r, hist) {
  lastChart = { r, hist };
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

// The last angle chart again, at the drawing's new width (after a resize).
export function redrawAngleChart() {
  if (lastChart) drawAngleChart(lastChart.r, lastChart.hist);
}

function labelAt(px, y, width, side) {
  const anchor = side || (px > width - 120 ? "end" : px < 120 ? "start" : "middle");
  const fits = anchor === "end" ? px > 110 : anchor === "start" ? px < width - 110 : true;
  const chosen = fits ? anchor : (anchor === "end" ? "start" : "end");
  const dx = chosen === "end" ? -4 : chosen === "start" ? 4 : 0;
  return { x: px + dx, y, "text-anchor": chosen };
}
