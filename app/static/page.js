// dsphere's page: try an image and see why it was accepted or rejected.
// Talks to the service's own JSON API only: GET /models, GET /models/{name}, POST /explain, GET /stats.
// This module wires the page's inputs and starts it; each of its imports has one job:
// api.js the service's API, dom.js element helpers and formatting, models.js the model picker,
// classify.js classifying and the verdict, charts.js its drawings, live.js the live panel.

import { redrawAngleChart } from "./charts.js";
import { classify, classifyExample, reclassify } from "./classify.js";
import { $ } from "./dom.js";
import { refreshLive } from "./live.js";
import { chooseModel, loadModels } from "./models.js";

// ---- inputs: pick, drop, paste, examples -----------------------------------------------

function firstFile(files) {
  return files && files.length ? files[0] : null;
}

function wireInputs() {
  $("model").addEventListener("change", async (event) => {
    await chooseModel(event.target.value);
    reclassify();
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
    if (!$("result").hidden) redrawAngleChart();
  }, 150);
});

wireInputs();
loadModels();
refreshLive();
