// Classifying an image (POST /explain) and showing the verdict: words, the input, the top classes, the chart.

import { ServiceError, api } from "./api.js";
import { angleSummary, clearAngleChart, drawAngleChart, drawModelInput } from "./charts.js";
import { $, clearError, deg, el, pct, showError, showStatus } from "./dom.js";
import { refreshLive } from "./live.js";
import { chosenModel, modelDetail } from "./models.js";

let last = null;      // {blob, name}: re-classified when another model is chosen
let newest = 0;       // the newest request; older answers are dropped
let objectUrl = null; // the preview of the image sent last

export async function classify(blob, name) {
  const seq = ++newest;
  const model = chosenModel();
  last = { blob, name };
  clearError();
  showStatus("Classifying " + name + " with " + model + "…");
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const query = model ? "?model=" + encodeURIComponent(model) : "";
    const [result, detail] = await Promise.all([
      api("/explain" + query, { method: "POST", body: form }),
      modelDetail(model),
    ]);
    if (seq !== newest) return;
    render(result, detail, blob, name);
    showStatus("");
  } catch (err) {
    if (seq !== newest) return;
    $("result").hidden = true;
    showStatus("");
    showError(err);
  }
  refreshLive();
}

export async function classifyExample(file) {
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
  const withheld = r.reason === "query_history";  // the model's outputs are null: nothing to show
  const guess = r.class_name + " (" + pct(r.probability) + ")";
  $("verdict-text").textContent = accepted
    ? guess + ". The image lies as close to the " + r.class_name + " class as the model's own training " +
      "images of it do, so the service trusts this label."
    : withheld
    ? "The image is a near-copy of a recent query, the way a query attack probes a model: the service " +
      "gives no answer from the model for it."
    : "The model's best guess is " + guess + ", but the image lies farther from the " + r.class_name +
      " class than its training images do: the service does not trust this label. It may not be clothing " +
      "at all, or not the kind of picture the model was trained on.";
  $("reason").textContent = withheld
    ? "query history: the model's answer withheld · " + r.model.name + " " + r.model.version
    : "angle " + deg(r.angle_deg) + (accepted ? " ≤ " : " > ") + "threshold " +
      deg(r.threshold_deg) + " = ρ " + r.rho.toFixed(3) + " × (mean " + deg(r.angle_mean_deg) + " + std " +
      deg(r.angle_std_deg) + ") of " + r.class_name + " · " + r.model.name + " " + r.model.version;

  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = URL.createObjectURL(blob);
  $("original").src = objectUrl;
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

  const note = $("histogram-note");
  if (withheld) {  // no angle to draw
    clearAngleChart();
    $("angle-summary").textContent = "No angle: the service withholds the model's answer to a query attack.";
    note.hidden = true;
    return;
  }
  const recorded = detail.manifest && detail.manifest.angle_histogram;
  const hist = recorded ? { edges: recorded.bin_edges_deg, counts: recorded.counts[r.label] } : null;
  drawAngleChart(r, hist);
  $("angle-summary").textContent = angleSummary(r, hist);
  note.hidden = Boolean(hist);
  note.textContent = hist ? "" : "This model's manifest has no angle histogram (the version was exported before " +
    "histograms were recorded): the band shows the class's mean ± standard deviation instead of its distribution.";
}

// The last image again (with the model chosen since), if one was sent.
export function reclassify() {
  if (last) classify(last.blob, last.name);
}
