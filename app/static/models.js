// The model picker and the chosen model's figures: GET /models and GET /models/{name}.

import { ServiceError, api } from "./api.js";
import { $, count, el, pct, showError } from "./dom.js";

let chosen = null;          // the chosen model's name
const details = new Map();  // name -> GET /models/{name}

export const chosenModel = () => chosen;

export async function loadModels() {
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

export async function modelDetail(name) {
  if (!details.has(name)) {
    details.set(name, await api("/models/" + encodeURIComponent(name)));
  }
  return details.get(name);
}

export async function chooseModel(name) {
  chosen = name;
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
