/**
 * samclient: samserve from a browser (or Node), with SAM's prompt decoder run client-side by onnxruntime-web.
 *
 * The gateway embeds an image once (the heavy encoder, server-side) and hands out the embedding
 * (`GET /v1/images/{id}/embedding`) and its decoder (`GET /v1/model` -> `decoder.url`). {@link MaskDecoder} then
 * turns clicks and boxes into masks in milliseconds, mirroring the server's post-processing exactly
 * (service/samserve/vision/processing.py): point scaling to the resized image, the padding point, box corners after
 * the points, token selection (token 0 single-mask, tokens 1..M-1 multimask), bilinear upscaling with half-pixel
 * centres to S x S, the crop to the resized image, bilinear to the original size, threshold at the model's
 * mask threshold.
 *
 * Coordinates are original-image pixels (x right, y down), as in the gRPC/HTTP API. Masks are row-major
 * H x W Uint8Arrays holding 0 or 1.
 *
 * @module samclient
 */

import * as ort from "onnxruntime-web/wasm";

/** Point labels of the decoder graph (service/samserve/core/model_spec.py). */
export const LABEL = Object.freeze({ PADDING: -1, BACKGROUND: 0, FOREGROUND: 1, BOX_TOP_LEFT: 2, BOX_BOTTOM_RIGHT: 3 });

/**
 * Configure onnxruntime-web once, before the first session: where its .wasm file and its JS glue (which each
 * worker thread loads) are served and how many threads it may use ({@link defaultThreads}).
 *
 * @param {object} [options]
 * @param {string} [options.wasmUrl] URL of `ort-wasm-simd-threaded.wasm` (default: beside this bundle).
 * @param {string} [options.glueUrl] URL of `ort-wasm-simd-threaded.mjs` (default: beside this bundle).
 * @param {number} [options.numThreads] default {@link defaultThreads}
 */
export function configureRuntime({ wasmUrl, glueUrl, numThreads = defaultThreads() } = {}) {
  const url = wasmUrl ?? new URL("ort-wasm-simd-threaded.wasm", import.meta.url).href;
  const mjs = glueUrl ?? new URL("ort-wasm-simd-threaded.mjs", import.meta.url).href;
  ort.env.wasm.wasmPaths = { wasm: url, mjs };
  ort.env.wasm.numThreads = numThreads;
  ort.env.wasm.proxy = false;
}

/**
 * Decoder threads: up to 4 of the machine's cores where the page is cross-origin isolated (SharedArrayBuffer,
 * which wasm threads need: the gateway sends COOP/COEP with the page), else 1.
 */
export function defaultThreads() {
  const isolated = typeof crossOriginIsolated !== "undefined" && crossOriginIsolated;
  return isolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
}

/** An HTTP error answer of the gateway (Google's status mapping; body `{code, message, details}`). */
export class SamServeError extends Error {
  /**
   * @param {number} status HTTP status.
   * @param {number|undefined} code gRPC status code from the body.
   * @param {string} message
   * @param {Array<object>} [details]
   */
  constructor(status, code, message, details = []) {
    super(`HTTP ${status}: ${message}`);
    this.name = "SamServeError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Byte and number helpers.

/**
 * Bytes of a base64 string (protobuf's JSON mapping of `bytes`; standard or URL-safe alphabet).
 *
 * @param {string} text
 * @returns {Uint8Array}
 */
export function base64ToBytes(text) {
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

/**
 * Base64 of bytes (standard alphabet, padded).
 *
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function bytesToBase64(bytes) {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

let halfTable = null;

/** float32 value of every float16 bit pattern (IEEE 754 binary16: subnormals, infinities, NaN). */
function halfToFloatTable() {
  if (halfTable) return halfTable;
  halfTable = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    let value;
    if (exponent === 0) value = fraction * 2 ** -24;
    else if (exponent === 31) value = fraction ? NaN : Infinity;
    else value = (1 + fraction / 1024) * 2 ** (exponent - 15);
    halfTable[h] = sign * value;
  }
  return halfTable;
}

/**
 * float16 little-endian bytes to float32 values.
 *
 * @param {Uint8Array} bytes 2 bytes per value.
 * @returns {Float32Array}
 */
export function float16ToFloat32(bytes) {
  if (bytes.length % 2) throw new Error(`float16 data has an odd byte count ${bytes.length}`);
  const table = halfToFloatTable();
  const n = bytes.length / 2;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = table[bytes[2 * i] | (bytes[2 * i + 1] << 8)];
  return out;
}

/** Hex SHA-256 of bytes (Web Crypto; null where it is unavailable, e.g. a non-secure origin). */
async function sha256Hex(bytes) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------------------------------------------------------
// Post-processing: the exact mirror of processing.upscale_logits (cv2.INTER_LINEAR, half-pixel centres).

/**
 * Source index pairs and weights of a 1-D bilinear resize with half-pixel centres (align_corners=False, as
 * OpenCV's INTER_LINEAR and torch's F.interpolate): dst i samples src at (i + 0.5) * src/dst - 0.5, clamped to
 * the edges. Only the first `count` destination samples are computed (the crop).
 *
 * @param {number} srcSize
 * @param {number} dstSize
 * @param {number} [count=dstSize]
 * @returns {{i0: Int32Array, i1: Int32Array, w1: Float32Array}}
 */
export function bilinearTaps(srcSize, dstSize, count = dstSize) {
  const i0 = new Int32Array(count);
  const i1 = new Int32Array(count);
  const w1 = new Float32Array(count);
  const scale = srcSize / dstSize;
  for (let d = 0; d < count; d++) {
    let f = (d + 0.5) * scale - 0.5;
    let s = Math.floor(f);
    f -= s;
    if (s < 0) { s = 0; f = 0; }
    if (s >= srcSize - 1) { s = srcSize - 1; f = 0; }
    i0[d] = s;
    i1[d] = Math.min(s + 1, srcSize - 1);
    w1[d] = f;
  }
  return { i0, i1, w1 };
}

/** Resize rows (last axis) of a rows x srcW plane with precomputed taps into rows x taps.length. */
function resizeRows(src, rows, srcW, taps) {
  const dstW = taps.i0.length;
  const out = new Float32Array(rows * dstW);
  const { i0, i1, w1 } = taps;
  for (let r = 0; r < rows; r++) {
    const s = r * srcW;
    const d = r * dstW;
    for (let x = 0; x < dstW; x++) {
      const a = src[s + i0[x]];
      out[d + x] = a + (src[s + i1[x]] - a) * w1[x];
    }
  }
  return out;
}

/** Resize columns of a srcH x width plane with precomputed taps into taps.length x width. */
function resizeColumns(src, width, taps) {
  const dstH = taps.i0.length;
  const out = new Float32Array(dstH * width);
  const { i0, i1, w1 } = taps;
  for (let y = 0; y < dstH; y++) {
    const a0 = i0[y] * width;
    const b0 = i1[y] * width;
    const w = w1[y];
    const d = y * width;
    for (let x = 0; x < width; x++) {
      const a = src[a0 + x];
      out[d + x] = a + (src[b0 + x] - a) * w;
    }
  }
  return out;
}

/**
 * Mask logits at the original (or a requested) size, as processing.upscale_logits: bilinear lowH x lowW ->
 * S x S, crop to inputHeight x inputWidth, bilinear to height x width. Bilinear resizing is separable, so each
 * axis goes through both stages on its own and only the cropped part of the S x S image is computed.
 *
 * @param {Float32Array} lowRes lowH x lowW logits, row-major.
 * @param {{lowH: number, lowW: number, imageSize: number, inputHeight: number, inputWidth: number,
 *          height: number, width: number}} geometry
 * @returns {Float32Array} height x width logits, row-major.
 */
export function upscaleLogits(lowRes, { lowH, lowW, imageSize, inputHeight, inputWidth, height, width }) {
  const colsS = bilinearTaps(lowW, imageSize, inputWidth);
  const rowsS = bilinearTaps(lowH, imageSize, inputHeight);
  const colsOut = bilinearTaps(inputWidth, width);
  const rowsOut = bilinearTaps(inputHeight, height);
  // Stage 1 (to the S x S padded input, cropped): rows then columns; stage 2 (to the output size): the same.
  const a = resizeRows(lowRes, lowH, lowW, colsS);          // lowH x inputWidth
  const b = resizeColumns(a, inputWidth, rowsS);            // inputHeight x inputWidth
  const c = resizeRows(b, inputHeight, inputWidth, colsOut); // inputHeight x width
  return resizeColumns(c, width, rowsOut);                  // height x width
}

/**
 * Binary mask of logits: 1 where strictly above the threshold (SAM: 0.0, never 0.5).
 *
 * @param {Float32Array} logits
 * @param {number} threshold
 * @returns {Uint8Array}
 */
export function binarize(logits, threshold) {
  const out = new Uint8Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i] > threshold ? 1 : 0;
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Prompts.

/**
 * A prompt in original-image pixels.
 *
 * @typedef {object} Prompt
 * @property {Array<{x: number, y: number, label: number}>} [points] label 1 foreground, 0 background.
 * @property {number[]} [box] [x0, y0, x1, y1].
 * @property {Float32Array} [maskInput] lowH x lowW logits of an earlier answer (its `lowResLogits`).
 * @property {boolean} [multimask=true] the M-1 multimask answers (tokens 1..M-1) instead of token 0.
 */

/**
 * The decoder's point tokens for one prompt, as processing.point_inputs: points (scaled to the resized image)
 * first, then the two box corners (labels 2, 3); without a box one padding point (0, 0) with label -1. The
 * coordinates are first rounded to float32, the wire type of the API's Point and Box, so that the same
 * prompt sent to the server decodes to the same tokens.
 *
 * @param {Prompt} prompt
 * @param {{width: number, height: number, inputWidth: number, inputHeight: number}} geometry
 * @returns {{coords: Float32Array, labels: Float32Array, count: number}} coords P x 2 (x, y), labels P.
 */
export function promptTokens(prompt, { width, height, inputWidth, inputHeight }) {
  const sx = inputWidth / width;
  const sy = inputHeight / height;
  const coords = [];
  const labels = [];
  for (const p of prompt.points ?? []) {
    coords.push(Math.fround(p.x) * sx, Math.fround(p.y) * sy);
    labels.push(p.label);
  }
  if (prompt.box) {
    const [x0, y0, x1, y1] = prompt.box.map(Math.fround);
    coords.push(x0 * sx, y0 * sy, x1 * sx, y1 * sy);
    labels.push(LABEL.BOX_TOP_LEFT, LABEL.BOX_BOTTOM_RIGHT);
  } else {
    coords.push(0, 0);
    labels.push(LABEL.PADDING);
  }
  return { coords: Float32Array.from(coords), labels: Float32Array.from(labels), count: labels.length };
}

/**
 * The mask tokens a prompt returns (processing.select_masks): 1..M-1 for multimask output, 0 otherwise.
 *
 * @param {boolean} multimask
 * @param {number} numMaskTokens M
 * @returns {number[]}
 */
export function selectTokens(multimask, numMaskTokens) {
  if (!multimask) return [0];
  return Array.from({ length: numMaskTokens - 1 }, (_, i) => i + 1);
}

// ---------------------------------------------------------------------------------------------------------------
// The decoder.

/**
 * The served decoder in onnxruntime-web, for one model (ModelInfo from `GET /v1/model`).
 */
export class MaskDecoder {
  /**
   * @param {ort.InferenceSession} session
   * @param {object} model ModelInfo (JSON mapping: imageSize, lowResMaskSize, numMaskTokens, maskThreshold, ...).
   */
  constructor(session, model) {
    this.session = session;
    this.model = model;
    this.lowH = model.lowResMaskSize[0];
    this.lowW = model.lowResMaskSize[1];
    this.numMaskTokens = model.numMaskTokens;
    this.maskThreshold = model.maskThreshold ?? 0;
    this.imageSize = model.imageSize;
    this._queue = Promise.resolve();
    this.noMask = new ort.Tensor("float32", new Float32Array(this.lowH * this.lowW), [1, 1, this.lowH, this.lowW]);
  }

  /**
   * A decoder from ONNX bytes.
   *
   * @param {Uint8Array|ArrayBuffer} onnx the decoder graph.
   * @param {object} model ModelInfo.
   * @returns {Promise<MaskDecoder>}
   */
  static async create(onnx, model) {
    const session = await ort.InferenceSession.create(onnx instanceof Uint8Array ? onnx : new Uint8Array(onnx), {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
    });
    return new MaskDecoder(session, model);
  }

  /**
   * Masks for one prompt on one image embedding, identical to the server's Segment answer for that prompt.
   *
   * @param {ImageEmbedding} embedding from {@link SamClient#embedding}.
   * @param {Prompt} prompt
   * @param {{width?: number, height?: number, masks?: boolean, best?: boolean}} [options] output size (default:
   *     the image's); masks=false returns only scores and low-res logits (no upscaling); best=true only the
   *     mask with the highest predicted IoU among the prompt's tokens (what a hover preview shows).
   * @returns {Promise<{masks: Uint8Array[], logits: Float32Array[], scores: number[], tokens: number[],
   *     lowResLogits: Float32Array[], width: number, height: number}>} one entry per returned mask token.
   */
  async decode(embedding, prompt, options = {}) {
    if (!(prompt.points?.length) && !prompt.box) throw new Error("a prompt needs points or a box");
    const { coords, labels, count } = promptTokens(prompt, embedding);
    const plane = this.lowH * this.lowW;
    let maskInput = this.noMask;
    if (prompt.maskInput) {
      if (prompt.maskInput.length !== plane) throw new Error(`maskInput must be ${this.lowH} x ${this.lowW}`);
      maskInput = new ort.Tensor("float32", Float32Array.from(prompt.maskInput), [1, 1, this.lowH, this.lowW]);
    }
    const feeds = {
      image_embeddings: embedding.tensor(),
      point_coords: new ort.Tensor("float32", coords, [1, count, 2]),
      point_labels: new ort.Tensor("float32", labels, [1, count]),
      mask_input: maskInput,
      has_mask_input: new ort.Tensor("float32", Float32Array.of(prompt.maskInput ? 1 : 0), [1]),
    };
    // One run at a time per session (onnxruntime-web refuses concurrent runs): later calls queue.
    const run = this._queue.then(() => this.session.run(feeds));
    this._queue = run.catch(() => undefined);
    const out = await run;
    const lowRes = out.low_res_masks.data;
    const iou = out.iou_predictions.data;
    let tokens = selectTokens(prompt.multimask ?? true, this.numMaskTokens);
    if (options.best) tokens = [tokens.reduce((best, t) => (iou[t] > iou[best] ? t : best))];
    const width = options.width ?? embedding.width;
    const height = options.height ?? embedding.height;
    const geometry = {
      lowH: this.lowH, lowW: this.lowW, imageSize: this.imageSize,
      inputHeight: embedding.inputHeight, inputWidth: embedding.inputWidth, height, width,
    };
    const result = { masks: [], logits: [], scores: [], tokens, lowResLogits: [], width, height };
    for (const t of tokens) {
      const low = lowRes.slice(t * plane, (t + 1) * plane);
      result.lowResLogits.push(low);
      result.scores.push(iou[t]);
      if (options.masks !== false) {
        const logits = upscaleLogits(low, geometry);
        result.logits.push(logits);
        result.masks.push(binarize(logits, this.maskThreshold));
      }
    }
    return result;
  }
}

/**
 * An image embedding for client-side decoding (GetEmbeddingResponse, with the data as float32).
 */
export class ImageEmbedding {
  /**
   * @param {object} response GetEmbeddingResponse in protobuf's JSON mapping.
   */
  constructor(response) {
    const e = response.embedding;
    if (e.dtype !== "float16" || e.layoutVersion !== 1) {
      throw new Error(`unsupported embedding layout ${e.layoutVersion} / ${e.dtype}`);
    }
    this.imageId = response.imageId;
    this.width = response.width;
    this.height = response.height;
    this.inputWidth = response.inputWidth;
    this.inputHeight = response.inputHeight;
    this.imageSize = response.imageSize;
    this.weightsSha256 = response.weightsSha256;
    this.shape = e.shape.map(Number);
    this.data = float16ToFloat32(base64ToBytes(e.data));
    const expected = this.shape.reduce((a, b) => a * b, 1);
    if (this.data.length !== expected) throw new Error(`embedding has ${this.data.length} values, not ${expected}`);
    this._tensor = null;
  }

  /** The decoder's `image_embeddings` input (1 x C x h x w float32), made once. */
  tensor() {
    this._tensor ??= new ort.Tensor("float32", this.data, this.shape);
    return this._tensor;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The HTTP client.

/** Prompt (this module's form) to the API's JSON Prompt. */
export function promptToJson(prompt) {
  const json = { multimaskOutput: prompt.multimask ?? true };
  if (prompt.points?.length) {
    json.points = prompt.points.map((p) => ({
      x: p.x, y: p.y, label: p.label === LABEL.FOREGROUND ? "POINT_LABEL_FOREGROUND" : "POINT_LABEL_BACKGROUND",
    }));
  }
  if (prompt.box) {
    const [x0, y0, x1, y1] = prompt.box;
    json.box = { x0, y0, x1, y1 };
  }
  return json;
}

/**
 * samserve's HTTP/JSON API (see the gateway's /openapi.json) plus client-side decoding.
 */
export class SamClient {
  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl=""] gateway origin ("" = this page's).
   * @param {string|null} [options.token] bearer token, when the gateway has auth on.
   */
  constructor({ baseUrl = "", token = null } = {}) {
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.token = token;
    this._model = null;
    this._decoder = null;
  }

  /** Request headers (the bearer token, when set). */
  headers(extra = {}) {
    return this.token ? { ...extra, Authorization: `Bearer ${this.token}` } : { ...extra };
  }

  /**
   * One API call; JSON in and out; a {@link SamServeError} for an error answer.
   *
   * @param {string} method
   * @param {string} path
   * @param {object|Blob|ArrayBuffer|Uint8Array} [body] JSON object, or raw bytes (sent as `contentType`).
   * @param {string} [contentType]
   * @returns {Promise<object>}
   */
  async request(method, path, body, contentType) {
    const init = { method, headers: this.headers() };
    if (body !== undefined) {
      const raw = body instanceof Blob || body instanceof ArrayBuffer || ArrayBuffer.isView(body);
      init.body = raw ? body : JSON.stringify(body);
      init.headers["Content-Type"] = raw ? (contentType || body.type || "application/octet-stream") : "application/json";
    }
    const response = await fetch(this.baseUrl + path, init);
    if (!response.ok) {
      let error = {};
      try { error = await response.json(); } catch { /* not JSON */ }
      throw new SamServeError(response.status, error.code, error.message ?? response.statusText, error.details);
    }
    return response.json();
  }

  /** GET /v1/model: the served model (cached after the first call). @returns {Promise<object>} ModelInfo. */
  async model() {
    this._model ??= this.request("GET", "/v1/model").catch((e) => { this._model = null; throw e; });
    return this._model;
  }

  /**
   * The served model's decoder, fetched once (from the browser's Cache Storage when an earlier visit stored
   * it; the URL holds the weights digest, so a cached file never belongs to other weights) and checked against
   * its SHA-256.
   *
   * @returns {Promise<MaskDecoder>}
   */
  async decoder() {
    this._decoder ??= (async () => {
      const model = await this.model();
      if (!model.decoder?.url) throw new Error("this gateway gives no decoder (SAMSERVE_CLIENT_DECODER_DIR unset)");
      const bytes = await this._decoderBytes(model.decoder);
      return MaskDecoder.create(bytes, model);
    })().catch((e) => { this._decoder = null; throw e; });
    return this._decoder;
  }

  async _decoderBytes(info) {
    const url = new URL(this.baseUrl + info.url, globalThis.location?.href).href;
    const cache = globalThis.caches ? await caches.open("samserve-decoder").catch(() => null) : null;
    let response = cache ? await cache.match(url) : undefined;
    let fromCache = Boolean(response);
    if (!response) {
      response = await fetch(url, { headers: this.headers() });
      if (!response.ok) throw new SamServeError(response.status, undefined, `decoder download failed (${url})`);
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    const digest = await sha256Hex(bytes);
    if (digest && info.sha256 && digest !== info.sha256) {
      if (fromCache) await cache.delete(url);
      throw new Error(`decoder digest ${digest} is not the announced ${info.sha256}`);
    }
    if (cache && !fromCache) {
      await cache.put(url, new Response(bytes, { headers: { "Content-Type": "application/octet-stream" } }));
    }
    return bytes;
  }

  /**
   * POST /v1/images:embed with the image's bytes.
   *
   * @param {Blob|Uint8Array} image encoded image (JPEG, PNG, ...).
   * @returns {Promise<{imageId: string, width: number, height: number, cached: boolean, modelId: string}>}
   */
  async embed(image) {
    return this.request("POST", "/v1/images:embed", image, image.type || "application/octet-stream");
  }

  /**
   * GET /v1/images/{imageId}/embedding, decoded to float32.
   *
   * @param {string} imageId
   * @returns {Promise<ImageEmbedding>}
   */
  async embedding(imageId) {
    const response = await this.request("GET", `/v1/images/${encodeURIComponent(imageId)}/embedding`);
    return new ImageEmbedding(response);
  }

  /**
   * POST /v1/images/{imageId}:segment: the server's masks for prompts (the reference the client decodes to).
   *
   * @param {string} imageId
   * @param {Prompt[]} prompts
   * @param {string} [maskEncoding="MASK_ENCODING_RLE"]
   * @returns {Promise<object>} SegmentResponse.
   */
  async segment(imageId, prompts, maskEncoding = "MASK_ENCODING_RLE") {
    return this.request("POST", `/v1/images/${encodeURIComponent(imageId)}:segment`, {
      prompts: prompts.map(promptToJson), maskEncoding,
    });
  }

  /**
   * POST /v1/images/{imageId}:generateMasks: "segment everything".
   *
   * @param {string} imageId
   * @param {object} [parameters] GenerateMasksRequest fields (pointsPerSide, predIouThresh, ...).
   * @returns {Promise<object>} GenerateMasksResponse.
   */
  async generateMasks(imageId, parameters = {}) {
    return this.request("POST", `/v1/images/${encodeURIComponent(imageId)}:generateMasks`, {
      maskEncoding: "MASK_ENCODING_RLE", ...parameters,
    });
  }
}
