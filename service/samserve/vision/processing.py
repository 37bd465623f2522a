"""SAM pre- and post-processing: the ONE implementation used by gateway, exporter checks, tests and benchmarks.

It reproduces ``segment_anything.utils.transforms.ResizeLongestSide`` and ``SamPredictor`` exactly:

* resize so the longest side equals S (``new = int(old * S / max(H, W) + 0.5)``), PIL bilinear (what torchvision's
  ``resize`` does on a PIL image), keep aspect, place top-left in an S x S canvas (the encoder graph normalizes
  and zeroes the padding after normalization, see :mod:`samserve.core.model_spec`);
* prompt coordinates scale by ``new_w / old_w`` and ``new_h / old_h``;
* a prompt without a box gets one padding point (label -1); a box becomes two corner points (labels 2, 3) placed
  after the points;
* mask logits (N x M x 4h x 4w) are bilinearly resized (align_corners=False) to S x S, cropped to the resized
  image, resized to the original size, and thresholded at the model's ``mask_threshold`` (0.0 for SAM).

Numpy, Pillow and OpenCV only: the gateway does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from samserve.core import model_spec

cv2.setNumThreads(0)  # OpenCV's own pool would compete with ONNX Runtime/Triton for the same cores.

SCRATCH_MAX_BYTES = 16 << 20
"""Largest float32 work plane a thread keeps between masks (4 MP; work planes of other types up to the same pixel
count): touching fresh memory costs a page fault per 4 KiB, about as much as the work itself on a 1 MP mask (the
gateway maps every block >= 1 MiB anew, see :mod:`samserve.core.memory`); larger planes are allocated per use and
given back."""
_scratch = threading.local()


def scratch_plane(name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A C-contiguous ``dtype`` array of ``shape`` with undefined contents that this thread reuses for ``name``:
    valid until the thread's next call for the same name. Fresh memory when it has more pixels than a float32
    plane of :data:`SCRATCH_MAX_BYTES`."""
    dtype = np.dtype(dtype)
    pixels = math.prod(shape)
    if pixels * 4 > SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype=dtype)
    size = pixels * dtype.itemsize
    held = getattr(_scratch, name, None)
    if held is None or held.size < size:
        held = np.empty(size, dtype=np.uint8)
        setattr(_scratch, name, held)
    return held[:size].view(dtype).reshape(shape)


def resized_size(original_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(height, width) after resizing the longest side to ``image_size`` (official ``get_preprocess_shape``)."""
    old_h, old_w = original_hw
    scale = image_size * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """An image ready for the encoder."""

    padded: np.ndarray
    """uint8, S x S x 3 (HWC, RGB), resized image top-left, zeros elsewhere."""
    input_size: tuple[int, int]
    """(h, w) of the resized image inside ``padded``."""
    original_size: tuple[int, int]
    """(H, W) of the original image."""


def prepare_image(image: np.ndarray, image_size: int) -> PreparedImage:
    """Resize (longest side = ``image_size``) and pad an H x W x 3 uint8 RGB image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
    original = (int(image.shape[0]), int(image.shape[1]))
    h, w = resized_size(original, image_size)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    padded = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    padded[:h, :w] = resized
    return PreparedImage(padded=padded, input_size=(h, w), original_size=original)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt in original-image pixel coordinates.

    ``points``: K x 2 float (x, y); ``labels``: K ints (1 foreground, 0 background); ``box``: 4 floats XYXY or
    None; ``mask_input``: 4h x 4w float32 low-res logits from an earlier answer or None.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    multimask_output: bool = True


def scale_coords(coords: np.ndarray, original_hw: tuple[int, int], input_hw: tuple[int, int]) -> np.ndarray:
    """Map ... x 2 (x, y) original-pixel coordinates into resized-image pixels (official ``apply_coords``)."""
    (old_h, old_w), (new_h, new_w) = original_hw, input_hw
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / old_w
    out[..., 1] *= new_h / old_h
    return out


def point_inputs(
    prompt: Prompt, original_hw: tuple[int, int], input_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's point tokens for one prompt: (P x 2 float32 coords in resized pixels, P float32 labels).

    Points come first, then the two box corners (labels 2, 3); without a box one padding point (0, 0) with
    label -1 is appended, exactly as the official prompt encoder does.
    """
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if prompt.points is not None and len(prompt.points):
        coords.append(scale_coords(np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2), original_hw, input_hw))
        labels.append(np.asarray(prompt.labels, dtype=np.float64).reshape(-1))
    if prompt.box is not None:
        corners = np.asarray(prompt.box, dtype=np.float64).reshape(2, 2)
        coords.append(scale_coords(corners, original_hw, input_hw))
        labels.append(np.array([model_spec.LABEL_BOX_TOP_LEFT, model_spec.LABEL_BOX_BOTTOM_RIGHT], dtype=np.float64))
    else:
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([model_spec.LABEL_PADDING], dtype=np.float64))
    return np.concatenate(coords).astype(np.float32), np.concatenate(labels).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DecoderBatch:
    """Decoder inputs for N prompts that share one image and one token count P (see :mod:`model_spec`)."""

    prompt_indices: list[int]
    """Positions of these prompts in the caller's list."""
    point_coords: np.ndarray
    """float32, N x P x 2, resized-image pixels."""
    point_labels: np.ndarray
    """float32, N x P."""
    mask_input: np.ndarray
    """float32, N x 1 x 4h x 4w."""
    has_mask_input: np.ndarray
    """float32, N."""


def decoder_batches(
    prompts: Sequence[Prompt],
    original_hw: tuple[int, int],
    input_hw: tuple[int, int],
    low_res_mask_size: tuple[int, int],
    max_prompts: int | None = None,
) -> list[DecoderBatch]:
    """Group prompts by token count so each group is one decoder call (of at most ``max_prompts``) that equals
    the official predictor.

    Prompts with different token counts are never padded to a common length: an extra padding token changes
    SAM's output, so grouping keeps every prompt's answer identical to decoding it alone.
    """
    groups: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for index, prompt in enumerate(prompts):
        coords, labels = point_inputs(prompt, original_hw, input_hw)
        groups.setdefault(len(labels), []).append((index, coords, labels))
    size = max_prompts or len(prompts) or 1
    batches = []
    for members in [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]:
        n = len(members)
        mask_input = np.zeros((n, 1, *low_res_mask_size), dtype=np.float32)
        has_mask = np.zeros((n,), dtype=np.float32)
        for row, (index, _, _) in enumerate(members):
            given = prompts[index].mask_input
            if given is not None:
                given = np.asarray(given, dtype=np.float32)
                if given.shape[-2:] != tuple(low_res_mask_size):
                    raise ValueError(f"mask_input must be {low_res_mask_size}, got {given.shape}")
                mask_input[row, 0] = given.reshape(low_res_mask_size)
                has_mask[row] = 1.0
        batches.append(
            DecoderBatch(
                prompt_indices=[m[0] for m in members],
                point_coords=np.stack([m[1] for m in members]),
                point_labels=np.stack([m[2] for m in members]),
                mask_input=mask_input,
                has_mask_input=has_mask,
            )
        )
    return batches


def select_masks(multimask_output: bool, num_mask_tokens: int) -> slice:
    """Which mask tokens a prompt returns: 1..M-1 for multimask output, token 0 otherwise (official predictor)."""
    return slice(1, num_mask_tokens) if multimask_output else slice(0, 1)


def masks_returned(multimask_output: bool, num_mask_tokens: int) -> int:
    """How many masks a prompt returns (:func:`select_masks`)."""
    return len(range(num_mask_tokens)[select_masks(multimask_output, num_mask_tokens)])


def _integer_scale(shape: tuple[int, ...], image_size: int) -> tuple[int, int]:
    """The (vertical, horizontal) factor from ... x 4h x 4w logits (``shape``) to the S x S model input."""
    low_h, low_w = shape[-2:]
    if image_size % low_h or image_size % low_w:
        raise ValueError(f"{low_h} x {low_w} logits do not scale to {image_size} by an integer factor")
    return image_size // low_h, image_size // low_w


def _kept_corner(shape: tuple[int, ...], input_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(kh, kw): the rows and columns of ... x 4h x 4w logits that the h x w crop of their S x S resize reads."""
    h, w = input_hw
    low_h, low_w = shape[-2:]
    scale_h, scale_w = _integer_scale(shape, image_size)
    return min(low_h, -(-h // scale_h) + 1), min(low_w, -(-w // scale_w) + 1)


def _upscaled_corner(plane: np.ndarray, input_hw: tuple[int, int], image_size: int) -> np.ndarray:
    """The official first resize (4h x 4w -> S x S, bilinear, align_corners=False) of one float32 logit plane,
    computed for the corner that the h x w crop reads only, transposed: float32, C-contiguous (s * kw) x (s * kh)
    (kw >= w / s, kh >= h / s), this thread's scratch plane ``upscale_padded``. Its ``[:w, :h]`` is the cropped
    S x S logits stored column-major; the rest is logits of the padding that no kept pixel uses.

    With an integer factor s, output index i reads inputs floor((i + 0.5) / s - 0.5) and the next one, so
    ceil(n / s) + 1 inputs suffice; resizing that block by the same factor gives the same values (each weight
    depends on the output index and the factor only). Bilinear resizing is separable, so resizing the transposed
    logits equals transposing the resized ones (OpenCV's INTER_LINEAR uses the same half-pixel mapping).
    """
    scale_h, scale_w = _integer_scale(plane.shape, image_size)
    keep_h, keep_w = _kept_corner(plane.shape, input_hw, image_size)
    padded = scratch_plane("upscale_padded", (keep_w * scale_w, keep_h * scale_h))
    block = cv2.transpose(plane[:keep_h, :keep_w])  # a copy, as numpy's transposed copy but ~6x faster
    cv2.resize(block, padded.shape[::-1], dst=padded, interpolation=cv2.INTER_LINEAR)
    return padded


def upscale_logits(
    low_res: np.ndarray, input_hw: tuple[int, int], original_hw: tuple[int, int], image_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Mask logits at the original image size, as the official ``Sam.postprocess_masks``.

    ``low_res``: float32, ... x 4h x 4w (any leading axes). Returns float32, ... x H x W.
    Bilinear with align_corners=False semantics (see :func:`_upscaled_corner`).

    The result is a transposed view of a contiguous ... x W x H buffer, i.e. every mask is stored column-major,
    which is the layout COCO RLE encodes from, so encoding needs no copy. ``out``: that float32 ... x W x H
    buffer, written in place (e.g. a :func:`scratch_plane`); None allocates it. One plane at a time without the
    copies of this function: :func:`upscale_plane` (the same values).
    """
    lead = low_res.shape[:-2]
    planes = low_res.reshape(-1, *low_res.shape[-2:])
    _integer_scale(planes.shape[-2:], image_size)
    h, w = input_hw
    out_h, out_w = original_hw
    if out is None:
        out = np.empty((*lead, out_w, out_h), dtype=np.float32)
    out = out.reshape(planes.shape[0], out_w, out_h)
    for k, plane in enumerate(planes):
        padded = _upscaled_corner(plane, input_hw, image_size)
        if (out_h, out_w) == (h, w):  # a resize to the same size is a copy (here and in the official code)
            out[k] = padded[:w, :h]
        else:
            cv2.resize(padded[:w, :h], (out_h, out_w), dst=out[k], interpolation=cv2.INTER_LINEAR)
    return out.reshape(*lead, out_w, out_h).swapaxes(-1, -2)


def upscale_plane(
    low_res: np.ndarray, input_hw: tuple[int, int], original_hw: tuple[int, int], image_size: int
) -> np.ndarray:
    """One float32 4h x 4w logit plane at the original size H x W, stored column-major in this thread's scratch:
    float32, C-contiguous W x P with P >= H; ``[:, :H]`` is the transposed H x W logits (bitwise those of
    :func:`upscale_logits`), ``[:, H:]`` is -inf (so a threshold never counts it). Valid until this thread's next
    call.

    P > H only when the crop is not resized (H x W is the resized image itself, e.g. 768 x 1024): the values then
    stay where the first resize wrote them, rows ``s * kh`` long, instead of being copied out.
    """
    h, w = input_hw
    out_h, out_w = original_hw
    padded = _upscaled_corner(low_res, input_hw, image_size)
    if (out_h, out_w) == (h, w):
        stored = padded[:w]  # whole rows: still C-contiguous
        stored[:, h:] = -np.inf
        return stored
    full = scratch_plane("full_logits", (out_w, out_h))
    cv2.resize(padded[:w, :h], (out_h, out_w), dst=full, interpolation=cv2.INTER_LINEAR)
    return full


BOUND_MARGIN = 1e-4
"""Relative widening of :func:`logit_bounds`: each of the (at most four) linear-interpolation passes computes
``w0 * a + w1 * b`` in float32 with weights >= 0 that sum to 1 within an ulp, so it leaves the range of its
inputs by at most a few ulps (~1e-7) of their magnitude; 1e-4 is a thousandfold safety factor."""


def logit_bounds(low_res: np.ndarray, input_hw: tuple[int, int], image_size: int) -> tuple[float, float]:
    """(lo, hi): every value of :func:`upscale_plane` (and :func:`upscale_logits`) of this float32 4h x 4w plane
    is > lo and < hi. Every value is a chain of bilinear (or, for an exact 2x reduction, area) interpolations, i.e.
    of convex combinations, of the logits that the kept corner reads, so it lies within their range up to float
    rounding (:data:`BOUND_MARGIN`; plus 1e-30 for denormals, where rounding is absolute). NaN logits give NaN
    bounds, which decide nothing."""
    keep_h, keep_w = _kept_corner(low_res.shape, input_hw, image_size)
    block = low_res[:keep_h, :keep_w]
    low, high = float(block.min()), float(block.max())
    margin = BOUND_MARGIN * max(abs(low), abs(high)) + 1e-30
    return low - margin, high + margin


@dataclasses.dataclass(frozen=True)
class ThresholdedPlane:
    """What post-processing keeps of one full-size logit plane (see :func:`threshold_plane`)."""

    mask: np.ndarray
    """bool, H x W, stored column-major (a transposed view of a C-contiguous W x H array)."""
    area: int
    """True pixels of ``mask``."""
    inner: int
    """Pixels with logits > threshold + offset."""
    outer: int
    """Pixels with logits > threshold - offset."""


def threshold_plane(
    stored: np.ndarray, height: int, mask_threshold: float, offset: float, mask: np.ndarray | None = None,
    bounds: tuple[float, float] | None = None,
) -> ThresholdedPlane:
    """Binarize one plane of :func:`upscale_plane` (float32 W x P, P >= ``height``, -inf past ``height``) and
    count the pixels at the stability score's two thresholds, with the same thresholds (and float32 comparisons)
    as :func:`binarize` and :func:`stability_score`: a comparison over contiguous memory and a count on the
    booleans for each threshold that ``bounds`` (:func:`logit_bounds`) do not decide for every pixel at once.
    ``mask``: the bool W x ``height`` C-contiguous buffer the mask is written to (e.g. a :func:`scratch_plane`);
    None allocates it."""
    width, stride = stored.shape
    if mask is None:
        mask = np.empty((width, height), dtype=bool)
    area = _decided_count(mask_threshold, bounds, width * height)
    if area is not None:
        mask.fill(area > 0)
    elif stride == height:
        np.greater(stored, mask_threshold, out=mask)
        area = _count_true_2d(mask)
    else:  # compare the contiguous rows (a strided comparison is ~4x slower), then keep the first ``height``
        work = scratch_plane("threshold_work", stored.shape, np.bool_)
        np.greater(stored, mask_threshold, out=work)
        area = _count_true_2d(work)  # -inf past ``height``: never counted
        np.copyto(mask, work[:, :height])
    inner = _count_above(stored, mask_threshold + offset, bounds, width * height)
    outer = _count_above(stored, mask_threshold - offset, bounds, width * height)
    return ThresholdedPlane(mask=mask.T, area=area, inner=inner, outer=outer)


def _decided_count(threshold: float, bounds: tuple[float, float] | None, pixels: int) -> int | None:
    """How many of ``pixels`` values within ``bounds`` are > ``threshold``, when the bounds decide it for all of
    them (all or none); None when they do not."""
    if bounds is None:
        return None
    low, high = bounds
    if low > threshold:
        return pixels
    if high <= threshold:
        return 0
    return None


def _count_above(stored: np.ndarray, threshold: float, bounds: tuple[float, float] | None, pixels: int) -> int:
    """Values > ``threshold`` in a plane of :func:`upscale_plane` of ``pixels`` pixels (its -inf padding is never
    counted)."""
    decided = _decided_count(threshold, bounds, pixels)
    if decided is not None:
        return decided
    work = scratch_plane("threshold_work", stored.shape, np.bool_)
    np.greater(stored, threshold, out=work)
    return _count_true_2d(work)


def _count_true_2d(plane: np.ndarray) -> int:
    """True pixels of one C-contiguous 2-D bool array (OpenCV's count is ~1.5x numpy's)."""
    return int(cv2.countNonZero(plane.view(np.uint8)))


def _storage_order(array: np.ndarray) -> np.ndarray:
    """The same values with the last two axes in memory order (counts over them do not depend on the order)."""
    swapped = array.swapaxes(-1, -2)
    return swapped if swapped.flags.c_contiguous and not array.flags.c_contiguous else array


def _count_true(planes: np.ndarray) -> np.ndarray:
    """int64, ...: True pixels in each ... x H x W bool plane (numpy's axis-less count_nonzero is the fast one)."""
    flat = _storage_order(planes)
    flat = flat.reshape(-1, flat.shape[-2] * flat.shape[-1])
    return np.array([np.count_nonzero(row) for row in flat], dtype=np.int64).reshape(planes.shape[:-2])


def mask_areas(masks: np.ndarray) -> np.ndarray:
    """int64, ...: pixels of each ... x H x W bool mask."""
    return _count_true(masks)


def binarize(logits: np.ndarray, mask_threshold: float) -> np.ndarray:
    """Boolean masks: logits strictly above the model's threshold (0.0 for SAM, never 0.5)."""
    return logits > mask_threshold


STABILITY_SCORE_OFFSET = 1.0
"""The logit offset of the stability score (the official generator's ``stability_score_offset`` default)."""


def stability_score(
    logits: np.ndarray, mask_threshold: float, offset: float = STABILITY_SCORE_OFFSET, empty: float = 1.0
) -> np.ndarray:
    """IoU of (logits > threshold + offset) and (logits > threshold - offset) over the last two axes; ``empty``
    where both are empty (the official generator's 0 / 0 is NaN, which fails every threshold)."""
    logits = _storage_order(logits)
    inner = _count_true(logits > mask_threshold + offset)
    outer = _count_true(logits > mask_threshold - offset)
    return stability_from_counts(inner, outer, empty)


def stability_from_counts(inner: np.ndarray | int, outer: np.ndarray | int, empty: float = 1.0) -> np.ndarray:
    """float32 ``inner / outer`` (pixel counts above threshold + offset and threshold - offset), ``empty`` where
    ``outer`` is 0: the one formula of :func:`stability_score`."""
    inner, outer = np.asarray(inner, dtype=np.int64), np.asarray(outer, dtype=np.int64)
    return np.where(outer > 0, inner / np.maximum(outer, 1), empty).astype(np.float32)
