"""Writes the committed seed corpus (tests/fuzz/corpus): small images in each accepted format and the pixel modes,
EXIF orientations and frame counts that take different decoder paths, and a few raw request messages. The files are
the corpus (replayed by test_replay.py, mutated by the image strategies); this script only says how they were made:

    python -m tests.fuzz.seeds
"""

from __future__ import annotations

import io

from PIL import Image

from samserve.core.api import pb
from samserve_dev.images import png_bytes, synthetic_image
from tests.fuzz.harness import CORPUS, SEED_IMAGE_HW
from tests.fuzz.strategies import EXIF_ORIENTATION, _pixels


def _encode(mode: str, fmt: str, height: int = 24, width: int = 32, **options: object) -> bytes:
    buffer = io.BytesIO()
    _pixels(mode, height, width, seed=3).save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


def seed_files() -> dict[str, bytes]:
    frame = _pixels("RGB", 24, 32, seed=4)
    return {
        "seed.png": png_bytes(synthetic_image(*SEED_IMAGE_HW, seed=1)),  # the image the fuzzers embed
        "rgb.jpg": _encode("RGB", "JPEG", quality=90),
        "cmyk.jpg": _encode("CMYK", "JPEG"),
        "gray-exif6.jpg": _encode("L", "JPEG", exif=_exif(6)),
        "stereo.mpo": _encode("RGB", "MPO", save_all=True, append_images=[frame]),
        "palette.png": _encode("P", "PNG"),
        "gray16.png": _encode("I;16", "PNG"),
        "bilevel.png": _encode("1", "PNG"),
        "rgba-exif8.png": _encode("RGBA", "PNG", exif=_exif(8)),
        "animated.png": _encode("RGB", "PNG", save_all=True, append_images=[frame]),
        "rgba.webp": _encode("RGBA", "WEBP", exif=_exif(3)),
        "lossless.webp": _encode("RGB", "WEBP", lossless=True),
        "cmyk.tiff": _encode("CMYK", "TIFF"),
        "float.tiff": _encode("F", "TIFF"),
        "multipage.tiff": _encode("L", "TIFF", save_all=True, append_images=[frame.convert("L")]),
        "bilevel.bmp": _encode("1", "BMP"),
        "thin.png": _encode("L", "PNG", height=1, width=700),
        "Embed.empty.bin": b"",
        "Embed.wrong-wire-type.bin": b"\x0d\x00\x00\x00\x00",  # field 1 as fixed32, not bytes
        "Segment.invalid-utf8-id.bin": pb.SegmentRequest(image_id="x").SerializeToString()[:-1] + b"\xff",
        "Segment.truncated-varint.bin": b"\x22\x80",
        "GenerateMasks.unknown-fields.bin": b"\xf8\xff\x03\x01" + b"\x7a\x00",
    }


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in seed_files().items():
        (CORPUS / name).write_bytes(data)
        print(f"{CORPUS / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
