/**
 * COCO run-length encoding, byte for byte as pycocotools' `mask.encode` / `mask.decode` (column-major runs
 * starting with a run of zeros; counts compressed to a string, 5 bits per character, the counts from the third
 * on stored as the difference to the count two before).
 *
 * @module rle
 */

/**
 * Runs of a row-major H x W mask in column-major order (COCO's), starting with the zeros.
 *
 * @param {Uint8Array} mask H x W, non-zero = inside.
 * @param {number} height
 * @param {number} width
 * @returns {number[]}
 */
export function maskToCounts(mask, height, width) {
  const counts = [];
  let current = 0;
  let run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const v = mask[y * width + x] ? 1 : 0;
      if (v !== current) {
        counts.push(run);
        run = 0;
        current = v;
      }
      run++;
    }
  }
  counts.push(run);
  return counts;
}

/**
 * pycocotools' compressed counts string of runs (rleToString).
 *
 * @param {number[]} counts
 * @returns {string}
 */
export function countsToString(counts) {
  let s = "";
  for (let i = 0; i < counts.length; i++) {
    let x = counts[i];
    if (i > 2) x -= counts[i - 2];
    let more = true;
    while (more) {
      let c = x & 0x1f;
      x = Math.floor(x / 32); // arithmetic shift right by 5, for values beyond 32 bits too
      more = c & 0x10 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      s += String.fromCharCode(c + 48);
    }
  }
  return s;
}

/**
 * Runs of pycocotools' compressed counts string (rleFrString).
 *
 * @param {string} s
 * @returns {number[]}
 */
export function stringToCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && c & 0x10) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/**
 * COCO RLE of a row-major mask: `{size: [h, w], counts: "<compressed>"}` (pycocotools' JSON form).
 *
 * @param {Uint8Array} mask H x W.
 * @param {number} height
 * @param {number} width
 * @returns {{size: number[], counts: string}}
 */
export function encodeRle(mask, height, width) {
  return { size: [height, width], counts: countsToString(maskToCounts(mask, height, width)) };
}

/**
 * Row-major H x W Uint8Array (0/1) of a COCO RLE; `counts` a compressed string or an array of runs.
 *
 * @param {{size: number[], counts: string|number[]}} rle
 * @returns {Uint8Array}
 */
export function decodeRle(rle) {
  const [height, width] = rle.size.map(Number);
  const counts = typeof rle.counts === "string" ? stringToCounts(rle.counts) : rle.counts;
  const mask = new Uint8Array(height * width);
  let index = 0;
  let value = 0;
  for (const run of counts) {
    if (value) {
      for (let i = index; i < index + run; i++) {
        const x = Math.floor(i / height);
        mask[(i - x * height) * width + x] = 1;
      }
    }
    index += run;
    value ^= 1;
  }
  if (index !== height * width) throw new Error(`RLE covers ${index} pixels, not ${height} x ${width}`);
  return mask;
}

/**
 * Area and XYWH bounding box of a mask in COCO's convention (pycocotools' toBbox: width = right - left + 1).
 *
 * @param {Uint8Array} mask H x W.
 * @param {number} height
 * @param {number} width
 * @returns {{area: number, bbox: number[]}} bbox [x, y, w, h] in COCO's convention (w = right - left + 1).
 */
export function maskStats(mask, height, width) {
  let area = 0;
  let x0 = width;
  let y0 = height;
  let x1 = -1;
  let y1 = -1;
  for (let y = 0; y < height; y++) {
    const row = y * width;
    for (let x = 0; x < width; x++) {
      if (mask[row + x]) {
        area++;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return { area, bbox: area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0] };
}
