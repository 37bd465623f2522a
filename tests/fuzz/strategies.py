"""Hypothesis strategies of hostile input: encoded images in every accepted (and some refused) format and pixel mode,
their headers mutated (bit flips, truncation, declared sizes from zero to decompression bombs); numbers for every
numeric request field (NaN, +-inf, huge, negative, zero, float32 extremes, and valid values so the deep paths run);
and mutations of serialized messages.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from samserve.core.api import pb
from samserve_dev.images import synthetic_image
from tests.fuzz.harness import CORPUS, SEED_IMAGE_HW

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
EXTREME_FLOATS = (math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-45, -1e-45, FLOAT32_MAX,
                  -FLOAT32_MAX, 1e39, 1.7976931348623157e308, -1e308, 5e-324)
EXTREME_INTS = (0, -1, 1, 2, INT32_MIN, INT32_MAX, 1 << 16, 129, 257, -(1 << 16))
DECLARED_SIZES = (0, 1, 2, 255, 256, 257, 8000, 8001, 16383, 16384, 65535, 65536, 1 << 24, INT32_MAX)
"""Width/height written into image headers: zero, tiny, around the 64 M-pixel limit, bombs, and overflows."""

# Pixel modes each format's writer takes (16-bit, palette, CMYK, alpha, grayscale, 1-bit, float).
MODES: dict[str, tuple[str, ...]] = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "MPO": ("RGB",),  # multi-picture JPEG (stereo phone photos)
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
    "BMP": ("1", "L", "P", "RGB"),
    "GIF": ("L", "P"),  # not an accepted format: INVALID_ARGUMENT
}
MULTI_FRAME = frozenset({"PNG", "TIFF", "WEBP", "GIF", "MPO"})
EXIF_ORIENTATION = 0x0112
SHAPES = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.sampled_from([(1, 1), (1, 700), (700, 1), (2, 1100), (1100, 3), (1, 2)]),  # extreme aspect ratios
)


def _pixels(mode: str, height: int, width: int, seed: int) -> Image.Image:
    rgb = synthetic_image(height, width, seed)
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(rgb[..., 1].astype(np.int32) * 1000 - 100_000)
    if mode == "F":
        return Image.fromarray(rgb[..., 2].astype(np.float32) / 7.0)
    return Image.fromarray(rgb).convert(mode)


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A valid encoded image: format, mode, size, optional EXIF orientation (valid or not), optional frames."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    height, width = draw(SHAPES)
    image = _pixels(mode, height, width, draw(st.integers(0, 1000)))
    options: dict[str, object] = {}
    if fmt in ("PNG", "JPEG", "MPO", "WEBP", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 65535]))
        options["exif"] = exif.tobytes()
    if fmt in MULTI_FRAME and draw(st.booleans()):
        options.update(save_all=True, append_images=[_pixels(mode, height, width, 7)])
    if fmt in ("JPEG", "MPO"):
        options["quality"] = draw(st.sampled_from([1, 75, 100]))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def corpus_images() -> st.SearchStrategy[bytes]:
    """One of the committed seed images (tests/fuzz/corpus), mutation bases next to the generated ones (drawn by
    name, so a failing example shows the file's name)."""
    names = sorted(p.name for p in CORPUS.iterdir() if p.suffix != ".bin" and p.is_file())
    return st.sampled_from(names).map(lambda name: (CORPUS / name).read_bytes())


# Header patchers: write a declared (width, height) where the format keeps it, keeping checksums valid so the
# decoder gets past them (PNG's chunk CRC); the pixel data stays that of the small image.
def _png_size(data: bytes, width: int, height: int) -> bytes:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return data
    body = b"IHDR" + struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF) + data[24:29]
    return data[:12] + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def _jpeg_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    for sof in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        at = data.find(sof)
        if at >= 0:
            out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(out)


def _tiff_size(data: bytes, width: int, height: int) -> bytes:
    if data[:4] not in (b"II*\x00", b"MM\x00*") or len(data) < 8:
        return data
    end = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    (ifd,) = struct.unpack_from(end + "I", data, 4)
    if ifd + 2 > len(data):
        return data
    (count,) = struct.unpack_from(end + "H", data, ifd)
    for k in range(count):
        at = ifd + 2 + 12 * k
        if at + 12 > len(data):
            break
        tag, kind = struct.unpack_from(end + "HH", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = width if tag == 256 else height
            if kind == 3:
                struct.pack_into(end + "H", out, at + 8, value & 0xFFFF)
            elif kind == 4:
                struct.pack_into(end + "I", out, at + 8, value & 0xFFFFFFFF)
    return bytes(out)


def _bmp_size(data: bytes, width: int, height: int) -> bytes:
    if data[:2] != b"BM" or len(data) < 26:
        return data
    return data[:18] + struct.pack("<ii", _int32(width), _int32(-height if height % 2 else height)) + data[26:]


def _gif_size(data: bytes, width: int, height: int) -> bytes:
    if data[:3] != b"GIF" or len(data) < 10:
        return data
    return data[:6] + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + data[10:]


def _webp_size(data: bytes, width: int, height: int) -> bytes:
    at = data.find(b"VP8X")
    if data[:4] != b"RIFF" or at < 0 or at + 18 > len(data):
        return data
    canvas = struct.pack("<I", (width - 1) & 0xFFFFFF)[:3] + struct.pack("<I", (height - 1) & 0xFFFFFF)[:3]
    return data[: at + 12] + canvas + data[at + 18 :]


def _int32(value: int) -> int:
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


SIZE_PATCHERS: tuple[Callable[[bytes, int, int], bytes], ...] = (
    _png_size, _jpeg_size, _tiff_size, _bmp_size, _gif_size, _webp_size,
)


def declare_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` with (width, height) written into whichever header it has (unchanged if none)."""
    for patch in SIZE_PATCHERS:
        patched = patch(data, width, height)
        if patched != data:
            return patched
    return data


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` bytes after 0-4 mutations: bit flip, truncation, overwrite, insertion, deletion, declared size."""
    data = draw(base)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert", "delete", "size"]))
        # Positions: mostly in the first 64 bytes (headers), anywhere otherwise.
        at = draw(st.one_of(st.integers(0, 63), st.integers(0, 1 << 20))) % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data = data[:at] + chunk + data[at + len(chunk) :]
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)) :]
        elif kind == "size":
            data = declare_size(data, draw(st.sampled_from(DECLARED_SIZES)), draw(st.sampled_from(DECLARED_SIZES)))
    return data


def image_bytes() -> st.SearchStrategy[bytes]:
    """What the image fields get: arbitrary bytes, valid images, corpus images, and mutations of both."""
    valid = st.one_of(images(), corpus_images())
    return st.one_of(st.binary(max_size=1024), valid, mutated(valid))


def floats() -> st.SearchStrategy[float]:
    """Any float, biased to the extremes."""
    return st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(-1e6, 1e6))


def coordinate(extent: int) -> st.SearchStrategy[float]:
    """An x or y: inside the image (edges included) half the time, anything otherwise."""
    inside = st.one_of(st.floats(0, extent), st.sampled_from([0.0, float(extent), extent - 0.5]))
    return st.one_of(inside, floats())


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EXTREME_INTS), st.integers(INT32_MIN, INT32_MAX), st.integers(-3, 4))


def uint32s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 64, 255, 256, 65536, (1 << 32) - 1]), st.integers(0, (1 << 32) - 1))


LOW_RES_HW = (64, 64)
"""The tiny model's low-res mask size (4 x its 16 x 16 embedding), the one valid mask_input shape."""


@st.composite
def mask_inputs(draw: st.DrawFn) -> pb.LowResLogits:
    """Logits of the valid shape (values normal, zero, or with NaN/inf/huge planted), or any shape and length."""
    if draw(st.booleans()):
        height, width = LOW_RES_HW
        values = np.full(height * width, draw(st.sampled_from([0.0, -20.0, 20.0])), dtype="<f4")
        for _ in range(draw(st.integers(0, 3))):
            with np.errstate(over="ignore"):  # a double beyond float32 range becomes +-inf, as a client's would
                values[draw(st.integers(0, height * width - 1))] = draw(floats())
        return pb.LowResLogits(height=height, width=width, data=values.tobytes())
    return pb.LowResLogits(height=draw(uint32s()), width=draw(uint32s()), data=draw(st.binary(max_size=64)))


@st.composite
def valid_prompts(draw: st.DrawFn) -> pb.Prompt:
    """A prompt the service must answer (OK): in-image points with known labels and/or an ordered box."""
    height, width = SEED_IMAGE_HW
    prompt = pb.Prompt(multimask_output=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        label = draw(st.sampled_from([pb.POINT_LABEL_FOREGROUND, pb.POINT_LABEL_BACKGROUND]))
        prompt.points.add(x=draw(st.floats(0, width, width=32)), y=draw(st.floats(0, height, width=32)), label=label)
    if not prompt.points or draw(st.booleans()):
        x0, x1 = sorted(draw(st.lists(st.floats(0, width, width=32), min_size=2, max_size=2)))
        y0, y1 = sorted(draw(st.lists(st.floats(0, height, width=32), min_size=2, max_size=2)))
        prompt.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return prompt


@st.composite
def hostile_prompts(draw: st.DrawFn) -> pb.Prompt:
    """A prompt whose every number may be extreme, whose label may be any int32, and whose mask_input any shape."""
    height, width = SEED_IMAGE_HW
    prompt = pb.Prompt(multimask_output=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        label = draw(st.one_of(st.sampled_from([pb.POINT_LABEL_FOREGROUND, pb.POINT_LABEL_BACKGROUND]), int32s()))
        prompt.points.add(x=draw(coordinate(width)), y=draw(coordinate(height)), label=label)
    if draw(st.booleans()):
        prompt.box.CopyFrom(pb.Box(x0=draw(coordinate(width)), y0=draw(coordinate(height)),
                                   x1=draw(coordinate(width)), y1=draw(coordinate(height))))
    return prompt


@st.composite
def prompts(draw: st.DrawFn) -> pb.Prompt:
    """Valid or hostile; either may carry a mask_input (valid or not)."""
    prompt = draw(st.one_of(valid_prompts(), hostile_prompts()))
    if draw(st.integers(0, 2)) == 0:
        prompt.mask_input.CopyFrom(draw(mask_inputs()))
    return prompt


def image_reference(draw: st.DrawFn, request: pb.SegmentRequest | pb.GenerateMasksRequest, image_id: str) -> None:
    """Set the request's ``oneof image``: mostly the embedded image's id; sometimes an unknown id, bytes, none."""
    which = draw(st.sampled_from(["id", "id", "id", "unknown", "bytes", "none"]))
    if which == "id":
        request.image_id = image_id
    elif which == "unknown":
        request.image_id = draw(st.text(max_size=80))
    elif which == "bytes":
        request.image_bytes = draw(image_bytes())


@st.composite
def segment_requests(draw: st.DrawFn, image_id: str) -> pb.SegmentRequest:
    request = pb.SegmentRequest(mask_encoding=draw(st.one_of(st.integers(0, 3), int32s())),
                                return_low_res_logits=draw(st.booleans()))
    image_reference(draw, request, image_id)
    many = draw(st.integers(0, 15)) == 0  # sometimes over the 256-prompt limit, or right at it
    chosen = [draw(prompts())] * draw(st.sampled_from([256, 257])) if many else draw(st.lists(prompts(), max_size=3))
    if draw(st.booleans()):  # and half the time every prompt valid, so the decoder and encoders run on the rest
        chosen = [draw(valid_prompts())] * draw(st.integers(1, 3))
    request.prompts.extend(chosen)
    return request


# GenerateMasks: each parameter unset, valid and cheap, or extreme. Cheap matters: the default grid is 32 x 32
# points, and crops of an image sent by id are encoded (from its kept bytes) the first time each crop box is seen.
INT_PARAMETERS = {
    "points_per_side": st.integers(1, 4),
    "points_per_batch": st.integers(1, 256),
    "crop_n_layers": st.integers(0, 3),
    "crop_n_points_downscale_factor": st.integers(1, 4),
    "min_mask_region_area": st.integers(0, 100),
}
FLOAT_PARAMETERS = {
    "pred_iou_thresh": st.floats(0, 1),
    "stability_score_thresh": st.floats(0, 1),
    "stability_score_offset": st.floats(0, 4),
    "box_nms_thresh": st.floats(0, 1),
    "crop_nms_thresh": st.floats(0, 1),
    "crop_overlap_ratio": st.floats(0, 1, exclude_max=True),
}


@st.composite
def point_grids(draw: st.DrawFn) -> pb.PointGrid:
    inside = st.floats(0, 1)
    n = draw(st.integers(0, 4))
    xs = draw(st.lists(st.one_of(inside, floats()), min_size=n, max_size=n))
    ys = draw(st.lists(st.one_of(inside, floats()), min_size=n, max_size=n + draw(st.sampled_from([0, 0, 1]))))
    return pb.PointGrid(x=xs, y=ys)


@st.composite
def generate_requests(draw: st.DrawFn, image_id: str) -> pb.GenerateMasksRequest:
    request = pb.GenerateMasksRequest(mask_encoding=draw(st.one_of(st.integers(0, 3), int32s())))
    image_reference(draw, request, image_id)
    if request.WhichOneof("image") == "image_bytes":  # the bytes are the fuzz: a cheap grid, no crops to encode
        request.points_per_side, request.crop_n_layers = 2, 0
    hostile = draw(st.booleans())  # else every parameter set is in its domain, so generation runs to its end
    for name, valid in INT_PARAMETERS.items():
        value = draw(st.one_of(st.none(), valid, int32s()) if hostile else st.one_of(st.none(), valid))
        if value is not None and not request.HasField(name):
            setattr(request, name, value)
    for name, valid in FLOAT_PARAMETERS.items():
        value = draw(st.one_of(st.none(), valid, floats()) if hostile else st.one_of(st.none(), valid))
        if value is not None:
            setattr(request, name, value)
    if hostile and draw(st.integers(0, 2)) == 0:
        request.point_grids.extend(draw(st.lists(point_grids(), max_size=4)))
    elif not hostile and not request.HasField("points_per_side") and draw(st.integers(0, 2)) == 0:
        for _ in range(request.crop_n_layers + 1):  # one valid grid per crop layer
            points = draw(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=4))
            request.point_grids.add(x=[x for x, _ in points], y=[y for _, y in points])
    if not request.HasField("points_per_side") and not request.point_grids and draw(st.integers(0, 7)):
        request.points_per_side = draw(INT_PARAMETERS["points_per_side"])  # the 32 x 32 default: 1 in 8
    return request


def valid_requests(image_id: str) -> dict[str, list[bytes]]:
    """Serialized valid requests of each method, the bases of the message mutations."""
    seed_png = corpus_path("seed.png").read_bytes()
    point = pb.Prompt(points=[pb.Point(x=10, y=20, label=pb.POINT_LABEL_FOREGROUND)],
                      box=pb.Box(x0=1, y0=2, x1=30, y1=40))
    return {
        "Embed": [pb.EmbedRequest(image=seed_png).SerializeToString()],
        "Segment": [
            pb.SegmentRequest(image_id=image_id, prompts=[point], mask_encoding=pb.MASK_ENCODING_RLE_AND_PNG,
                              return_low_res_logits=True).SerializeToString(),
            pb.SegmentRequest(image_bytes=seed_png, prompts=[point, point]).SerializeToString(),
        ],
        "GenerateMasks": [
            pb.GenerateMasksRequest(image_id=image_id, points_per_side=2, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, min_mask_region_area=5,
                                    point_grids=[]).SerializeToString(),
            pb.GenerateMasksRequest(image_id=image_id, point_grids=[pb.PointGrid(x=[0.5], y=[0.5])],
                                    mask_encoding=pb.MASK_ENCODING_PNG).SerializeToString(),
        ],
    }


def corpus_path(name: str) -> Path:
    return CORPUS / name
