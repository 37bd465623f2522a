/**
 * The samserve web page: upload (or drop, or pick the demo scene) an image, which the gateway embeds once; then
 * every hover, click and box is decoded in the browser by {@link module:samclient}. "Segment everything" asks
 * the gateway (GenerateMasks). Masks download as COCO JSON and PNG.
 *
 * Tests and benchmarks read the page through `window.samserveApp` (see {@link testHooks}), never its internals.
 *
 * @module app
 */

import * as samclient from "./samclient.js";
import * as rle from "./rle.js";
import { LABEL, SamClient } from "./samclient.js";

samclient.configureRuntime();

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), file: $("file"), demo: $("demo"), progressBox: $("progress-box"), progress: $("progress"),
  progressText: $("progress-text"), undo: $("undo"), clear: $("clear"), choices: $("choices"),
  everything: $("everything"), pointsPerSide: $("points-per-side"), predIouThresh: $("pred-iou-thresh"),
  stabilityThresh: $("stability-thresh"), everythingInfo: $("everything-info"), downloadCoco: $("download-coco"),
  downloadPolygons: $("download-polygons"),
  downloadPng: $("download-png"), token: $("token"), stage: $("stage"), placeholder: $("placeholder"),
  imageLayer: $("image-layer"), maskLayer: $("mask-layer"), overlay: $("overlay-layer"),
};

/** Colour of the selected mask (opaque on the mask layer; the layer itself is translucent). */
const SELECTED_COLOR = [30, 111, 217];
const HOVER_COLOR = [255, 196, 0];
const HOVER_ALPHA = 120;
const CHOICE_COLORS = [[30, 111, 217], [214, 69, 65], [46, 160, 67]];
const DRAG_THRESHOLD_PX = 5;
/** Segment-everything thresholds per model variant (ModelInfo.variant) where the official defaults (0.88 / 0.95)
 * suit it badly: the shipped scenes model's card (build/checkpoints/MODEL_CARD.md) says about 0.2 / 0.5. */
const EVERYTHING_THRESHOLDS = { scenes: { predIouThresh: 0.2, stabilityScoreThresh: 0.5 } };

const state = {
  client: new SamClient({ token: sessionStorage.getItem("samserve-token") || null }),
  decoder: null,          // Promise<MaskDecoder>
  image: null,            // {name, blob, bitmap, width, height, imageId}
  embedding: null,        // ImageEmbedding
  points: [],             // committed prompt points [{x, y, label}]
  box: null,              // committed box [x0, y0, x1, y1]
  history: [],            // earlier {points, box} for undo
  result: null,           // decode result of the committed prompt
  selected: 0,            // index into result.masks
  everything: null,       // {response, masks: [{mask, rle, record, color}]}
  hover: { busy: false, pending: null, point: null },
  drag: null,             // {x0, y0, x1, y1, screenX, screenY, moved}
  cursor: null,           // keyboard cursor {x, y}
  latencies: [],          // hover-to-mask milliseconds, per drawn preview
  counters: { decodes: 0, hoverDraws: 0, commits: 0 },
  generation: 0,          // bumped per image, so late answers for an earlier image are dropped
  stateLog: [],           // every page state, in order (tests)
  progressLog: [],        // every progress stage shown, in order (tests)
};

// ---------------------------------------------------------------------------------------------------------------
// Status and progress.

function setState(name) {
  document.body.dataset.state = name;
  state.stateLog.push(name);
}

function status(text) { ui.status.textContent = text; }

const STAGES = ["Uploading the image", "Embedding on the server (the encoder runs once per image)",
  "Downloading the embedding", "Loading the decoder"];
let progressTimer = null;

function progress(stage, started) {
  if (stage === null) {
    clearInterval(progressTimer);
    ui.progressBox.hidden = true;
    return;
  }
  ui.progressBox.hidden = false;
  ui.progress.value = stage;
  state.progressLog.push(STAGES[stage]);
  const tick = () => {
    ui.progressText.textContent = `${STAGES[stage]}… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  };
  clearInterval(progressTimer);
  tick();
  progressTimer = setInterval(tick, 100);
}

function fail(error) {
  console.error(error);
  progress(null);
  status(`Error: ${error.message}`);
  setState("error");
}

// ---------------------------------------------------------------------------------------------------------------
// Loading an image.

/**
 * Show an image, embed it on the server (once: the gateway caches it by content), fetch its embedding and the
 * decoder, and get ready to decode prompts locally.
 *
 * @param {Blob} blob encoded image.
 * @param {string} name file name (for the downloads).
 */
async function loadImage(blob, name) {
  const generation = ++state.generation;
  const started = performance.now();
  setState("embedding");
  resetPrompts(false);
  state.everything = null;
  state.embedding = null;
  updateButtons();
  try {
    progress(0, started);
    status(`Embedding ${name}…`);
    state.decoder ??= state.client.decoder().catch((e) => { state.decoder = null; throw e; });
    const bitmapPromise = createImageBitmap(blob, { imageOrientation: "from-image" });
    const embedPromise = state.client.embed(blob);
    const embedded = await embedPromise.then((r) => { progress(1, started); return r; });
    if (generation !== state.generation) return;
    progress(2, started);
    const embedding = await state.client.embedding(embedded.imageId);
    progress(3, started);
    await state.decoder;
    const bitmap = await bitmapPromise;
    if (generation !== state.generation) return;
    state.image = { name, blob, bitmap, width: embedding.width, height: embedding.height, imageId: embedded.imageId };
    state.embedding = embedding;
    showImage();
    progress(null);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status(`${name}: ${embedding.width} × ${embedding.height}, ${embedded.cached ? "embedding cached" : "embedded"}` +
      ` in ${seconds} s. Hover to preview, click to add points.`);
    setState("ready");
    updateButtons();
    ui.stage.focus();
  } catch (error) {
    if (generation === state.generation) fail(error);
  }
}

function showImage() {
  const { width, height, bitmap } = state.image;
  for (const canvas of [ui.imageLayer, ui.maskLayer, ui.overlay]) {
    canvas.width = width;
    canvas.height = height;
    canvas.hidden = false;
  }
  ui.placeholder.hidden = true;
  ui.imageLayer.getContext("2d").drawImage(bitmap, 0, 0, width, height);
  clearCanvas(ui.maskLayer);
  clearCanvas(ui.overlay);
  fitStage();
}

/** Scale the canvases (CSS only; they keep the image's pixel size) to fit the stage. */
function fitStage() {
  if (!state.image) return;
  const { width, height } = state.image;
  const room = ui.stage.clientWidth - 16;
  const maxHeight = window.innerHeight * 0.82;
  const scale = Math.min(room / width, maxHeight / height);
  for (const canvas of [ui.imageLayer, ui.maskLayer, ui.overlay]) {
    canvas.style.width = `${Math.round(width * scale)}px`;
    canvas.style.height = `${Math.round(height * scale)}px`;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing.

function clearCanvas(canvas) { canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height); }

/** Paint masks into RGBA pixels: each `[mask, [r, g, b], alpha]` in order (later ones on top). */
function paint(width, height, layers) {
  const pixels = new ImageData(width, height);
  const data = new Uint32Array(pixels.data.buffer);
  for (const [mask, [r, g, b], alpha] of layers) {
    const value = ((alpha << 24) | (b << 16) | (g << 8) | r) >>> 0; // little-endian RGBA
    for (let i = 0; i < mask.length; i++) if (mask[i]) data[i] = value;
  }
  return pixels;
}

/** Image pixels per CSS pixel (markers keep their on-screen size). */
function pixelScale() {
  return state.image ? state.image.width / ui.overlay.getBoundingClientRect().width : 1;
}

function drawMarkers(ctx) {
  const s = pixelScale();
  for (const p of state.points) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, 5 * s, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === LABEL.FOREGROUND ? "#2ea043" : "#d64541";
    ctx.fill();
    ctx.lineWidth = 1.5 * s;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  const box = state.drag?.moved ? dragBox() : state.box;
  if (box) {
    ctx.lineWidth = 2 * s;
    ctx.strokeStyle = "#1e6fd9";
    ctx.setLineDash([6 * s, 4 * s]);
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.setLineDash([]);
  }
  if (state.cursor) {
    ctx.lineWidth = 1.5 * s;
    ctx.strokeStyle = "#000";
    const { x, y } = state.cursor;
    ctx.beginPath();
    ctx.moveTo(x - 8 * s, y); ctx.lineTo(x + 8 * s, y);
    ctx.moveTo(x, y - 8 * s); ctx.lineTo(x, y + 8 * s);
    ctx.stroke();
  }
}

/** The overlay: the hover preview (when given) under the prompt markers. */
function drawOverlay(previewMask = null) {
  const { width, height } = state.image;
  const ctx = ui.overlay.getContext("2d");
  if (previewMask) ctx.putImageData(paint(width, height, [[previewMask, HOVER_COLOR, HOVER_ALPHA]]), 0, 0);
  else ctx.clearRect(0, 0, width, height);
  drawMarkers(ctx);
}

/** The mask layer: the selected mask of the committed prompt, or every mask of "segment everything". */
function drawMasks() {
  const { width, height } = state.image;
  const ctx = ui.maskLayer.getContext("2d");
  if (state.everything) {
    ctx.putImageData(paint(width, height, state.everything.masks.map((m) => [m.mask, m.color, 255])), 0, 0);
  } else if (state.result) {
    const color = state.result.masks.length > 1 ? CHOICE_COLORS[state.selected % CHOICE_COLORS.length] : SELECTED_COLOR;
    ctx.putImageData(paint(width, height, [[state.result.masks[state.selected], color, 255]]), 0, 0);
  } else {
    ctx.clearRect(0, 0, width, height);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Prompts and decoding.

function currentPrompt(extraPoint = null) {
  const points = extraPoint ? [...state.points, extraPoint] : state.points;
  if (!points.length && !state.box) return null;
  // One point alone is ambiguous: the multimask answers (tokens 1..3) let the user pick; more prompts: token 0.
  return { points, box: state.box, multimask: points.length === 1 && !state.box };
}

function bestIndex(scores) {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i] > scores[best]) best = i;
  return best;
}

async function decode(prompt, options = {}) {
  const decoder = await state.decoder;
  const result = await decoder.decode(state.embedding, prompt, options);
  state.counters.decodes++;
  return result;
}

/** Decode the committed prompt and show its mask(s) and choices. */
async function commit() {
  const generation = state.generation;
  state.everything = null;
  const prompt = currentPrompt();
  if (!prompt) {
    state.result = null;
    renderChoices();
    drawMasks();
    drawOverlay();
    updateButtons();
    state.counters.commits++;
    return;
  }
  setState("decoding");
  try {
    const result = await decode(prompt);
    if (generation !== state.generation) return;
    state.result = { ...result, prompt };
    state.selected = bestIndex(result.scores);
    renderChoices();
    drawMasks();
    drawOverlay();
    updateButtons();
    state.counters.commits++;
    setState("ready");
  } catch (error) {
    fail(error);
  }
}

function pushHistory() {
  state.history.push({ points: state.points, box: state.box });
}

function addPoint(x, y, label) {
  if (!state.embedding) return;
  pushHistory();
  state.points = [...state.points, { x, y, label }];
  commit();
}

function setBox(box) {
  pushHistory();
  state.box = box;
  commit();
}

function undo() {
  if (state.everything && !state.history.length) return clearAll();
  const previous = state.history.pop();
  if (!previous) return;
  state.points = previous.points;
  state.box = previous.box;
  commit();
}

function resetPrompts(redraw = true) {
  state.points = [];
  state.box = null;
  state.history = [];
  state.result = null;
  state.selected = 0;
  renderChoices();
  if (redraw && state.image) {
    drawMasks();
    drawOverlay();
  }
}

function clearAll() {
  state.everything = null;
  ui.everythingInfo.textContent = "";
  resetPrompts();
  updateButtons();
  state.counters.commits++;
}

function select(index) {
  if (!state.result || index < 0 || index >= state.result.masks.length) return;
  state.selected = index;
  renderChoices();
  drawMasks();
}

function renderChoices() {
  ui.choices.replaceChildren();
  const result = state.result;
  if (!result || result.masks.length < 2) return;
  result.scores.forEach((score, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("role", "radio");
    button.setAttribute("aria-checked", String(i === state.selected));
    button.dataset.index = String(i);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${CHOICE_COLORS[i % CHOICE_COLORS.length].join(",")})`;
    const label = document.createElement("span");
    label.append(swatch, `Mask ${i + 1}`);
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = `score ${score.toFixed(3)}`;
    button.append(label, value);
    button.addEventListener("click", () => select(i));
    ui.choices.append(button);
  });
}

// Hover: one decode in flight; the newest pointer position waits, older ones are dropped.
function hover(x, y, eventTime) {
  if (!state.embedding || state.drag) return;
  state.hover.pending = { x, y, eventTime };
  if (!state.hover.busy) runHover();
}

async function runHover() {
  state.hover.busy = true;
  const generation = state.generation;
  try {
    while (state.hover.pending) {
      const { x, y, eventTime } = state.hover.pending;
      state.hover.pending = null;
      const prompt = currentPrompt({ x, y, label: LABEL.FOREGROUND });
      const decodeStart = performance.now();
      const result = await decode(prompt, { best: true });
      const decodeMs = performance.now() - decodeStart;
      if (generation !== state.generation || state.drag || !state.hover.point) continue;
      drawOverlay(result.masks[0]);
      const entry = { ms: performance.now() - eventTime, decodeMs, frameMs: null, x, y };
      state.latencies.push(entry);
      state.counters.hoverDraws++;
      requestAnimationFrame(() => { entry.frameMs = performance.now() - eventTime; });
    }
  } catch (error) {
    fail(error);
  } finally {
    state.hover.busy = false;
  }
}

function endHover() {
  state.hover.point = null;
  state.hover.pending = null;
  if (state.image) drawOverlay();
}

// ---------------------------------------------------------------------------------------------------------------
// Segment everything.

/** Distinct colours: golden-angle hues at alternating lightness; exact RGB values never repeat. */
function distinctColors(n) {
  const colors = [];
  const seen = new Set();
  for (let i = 0; colors.length < n; i++) {
    const h = (i * 137.508) % 360;
    const l = [0.5, 0.38, 0.62][i % 3];
    const rgb = hslToRgb(h, 0.75, l);
    const key = rgb.join(",");
    if (!seen.has(key) && key !== "0,0,0") {
      seen.add(key);
      colors.push(rgb);
    }
  }
  return colors;
}

function hslToRgb(h, s, l) {
  const a = s * Math.min(l, 1 - l);
  const f = (n) => {
    const k = (n + h / 30) % 12;
    return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

/** GenerateMasks parameters from the form (an empty field: the server's default). */
function everythingParameters() {
  const parameters = { maskEncoding: "MASK_ENCODING_RLE" };
  const fields = [["pointsPerSide", ui.pointsPerSide, parseInt], ["predIouThresh", ui.predIouThresh, parseFloat],
    ["stabilityScoreThresh", ui.stabilityThresh, parseFloat]];
  for (const [name, input, parse] of fields) {
    const value = parse(input.value);
    if (Number.isFinite(value)) parameters[name] = value;
  }
  return parameters;
}

/** Prefill the thresholds suited to the served model. */
async function suggestThresholds() {
  const model = await state.client.model();
  const suggested = EVERYTHING_THRESHOLDS[model.variant];
  if (!suggested) return;
  ui.predIouThresh.value = String(suggested.predIouThresh);
  ui.stabilityThresh.value = String(suggested.stabilityScoreThresh);
}

async function segmentEverything() {
  if (!state.embedding) return;
  const generation = state.generation;
  const started = performance.now();
  setState("everything");
  status("Segment everything: the server decodes a grid of points…");
  ui.everything.disabled = true;
  try {
    const response = await state.client.generateMasks(state.image.imageId, everythingParameters());
    if (generation !== state.generation) return;
    const records = response.masks ?? [];
    const colors = distinctColors(records.length);
    // Largest first, so smaller (often nested) masks stay visible on top.
    const order = records.map((_, i) => i).sort((a, b) => Number(records[b].area) - Number(records[a].area));
    const masks = order.map((i, k) => {
      const record = records[i];
      const counts = new TextDecoder().decode(samclient.base64ToBytes(record.rle.counts));
      const r = { size: record.rle.size.map(Number), counts };
      return { mask: rle.decodeRle(r), rle: r, record, color: colors[k] };
    });
    resetPrompts(false);
    state.everything = { response, masks };
    drawMasks();
    drawOverlay();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    ui.everythingInfo.textContent = `${masks.length} masks from ${response.points} points in ${seconds} s`;
    status(`Segment everything: ${masks.length} masks.`);
    setState("everything-ready");
  } catch (error) {
    fail(error);
  } finally {
    updateButtons();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Downloads.

function baseName() { return (state.image?.name ?? "image").replace(/\.[^.]*$/, ""); }

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** The shown masks as COCO annotations (RLE): the server's for "segment everything", else the selected mask. */
function cocoDocument() {
  const { width, height, name, imageId } = state.image;
  const annotations = [];
  if (state.everything) {
    state.everything.masks.forEach(({ rle: segmentation, record, mask }, i) => {
      annotations.push({
        id: i + 1, image_id: 1, category_id: 1, iscrowd: 0, segmentation,
        area: Number(record.area), bbox: rle.maskStats(mask, height, width).bbox,
        predicted_iou: record.predictedIou, stability_score: record.stabilityScore,
        point_coords: [[record.pointCoords?.x ?? 0, record.pointCoords?.y ?? 0]],
      });
    });
  } else if (state.result) {
    const mask = state.result.masks[state.selected];
    const stats = rle.maskStats(mask, height, width);
    annotations.push({
      id: 1, image_id: 1, category_id: 1, iscrowd: 0, segmentation: rle.encodeRle(mask, height, width),
      area: stats.area, bbox: stats.bbox, predicted_iou: state.result.scores[state.selected],
      mask_token: state.result.tokens[state.selected],
      prompt: { points: state.points.map((p) => ({ x: p.x, y: p.y, label: p.label })), box: state.box },
    });
  }
  return {
    info: { description: "samserve masks", image_id: imageId, model_id: state.embedding.modelId ?? null },
    images: [{ id: 1, file_name: name, width, height }],
    categories: [{ id: 1, name: "object" }],
    annotations,
  };
}

function downloadCoco() {
  const text = JSON.stringify(cocoDocument());
  save(new Blob([text], { type: "application/json" }), `${baseName()}.coco.json`);
}

/**
 * The shown masks as COCO polygons, made by the server (MASK_ENCODING_POLYGON, its default tolerance of 1 px):
 * "segment everything" is asked again for polygons with the same parameters (its embeddings are cached), a clicked
 * mask is asked of Segment with the current prompt. Each annotation's segmentation is its exterior rings (COCO has
 * no holes); `rings` keeps every ring with its role ("interior" = a hole in ring `parent`).
 */
async function cocoPolygonDocument() {
  const { imageId } = state.image;
  let masks;
  if (state.everything) {
    const response = await state.client.generateMasks(imageId, {
      ...everythingParameters(), maskEncoding: "MASK_ENCODING_POLYGON",
    });
    masks = (response.masks ?? []).map((record) => ({
      polygons: record.polygons, extra: { area: Number(record.area), predicted_iou: record.predictedIou },
    }));
  } else {
    const token = state.result.tokens[state.selected];
    const response = await state.client.segment(imageId, [currentPrompt()], "MASK_ENCODING_POLYGON");
    const mask = response.results[0].masks.find((m) => (m.tokenIndex ?? 0) === token);
    masks = [{ polygons: mask.polygons, extra: { area: Number(mask.area), predicted_iou: mask.predictedIou,
      mask_token: token } }];
  }
  const document = cocoDocument();
  document.annotations = masks.map(({ polygons, extra }, i) => {
    // protobuf JSON leaves out zeros: a hole of ring 0 has no "parent" field
    const rings = (polygons?.rings ?? []).map((ring) => ({
      points: ring.points, role: ring.role === "RING_ROLE_INTERIOR" ? "interior" : "exterior",
      parent: ring.role === "RING_ROLE_INTERIOR" ? (ring.parent ?? 0) : null,
    }));
    return {
      id: i + 1, image_id: 1, category_id: 1, iscrowd: 0,
      segmentation: rings.filter((ring) => ring.role === "exterior").map((ring) => ring.points),
      rings, polygon_iou: polygons?.iou ?? 0, ...extra,
    };
  });
  return document;
}

async function downloadCocoPolygons() {
  try {
    const text = JSON.stringify(await cocoPolygonDocument());
    save(new Blob([text], { type: "application/json" }), `${baseName()}.polygons.coco.json`);
  } catch (error) {
    fail(error);
  }
}

/** PNG at the image's size: one mask white on black, or every mask in its colour on black. */
async function downloadPng() {
  const { width, height } = state.image;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const layers = state.everything
    ? state.everything.masks.map((m) => [m.mask, m.color, 255])
    : [[state.result.masks[state.selected], [255, 255, 255], 255]];
  const pixels = paint(width, height, layers);
  const data = new Uint32Array(pixels.data.buffer);
  for (let i = 0; i < data.length; i++) if (!data[i]) data[i] = 0xff000000; // opaque black background
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  save(blob, `${baseName()}.${state.everything ? "everything" : "mask"}.png`);
}

// ---------------------------------------------------------------------------------------------------------------
// Events.

function updateButtons() {
  const ready = Boolean(state.embedding);
  const hasMasks = Boolean(state.result || state.everything);
  ui.undo.disabled = !ready || (!state.history.length && !state.everything);
  ui.clear.disabled = !ready || (!state.points.length && !state.box && !state.everything);
  ui.everything.disabled = !ready;
  ui.downloadCoco.disabled = !hasMasks;
  ui.downloadPolygons.disabled = !hasMasks;
  ui.downloadPng.disabled = !hasMasks;
}

/** Image pixel coordinates of a pointer event (floats, as the API takes them). */
function imagePoint(event) {
  const rect = ui.overlay.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * state.image.width;
  const y = ((event.clientY - rect.top) / rect.height) * state.image.height;
  return { x: clamp(x, 0, state.image.width - 1e-3), y: clamp(y, 0, state.image.height - 1e-3) };
}

function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }

function dragBox() {
  const d = state.drag;
  return [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)];
}

ui.overlay.addEventListener("pointerdown", (event) => {
  if (!state.embedding) return;
  event.preventDefault();
  ui.stage.focus();
  const { x, y } = imagePoint(event);
  if (event.button === 2) {
    addPoint(x, y, LABEL.BACKGROUND);
    return;
  }
  if (event.button !== 0) return;
  ui.overlay.setPointerCapture(event.pointerId);
  state.drag = { x0: x, y0: y, x1: x, y1: y, screenX: event.clientX, screenY: event.clientY, moved: false };
});

// Hover previews listen to pointerrawupdate where the browser has it (Chromium, secure contexts such as localhost):
// it fires as the input arrives, where pointermove waits for the next animation frame.
const RAW_POINTER = "onpointerrawupdate" in window;

function hoverEvent(event) {
  if (!state.embedding || state.drag) return;
  const { x, y } = imagePoint(event);
  state.cursor = null;
  state.hover.point = { x, y };
  hover(x, y, event.timeStamp);
}

if (RAW_POINTER) ui.overlay.addEventListener("pointerrawupdate", hoverEvent);

ui.overlay.addEventListener("pointermove", (event) => {
  if (!state.embedding) return;
  if (!state.drag) {
    if (!RAW_POINTER) hoverEvent(event);
    return;
  }
  const { x, y } = imagePoint(event);
  state.drag.x1 = x;
  state.drag.y1 = y;
  const distance = Math.hypot(event.clientX - state.drag.screenX, event.clientY - state.drag.screenY);
  state.drag.moved ||= distance > DRAG_THRESHOLD_PX;
  if (state.drag.moved) drawOverlay();
});

ui.overlay.addEventListener("pointerup", (event) => {
  const drag = state.drag;
  if (!drag || event.button !== 0) return;
  const box = dragBox();
  state.drag = null;
  if (drag.moved) setBox(box);
  else addPoint(drag.x0, drag.y0, LABEL.FOREGROUND);
});

ui.overlay.addEventListener("pointercancel", () => { state.drag = null; drawOverlay(); });
ui.overlay.addEventListener("pointerleave", () => { if (!state.drag) endHover(); });
ui.overlay.addEventListener("contextmenu", (event) => event.preventDefault());

function moveCursor(dx, dy) {
  if (!state.embedding) return;
  const c = state.cursor ?? { x: state.image.width / 2, y: state.image.height / 2 };
  state.cursor = { x: clamp(c.x + dx, 0, state.image.width - 1), y: clamp(c.y + dy, 0, state.image.height - 1) };
  state.hover.point = state.cursor;
  hover(state.cursor.x, state.cursor.y, performance.now());
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement) return;
  const key = event.key;
  const step = (event.shiftKey ? 10 : 1) * Math.max(1, Math.round(pixelScale() * 4));
  const actions = {
    Escape: clearAll, c: clearAll, C: clearAll, u: undo, U: undo, e: segmentEverything, E: segmentEverything,
    ArrowLeft: () => moveCursor(-step, 0), ArrowRight: () => moveCursor(step, 0),
    ArrowUp: () => moveCursor(0, -step), ArrowDown: () => moveCursor(0, step),
    Enter: () => state.cursor && addPoint(state.cursor.x, state.cursor.y,
      event.shiftKey ? LABEL.BACKGROUND : LABEL.FOREGROUND),
    1: () => select(0), 2: () => select(1), 3: () => select(2),
  };
  let action = actions[key];
  if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "z") action = undo;
  else if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (!action || !state.embedding) return;
  if ((key.startsWith("Arrow") || key === "Enter") && document.activeElement !== ui.stage) return; // (buttons' own keys)
  event.preventDefault();
  action();
});

ui.file.addEventListener("change", () => {
  const file = ui.file.files?.[0];
  if (file) loadImage(file, file.name);
  ui.file.value = "";
});

ui.demo.addEventListener("click", async () => {
  setState("loading"); // at once: an earlier error state must not outlive the click (tests wait on the state)
  try {
    const response = await fetch("demo.png");
    if (!response.ok) throw new Error(`demo.png: HTTP ${response.status}`);
    await loadImage(await response.blob(), "demo.png");
  } catch (error) {
    fail(error);
  }
});

for (const name of ["dragenter", "dragover"]) {
  document.addEventListener(name, (event) => {
    event.preventDefault();
    ui.stage.classList.add("dragover");
  });
}
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) ui.stage.classList.remove("dragover");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.stage.classList.remove("dragover");
  const file = [...(event.dataTransfer?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (file) loadImage(file, file.name);
});

ui.undo.addEventListener("click", undo);
ui.clear.addEventListener("click", clearAll);
ui.everything.addEventListener("click", segmentEverything);
ui.downloadCoco.addEventListener("click", downloadCoco);
ui.downloadPolygons.addEventListener("click", downloadCocoPolygons);
ui.downloadPng.addEventListener("click", downloadPng);
ui.token.value = state.client.token ?? "";
function applyToken() {
  state.client.token = ui.token.value.trim() || null;
  if (state.client.token) sessionStorage.setItem("samserve-token", state.client.token);
  else sessionStorage.removeItem("samserve-token");
  suggestThresholds().catch(() => undefined);
}
ui.token.addEventListener("change", applyToken);
$("token-form").addEventListener("submit", (event) => { event.preventDefault(); applyToken(); });
window.addEventListener("resize", fitStage);

// ---------------------------------------------------------------------------------------------------------------
// Test hooks.

/**
 * What tests and benchmarks read (`window.samserveApp`): plain snapshots, never live internals.
 *
 * @namespace testHooks
 */
window.samserveApp = {
  /** The modules, for tests that call the client directly. */
  lib: { samclient, rle },
  client: state.client,
  /** @returns {Promise<samclient.MaskDecoder>} */
  decoder: () => (state.decoder ??= state.client.decoder()),
  /** The image's id, size and embedding geometry, or null before one is loaded. */
  image: () => state.image && {
    imageId: state.image.imageId, width: state.image.width, height: state.image.height,
    inputWidth: state.embedding.inputWidth, inputHeight: state.embedding.inputHeight,
  },
  embedding: () => state.embedding,
  /** The committed prompt as the API takes it: points {x, y, label (1 fg / 0 bg)}, box, multimask. */
  prompt: () => currentPrompt(),
  /** The selected mask: {width, height, mask: number[] (0/1, row-major), score, token, scores}. */
  currentMask: () => state.result && {
    width: state.result.width, height: state.result.height, mask: Array.from(state.result.masks[state.selected]),
    score: state.result.scores[state.selected], token: state.result.tokens[state.selected],
    scores: Array.from(state.result.scores), tokens: state.result.tokens, selected: state.selected,
  },
  /** "Segment everything": how many masks are drawn, and their colours. */
  everything: () => state.everything && {
    count: state.everything.masks.length, colors: state.everything.masks.map((m) => m.color),
    serverCount: (state.everything.response.masks ?? []).length,
  },
  /** Hover-to-mask latencies (ms from the pointer event to the preview drawn). */
  latencies: () => state.latencies.map((l) => l.ms),
  /** Per drawn preview: ms (pointer event to the mask drawn into the canvas), decodeMs (decoder run + upscaling),
   * frameMs (pointer event to the next animation frame after the draw; null until it ran), x, y. */
  latencyLog: () => state.latencies.map((l) => ({ ...l })),
  resetLatencies: () => { state.latencies = []; },
  counters: () => ({ ...state.counters }),
  /** Every page state (body[data-state]) and every progress stage shown so far, in order. */
  history: () => ({ states: [...state.stateLog], progress: [...state.progressLog] }),
  /** The GenerateMasks parameters "Segment everything" sends (protobuf JSON names). */
  everythingParameters: () => everythingParameters(),
  load: (blob, name) => loadImage(blob, name),
};

suggestThresholds().catch(() => undefined); // (an error here, e.g. auth, is reported when an image loads)
status("Ready: upload or drop an image, or pick the demo scene.");
setState("idle");
