"""The bulk "segment everything" job: GenerateMasks over a folder (or a list file) of images, through the service.

    samserve generate-masks photos/ --out masks/ --concurrency 4 --points-per-side 32

* One JSON per image, SA-1B's per-image layout: ``{"image": {...}, "annotations": [...]}`` with each annotation as
  the official generator's record (COCO RLE segmentation, area, bbox XYWH, predicted_iou, point_coords,
  stability_score, crop_box) plus an ``id``; ``<out>/<path relative to the input>.json``.
* Several images in flight (one gRPC channel; the gateway batches decoder calls across them).
* Resumable: an image whose JSON exists is skipped; JSONs are written atomically (temporary file + rename), so an
  interrupted run never leaves a half-written one.
* A failure is recorded per image (``<out>/failures.json``: status code, message) and reported at the end; it never
  stops the run. A rerun retries transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, ...) but not images the
  service rejected as invalid (INVALID_ARGUMENT: corrupt, too large), unless the file changed or ``--retry-failed``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from samserve.client.typed_client import SamServeClient

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
FAILURES_FILE = "failures.json"
PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT.name}
"""Failures that a retry cannot fix: the image itself was rejected."""


def list_images(source: Path) -> tuple[Path, list[Path]]:
    """(root that output paths are relative to, images): every image file under a folder (recursive, sorted), or
    the paths of a list file (one per line; relative paths are relative to the list file's folder; # comments)."""
    if source.is_dir():
        return source, sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    root = source.parent
    paths = []
    for line in source.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else root / path)
    return root, paths


def relative_name(image: Path, root: Path) -> str:
    """The image's path relative to ``root`` (its file name alone when it lies outside)."""
    try:
        return str(image.resolve().relative_to(root.resolve()))
    except ValueError:
        return image.name


def output_path(image: Path, root: Path, out_dir: Path) -> Path:
    """``<out>/<image path relative to root>.json``."""
    return out_dir / (relative_name(image, root) + ".json")


def _fingerprint(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_json_atomically(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(document, separators=(",", ":")))
    os.replace(temporary, path)


@dataclasses.dataclass
class Failure:
    file: str
    code: str
    message: str
    fingerprint: dict[str, int] | None = None


@dataclasses.dataclass
class BulkReport:
    """What one run did."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped_done: list[str] = dataclasses.field(default_factory=list)
    skipped_failed: list[Failure] = dataclasses.field(default_factory=list)
    failed: list[Failure] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> list[Failure]:
        return self.failed + self.skipped_failed

    def summary(self) -> str:
        lines = [f"{len(self.written)} written, {len(self.skipped_done)} already done, "
                 f"{len(self.failed)} failed, {len(self.skipped_failed)} skipped (rejected earlier, unchanged)"]
        lines += [f"  FAILED {f.file}: {f.code}: {f.message}" for f in self.failures]
        return "\n".join(lines)


def annotation_document(image: Path, root: Path, answer: Any, params: dict[str, Any]) -> dict[str, Any]:
    """SA-1B-style per-image document of one GenerateMasks answer."""
    return {
        "image": {"image_id": answer.image_id, "file_name": relative_name(image, root),
                  "width": answer.width, "height": answer.height},
        "annotations": [dict(id=k, **a) for k, a in enumerate(answer.annotations)],
        "model_id": answer.model_id,
        "parameters": params,
    }


def run_bulk(
    images: Sequence[Path], root: Path, out_dir: Path, client: SamServeClient, params: dict[str, Any],
    concurrency: int = 4, retry_failed: bool = False, progress: bool = True, timeout_s: float | None = None,
) -> BulkReport:
    """GenerateMasks for every image not done yet; see the module docstring. ``params``: request parameters."""
    out_dir.mkdir(parents=True, exist_ok=True)
    failures_path = out_dir / FAILURES_FILE
    earlier = {}
    if failures_path.exists():
        earlier = {f["file"]: Failure(**f) for f in json.loads(failures_path.read_text())}
    report = BulkReport()
    todo: list[tuple[Path, str]] = []
    for image in images:
        name = relative_name(image, root)
        if output_path(image, root, out_dir).exists():
            report.skipped_done.append(name)
            continue
        known = earlier.get(name)
        if (known is not None and not retry_failed and known.code in PERMANENT and image.exists()
                and known.fingerprint == _fingerprint(image)):
            report.skipped_failed.append(known)
            continue
        todo.append((image, name))

    def one(image: Path, name: str) -> Failure | None:
        try:
            data = image.read_bytes()
            answer = client.generate_masks(data, timeout_s=timeout_s, **params)
            _write_json_atomically(output_path(image, root, out_dir), annotation_document(image, root, answer, params))
            return None
        except grpc.RpcError as error:
            return Failure(name, error.code().name, error.details() or "", _fingerprint(image))
        except OSError as error:
            return Failure(name, "READ_ERROR", str(error), None)

    bar = tqdm(total=len(todo), desc="generate-masks", unit="image", disable=not progress)
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(one, image, name): name for image, name in todo}
        for future in as_completed(futures):
            failure = future.result()
            if failure is None:
                report.written.append(futures[future])
            else:
                report.failed.append(failure)
            bar.update(1)
            bar.set_postfix(failed=len(report.failed))
    bar.close()
    _write_json_atomically(failures_path, [dataclasses.asdict(f) for f in report.failures])
    return report


def params_from_args(values: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The GenerateMasks parameters given on the command line (None = not given = the official default)."""
    return {name: values[name] for name in names if values.get(name) is not None}
