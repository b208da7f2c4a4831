// The page's one script. It calls the public routes exactly as any client does (GET /models, POST /classify,
// /segment, /generate, /generate/interpolate) and shows their answers; nothing here talks to another origin.

const KEY_STORAGE = "visionserve-api-key";
const GRID_GAP = 2;            // pixels between the cells of a generated strip at scale 1 (service/generate.py)
const STRIP_SCALE = 3;         // interpolation strips come enlarged, so the chosen frame can be cropped sharply
const GRID_SCALE = 2;

const $ = (selector) => document.querySelector(selector);
let catalogue = null;          // the answer of GET /models
const objectUrls = new Map();  // section -> blob: URLs of its previews, revoked when it shows a new answer

class ApiFailure extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// --- talking to the server --------------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The server's own words: {"error": {"message"}} on our routes; a plain text or a list elsewhere (BentoML).
async function serverMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = Array.isArray(body) ? body[0]?.error : body.error;
    if (typeof error === "string") return error;
    if (error?.message) return error.message;
  } catch {
    // not JSON: the text itself is the message
  }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

// fetch + the body read as `as` ("json" or "blob"); latency is to the last byte of the answer.
async function callApi(path, { as = "json", ...init } = {}) {
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...init.headers } });
  } catch (error) {
    throw new ApiFailure(`The server did not answer (${error.message}).`, 0);
  }
  if (!response.ok) {
    const message = await serverMessage(response);
    if (response.status === 401) askForKey(message);
    throw new ApiFailure(message, response.status);
  }
  const body = as === "blob" ? await response.blob() : await response.json();
  return { body, response, latencyMs: performance.now() - started };
}

function postJson(path, request, as) {
  return callApi(path, {
    method: "POST", as, headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
  });
}

// --- building the answers (text nodes only: nothing the server sends is parsed as HTML) -----------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function showError(container, error) {
  const prefix = error.status === 401 ? "Unauthorized: " : "";
  container.replaceChildren(element("p", { class: "error", role: "alert" }, prefix + error.message));
  container.removeAttribute("aria-busy");
}

function showBusy(container) {
  container.setAttribute("aria-busy", "true");
  container.replaceChildren(element("p", { class: "busy" }, "Working…"));
}

function answerHeader(model, version, latencyMs) {
  return element("p", { class: "answer-header" },
    element("strong", {}, model), ` ${version ?? ""} · `, element("span", { class: "latency" }, `${Math.round(latencyMs)} ms`));
}

function previewUrl(section, blob) {
  const url = URL.createObjectURL(blob);
  objectUrls.get(section)?.push(url);
  return url;
}

function forgetPreviews(section) {
  for (const url of objectUrls.get(section) ?? []) URL.revokeObjectURL(url);
  objectUrls.set(section, []);
}

function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function percent(fraction) {
  return `${(100 * fraction).toFixed(1)}%`;
}

function describedModel(name) {
  return catalogue?.models.find((model) => model.name === name);
}

// --- API key ------------------------------------------------------------------------------------------------

function askForKey(serverSays) {
  const form = $("#api-key-form");
  form.hidden = false;
  $("#api-key-message").textContent =
    `This server needs an API key (HTTP 401: ${serverSays}). Enter it below; it is kept in this tab only.`;
}

function saveKey(event) {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key-message").textContent = "Key saved for this tab; checking it…";
  loadModels();
}

// --- Models ------------------------------------------------------------------------------------------------

function figureLines(model) {
  const figures = model.release?.figures;
  if (!figures?.length) {
    const metrics = model.metrics ?? {};
    const headline = ["accuracy", "miou", "class_consistency"].find((name) => metrics[name] !== undefined);
    return headline ? [element("li", {}, `${headline} ${metrics[headline]}`)] : [];
  }
  return figures.map((figure) => {
    const verdict = figure.goal_met === true ? "goal met" : figure.goal_met === false ? "short of its goal" : "";
    return element("li", { class: figure.goal_met === false ? "short" : "met" }, figure.text,
      verdict ? element("span", { class: "verdict" }, ` (${verdict})`) : "");
  });
}

function modelCard(model, defaults) {
  const isDefault = defaults[model.task] === model.name;
  const parameters = model.architecture?.parameters;
  const facts = [
    ["task", model.task],
    ["version", model.version ?? "?"],
    ["parameters", parameters !== undefined ? parameters.toLocaleString("en") : "?"],
    ["SHA-256", (model.sha256 ?? "").slice(0, 12)],
    ["status", model.status === "available" ? "available" : `unavailable: ${model.unavailable_reason}`],
  ];
  return element("article", { class: "model-card", "data-model": model.name },
    element("h3", {}, model.name, isDefault ? element("span", { class: "badge" }, "default") : ""),
    element("dl", {}, ...facts.flatMap(([term, value]) => [element("dt", {}, term), element("dd", {}, value)])),
    element("ul", { class: "figures" }, ...figureLines(model)));
}

function fillModelSelects(answer) {
  for (const select of document.querySelectorAll("select[data-task]")) {
    const models = answer.models.filter((m) => m.task === select.dataset.task && m.status === "available");
    const chosen = select.value || answer.default[select.dataset.task];
    select.replaceChildren(...models.map((m) => element("option", { value: m.name }, `${m.name} (${m.version})`)));
    if (models.some((m) => m.name === chosen)) select.value = chosen;
    if (!models.length) select.append(element("option", { value: "" }, "none served"));
    select.form.querySelector("button[type=submit]").disabled = !models.length;
  }
}

function fillGeneratorClasses() {
  const select = $("#generate-class");
  const labels = describedModel($("#generate-model").value)?.labels ?? [];
  const chosen = select.value;
  select.replaceChildren(...labels.map((label, index) => element("option", { value: String(index) }, `${index} ${label}`)));
  if (chosen && Number(chosen) < labels.length) select.value = chosen;
}

async function loadModels() {
  const container = $("#models-result");
  try {
    const { body } = await callApi("/models");
    catalogue = body;
    fillModelSelects(body);
    fillGeneratorClasses();
    container.replaceChildren(...body.models.map((model) => modelCard(model, body.default)));
    if (sessionStorage.getItem(KEY_STORAGE)) $("#api-key-message").textContent = "The key works.";
  } catch (error) {
    showError(container, error);
  }
}

// --- Classify ----------------------------------------------------------------------------------------------

let classifyFiles = [];

function topKList(predictions) {
  return element("ul", { class: "top-k" }, ...predictions.map((entry) => {
    const fill = element("span", { class: "fill" });
    fill.style.width = percent(entry.probability);
    return element("li", {},
      element("span", { class: "label" }, entry.label),
      element("span", { class: "bar", "aria-hidden": "true" }, fill),
      element("span", { class: "probability" }, percent(entry.probability)));
  }));
}

// The OOD flag (POST /classify's `ood`) as a visible warning beside the classes it casts doubt on.
function oodWarning(ood) {
  if (!ood || !ood.flag) return "";
  return element("p", { class: "ood-warning", role: "note" },
    `Unlike the training images (out-of-distribution score ${ood.score.toFixed(2)} > ${ood.threshold.toFixed(2)}, ` +
    `${ood.method}): these classes may mean little.`);
}

function classificationRows(files, predictions) {
  return element("ol", { class: "predictions" }, ...predictions.map((prediction) => {
    const file = files[prediction.image];
    return element("li", { class: "prediction", "data-top-label": prediction.top_k[0].label,
                           "data-ood": prediction.ood && prediction.ood.flag ? "flagged" : "ok" },
      element("figure", {},
        element("img", { src: previewUrl("classify", file), alt: `input ${file.name}`, class: "thumbnail" }),
        element("figcaption", {}, file.name)),
      element("div", { class: "answer" }, topKList(prediction.top_k), oodWarning(prediction.ood)));
  }));
}

// Under each prediction: the nearest training images (POST /similar with the same files and model).
function similarStrip(result) {
  return element("div", { class: "similar" },
    element("span", { class: "similar-title" }, "Nearest training images"),
    ...result.neighbours.map((neighbour) => element("figure", {},
      element("img", { src: `data:image/png;base64,${neighbour.thumbnail}`, alt: neighbour.label,
                       title: `#${neighbour.index} ${neighbour.label}, distance ${neighbour.distance.toFixed(2)}` }),
      element("figcaption", {}, neighbour.label))));
}

async function showSimilar(files, model, rows) {
  // Only a model whose card has a similarity index is asked (GET /models); the others would answer 422 no_index.
  if (!describedModel(model)?.features?.similarity) {
    const indexed = (catalogue?.models || []).filter((entry) => entry.features?.similarity).map((entry) => entry.name);
    rows[0].closest(".result").append(element("p", { class: "similar-note" },
      `No similar images: ${model} has no similarity index${indexed.length ? ` (${indexed.join(", ")} has one)` : ""}.`));
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  if (model) form.append("model", model);
  form.append("k", "8");
  try {
    const { body } = await callApi("/similar", { method: "POST", body: form });
    for (const result of body.results) rows[result.image].append(similarStrip(result));
  } catch (error) {
    rows[0].closest(".result").append(element("p", { class: "similar-note" }, `No similar images: ${error.message}`));
  }
}

async function classify(files) {
  const result = $("#classify-result");
  if (!files.length) {
    showError(result, new ApiFailure("Choose or drop an image file first.", 0));
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  if ($("#classify-model").value) form.append("model", $("#classify-model").value);
  form.append("top_k", $("#classify-top-k").value);
  showBusy(result);
  try {
    const { body, latencyMs } = await callApi("/classify", { method: "POST", body: form });
    forgetPreviews("classify");
    const rows = classificationRows(files, body.predictions);
    result.replaceChildren(answerHeader(body.model, body.version, latencyMs), rows);
    result.removeAttribute("aria-busy");
    await showSimilar(files, body.model, [...rows.children]);
  } catch (error) {
    showError(result, error);
  }
}

// --- Segment -----------------------------------------------------------------------------------------------

let segmentFile = null;

function segmentForm(file, format) {
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("format", format);
  if ($("#segment-model").value) form.append("model", $("#segment-model").value);
  return form;
}

function legend(summary) {
  const palette = describedModel(summary.model)?.palette ?? [];
  const items = summary.classes.filter((entry) => entry.index !== 0);
  if (!items.length) return element("p", {}, "No item found: every pixel is background.");
  return element("ul", { class: "legend", "aria-label": "Classes found" }, ...items.map((entry) => {
    const swatch = element("span", { class: "swatch", "aria-hidden": "true" });
    const colour = palette[entry.index];
    if (colour) swatch.style.backgroundColor = `rgb(${colour.join(",")})`;
    return element("li", { "data-label": entry.label }, swatch, element("span", { class: "label" }, entry.label),
      ` ${percent(entry.fraction)} of the image (${entry.pixels.toLocaleString("en")} px)`);
  }));
}

function maskLink(summary) {
  const bytes = Uint8Array.from(atob(summary.mask_png), (c) => c.charCodeAt(0));
  const href = previewUrl("segment", new Blob([bytes], { type: "image/png" }));
  return element("a", { href, download: "mask.png", class: "download" },
    "Download the mask PNG (each pixel's value is its class index)");
}

async function segment(file) {
  const result = $("#segment-result");
  if (!file) {
    showError(result, new ApiFailure("Choose or drop an image file first.", 0));
    return;
  }
  showBusy(result);
  try {
    const [summary, overlay] = await Promise.all([
      callApi("/segment", { method: "POST", body: segmentForm(file, "json") }),
      callApi("/segment", { method: "POST", body: segmentForm(file, "overlay"), as: "blob" }),
    ]);
    forgetPreviews("segment");
    const images = element("div", { class: "side-by-side" },
      element("figure", {}, element("img", { src: previewUrl("segment", file), alt: `input ${file.name}`, class: "scene" }),
        element("figcaption", {}, "Input")),
      element("figure", {}, element("img", { src: previewUrl("segment", overlay.body), alt: "the classes found, blended over the input", class: "overlay" }),
        element("figcaption", {}, "Overlay")));
    result.replaceChildren(answerHeader(summary.body.model, summary.body.version, summary.latencyMs), images,
      legend(summary.body), maskLink(summary.body));
    result.removeAttribute("aria-busy");
  } catch (error) {
    showError(result, error);
  }
}

// --- Generate and interpolate ---------------------------------------------------------------------------------

function generatorModel() {
  return $("#generate-model").value || undefined;
}

function className(index) {
  return describedModel($("#generate-model").value)?.labels?.[index] ?? `class ${index}`;
}

function newSeed() {
  $("#generate-seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
}

async function generate() {
  const result = $("#generate-result");
  const classIndex = Number($("#generate-class").value);
  const seedText = $("#generate-seed").value.trim();
  const request = { n: Number($("#generate-n").value), class: classIndex, format: "grid", scale: GRID_SCALE,
                    model: generatorModel() };
  if (seedText) request.seed = Number(seedText);  // empty: the server draws one and says which (X-Seed)
  showBusy(result);
  try {
    const { body, response, latencyMs } = await postJson("/generate", request, "blob");
    const seed = response.headers.get("X-Seed");
    $("#generate-seed").value = seed;
    const model = response.headers.get("X-Model");
    const image = element("img", { src: await blobToDataUrl(body), class: "grid",
      alt: `${request.n} generated samples of ${className(classIndex)}, seed ${seed}` });
    result.replaceChildren(answerHeader(model, describedModel(model)?.version, latencyMs),
      element("figure", {}, image, element("figcaption", {}, `${className(classIndex)}, seed ${seed}`)));
    result.removeAttribute("aria-busy");
  } catch (error) {
    showError(result, error);
  }
}

// The strip's cells are laid out as service/generate.py tiles them: a gap, then cell, gap, cell, ...
function drawFrame(strip, steps, step, canvas) {
  const gap = GRID_GAP * STRIP_SCALE;
  const cellWidth = (strip.naturalWidth - (steps + 1) * gap) / steps;
  const cellHeight = strip.naturalHeight - 2 * gap;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(strip, gap + step * (cellWidth + gap), gap, cellWidth, cellHeight, 0, 0, canvas.width, canvas.height);
}

function interpolationViewer(dataUrl, steps) {
  const strip = element("img", { src: dataUrl, class: "strip", alt: `${steps} images from one seed to the other` });
  const marker = element("span", { class: "marker", "aria-hidden": "true" });
  marker.style.width = percent(1 / steps);
  const slider = element("input", { type: "range", id: "interpolate-slider", min: "0", max: String(steps - 1),
    value: "0", step: "1" });
  const frame = element("canvas", { id: "interpolate-frame", width: "168", height: "168", role: "img",
    "aria-label": "the chosen step, enlarged" });
  const caption = element("output", { for: "interpolate-slider" }, `step 1 of ${steps}`);
  const show = () => {
    const step = Number(slider.value);
    marker.style.left = percent(step / steps);
    caption.textContent = `step ${step + 1} of ${steps}`;
    drawFrame(strip, steps, step, frame);
  };
  slider.addEventListener("input", show);
  strip.addEventListener("load", show);
  return element("div", { class: "interpolation" },
    element("div", { class: "strip-box" }, strip, marker),
    element("label", { for: "interpolate-slider" }, "Step along the strip"), slider, caption, frame);
}

async function interpolate() {
  const result = $("#interpolate-result");
  const classIndex = Number($("#generate-class").value);
  const request = { from_seed: Number($("#interpolate-from").value), to_seed: Number($("#interpolate-to").value),
                    class: classIndex, steps: Number($("#interpolate-steps").value), scale: STRIP_SCALE,
                    model: generatorModel() };
  showBusy(result);
  try {
    const { body, response, latencyMs } = await postJson("/generate/interpolate", request, "blob");
    const model = response.headers.get("X-Model");
    result.replaceChildren(answerHeader(model, describedModel(model)?.version, latencyMs),
      element("p", {}, `${className(classIndex)}, seed ${request.from_seed} to seed ${request.to_seed}`),
      interpolationViewer(await blobToDataUrl(body), request.steps));
    result.removeAttribute("aria-busy");
  } catch (error) {
    showError(result, error);
  }
}

// --- choosing, dropping and sampling files ------------------------------------------------------------------

async function sampleFile(path) {
  const { body } = await callApi(path, { as: "blob" });
  return new File([body], path.split("/").pop(), { type: body.type || "image/png" });
}

// A drop zone hands the dropped files to its file input, so choosing and dropping take one path.
function acceptDrops(zone, input) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    input.files = event.dataTransfer.files;
    input.dispatchEvent(new Event("change"));
  });
}

function wireSamples(section, run) {
  for (const button of document.querySelectorAll(`#${section} .sample`)) {
    button.addEventListener("click", async () => {
      try {
        run(await sampleFile(button.dataset.sample));
      } catch (error) {
        showError($(`#${section}-result`), error);
      }
    });
  }
}

function start() {
  $("#api-key-form").addEventListener("submit", saveKey);
  if (sessionStorage.getItem(KEY_STORAGE)) $("#api-key").value = sessionStorage.getItem(KEY_STORAGE);

  const classifyInput = $("#classify-file");
  classifyInput.addEventListener("change", () => { classifyFiles = [...classifyInput.files]; });
  acceptDrops(classifyInput.closest(".drop-zone"), classifyInput);
  $("#classify-form").addEventListener("submit", (event) => { event.preventDefault(); classify(classifyFiles); });
  wireSamples("classify", (file) => { classifyFiles = [file]; classify(classifyFiles); });

  const segmentInput = $("#segment-file");
  segmentInput.addEventListener("change", () => { segmentFile = segmentInput.files[0] ?? null; });
  acceptDrops(segmentInput.closest(".drop-zone"), segmentInput);
  $("#segment-form").addEventListener("submit", (event) => { event.preventDefault(); segment(segmentFile); });
  wireSamples("segment", (file) => { segmentFile = file; segment(file); });

  $("#generate-model").addEventListener("change", fillGeneratorClasses);
  $("#generate-new-seed").addEventListener("click", newSeed);
  $("#generate-form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("#interpolate-form").addEventListener("submit", (event) => { event.preventDefault(); interpolate(); });

  loadModels();
}

start();
