"""Shared benchmark plumbing: the vit_b model (seeded random weights, exported once), timing, tables, JSON."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
WORK = REPO_ROOT / ".samserve" / "bench"

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def vit_b_model(seed: int = 0):
    """(checkpoint, model folder, metadata) of vit_b with seeded random weights, exported on first use."""
    from samserve import model_spec
    from samserve_build import export

    model_dir = WORK / f"vit_b-seed{seed}"
    checkpoint = WORK / f"vit_b-seed{seed}-checkpoint" / f"vit_b-seed{seed}.pth"
    if not (model_dir / model_spec.METADATA_FILE).exists() or not checkpoint.exists():
        export.export_random_weights("vit_b", seed, model_dir)
    return checkpoint, model_dir, model_spec.ModelMetadata.read(model_dir)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Milliseconds: median, p90, p99, mean, n."""
    ms = np.asarray(samples) * 1000.0
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(statistics.fmean(ms)),
        "n": len(samples),
    }


def environment() -> dict[str, object]:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} cores, no GPU",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
    }


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(f"\n{title}")
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*[f"{x:.2f}" if isinstance(x, float) else x for x in row]))


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return path


@dataclasses.dataclass
class Scene:
    """What every side-by-side benchmark shares: vit_b (seeded random weights), one image, one click."""

    checkpoint: Path
    model_dir: Path
    meta: object
    image: np.ndarray
    point: np.ndarray
    """1 x 2 (x, y) in original pixels."""
    label: np.ndarray
    predictor: object
    """The official SamPredictor on the same weights."""


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)


def scene(args: argparse.Namespace) -> Scene:
    import torch
    from segment_anything import SamPredictor

    from samserve_build import architectures
    from tests.support.images import synthetic_image

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    checkpoint, model_dir, meta = vit_b_model()
    return Scene(
        checkpoint=checkpoint, model_dir=model_dir, meta=meta,
        image=synthetic_image(args.height, args.width, seed=7),
        point=np.array([[0.5 * args.width, 0.4 * args.height]]), label=np.array([1]),
        predictor=SamPredictor(architectures.load_sam("vit_b", checkpoint)),
    )


def triton_client(runner: asyncio.Runner, url: str, transport: str = "shm"):
    """A TritonSam bound to ``runner``'s event loop, set up as the gateway sets it up (metadata read, so that
    decoder outputs take the same path: shared memory with the shm transport)."""
    from samserve.triton_models import TritonSam

    async def connect() -> TritonSam:
        client = TritonSam(url, embedding_transport=transport)
        await client.metadata()
        return client

    return runner.run(connect())
