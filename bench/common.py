"""Shared benchmark plumbing: the vit_b model (seeded random weights, exported once), timing, tables, JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
BY_CPU = RESULTS / "cpus"
"""One file per CPU a benchmark ran on (``<vendor>-<family>-<model>-<stepping>-<flags>.json``), kept across machines:
the cross-CPU tables of docs/ are rendered from them."""
STARTED = time.monotonic()
"""When this benchmark process started: every results file records its run time (``environment.run_s``)."""
WORK = REPO_ROOT / ".samserve" / "bench"

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def vit_b_model(seed: int = 0):
    """(checkpoint, model folder, metadata) of vit_b with seeded random weights, exported on first use."""
    from samserve.core import model_spec
    from samserve_build import export

    model_dir = WORK / f"vit_b-seed{seed}"
    checkpoint = WORK / f"vit_b-seed{seed}-checkpoint" / f"vit_b-seed{seed}.pth"
    if (not (model_dir / model_spec.METADATA_FILE).exists() or not checkpoint.exists()
            or not export.written_by_this_exporter(model_spec.ModelMetadata.read(model_dir))):
        export.export_random_weights("vit_b", seed, model_dir)
    return checkpoint, model_dir, model_spec.ModelMetadata.read(model_dir)


def rotated_orders(names: Sequence[str], rounds: int, start: int = 0) -> list[list[str]]:
    """The order of ``names`` in each of ``rounds`` rounds: round ``r`` is ``names`` rotated left by ``start + r``.
    Over ``len(names)`` consecutive rounds every name goes first once and last once; with two names the rounds
    alternate (A B, B A, A B, ...)."""
    count = len(names)
    return [[names[(start + r + i) % count] for i in range(count)] for r in range(rounds)]


INTERLEAVED = "interleaved: round robin over the calls, the order rotated by one each round (warm-up rounds alike)"
"""How :func:`interleaved_samples` takes its samples (recorded with the results)."""


def interleaved_samples(
    calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of ``repeats`` calls of each named callable, taken interleaved: ``warmup`` untimed rounds,
    then ``repeats`` timed rounds, each round calling every callable once in the order of :func:`rotated_orders`,
    so that a slow phase of the machine hits all of them alike and none always runs first. Name -> samples."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for index, order in enumerate(rotated_orders(list(calls), warmup + repeats)):
        for name in order:
            start = time.perf_counter()
            calls[name]()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                samples[name].append(elapsed)
    return samples


def sampling_record(names: Sequence[str], repeats: int, warmup: int) -> dict[str, object]:
    """What the results record of how :func:`interleaved_samples` took the samples of ``names``."""
    return {"scheme": "interleaved", "description": INTERLEAVED, "calls": list(names), "rounds": repeats,
            "warmup_rounds": warmup}


def summary(samples: list[float]) -> dict[str, float]:
    """Milliseconds: median, p90, p99, mean, the spread (min, max), n."""
    ms = np.asarray(samples) * 1000.0
    return {
        "median_ms": float(np.median(ms)),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(statistics.fmean(ms)),
        "n": len(samples),
    }


def cpu() -> dict[str, object]:
    """This CPU as every results file records it: :meth:`samserve_build.cpu_choice.Cpu.record` (name, vendor,
    family, model, stepping, cores and the instruction-set flags that change the runtimes' speed)."""
    from samserve_build.cpu_choice import Cpu

    return Cpu.detect().record()


def cpu_key(processor: Mapping[str, object]) -> str:
    """The file name stem of a CPU in :data:`BY_CPU`: vendor, family, model, stepping and the flags that matter."""
    flags = "+".join(processor["flags"]) or "noflags"  # type: ignore[arg-type]
    return f"{processor['vendor']}-{processor['family']}-{processor['model_number']}-{processor['stepping']}-{flags}"


def git_commit() -> str:
    """The commit the benchmark ran on, with ``-dirty`` when tracked files other than results differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return commit + ("-dirty" if changed else "")


def command() -> str:
    """How this benchmark was started: ``python -m bench.<name> ...`` (else the script relative to the repository
    root)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return " ".join(["python", "-m", spec.name, *sys.argv[1:]])
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO_ROOT).as_posix() if script.is_relative_to(REPO_ROOT) else sys.argv[0]
    return " ".join(["python", shown, *sys.argv[1:]])


def machine_record(command_line: str) -> dict[str, object]:
    """The environment block every results file carries: date, commit, the command that made it, this CPU."""
    processor = cpu()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command_line,
        "machine": f"{processor['model']}, {processor['cores']} cores, no GPU",
        "cpu": processor,
        "python": sys.version.split()[0],
    }


def environment() -> dict[str, object]:
    """A benchmark's environment block: :func:`machine_record` plus the torch and ONNX Runtime it ran with."""
    import onnxruntime
    import torch

    return {**machine_record(command()), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__}


def write_e2e_results(name: str, payload: dict, command_line: str = "make e2e") -> Path:
    """A results file written by a test tier (the e2e tier's images_cpu.json and pods_cpu.json): ``payload`` plus
    the environment block, in bench/results like the benchmarks' own."""
    return write_results(name, {**payload, "environment": machine_record(command_line)}, RESULTS)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[f"{x:.2f}" if isinstance(x, float) else str(x) for x in row] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *cells, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(f"\n{title}")
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for row in cells:
        print(line.format(*row))


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the results go (default bench/results; a trial run writes elsewhere)."""
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")


def shown_path(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it, else absolute."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def write_results(name: str, payload: dict, directory: Path = RESULTS) -> Path:
    """``payload`` as indented JSON in ``directory``/``name``; a benchmark's environment block gains ``run_s``, the
    seconds this process ran (what ``make bench`` spends on it)."""
    if isinstance(payload.get("environment"), dict) and "torch" in payload["environment"]:
        payload["environment"]["run_s"] = round(time.monotonic() - STARTED, 1)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {shown_path(path)}")
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
    from samserve_dev.images import synthetic_image

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
    from samserve.triton.models import TritonSam

    async def connect() -> TritonSam:
        client = TritonSam(url, embedding_transport=transport)
        await client.metadata()
        return client

    return runner.run(connect())


class ServedEmbeddings:
    """Images embedded exactly as the gateway serves them: PNG bytes through
    :class:`samserve.cache.embedder.ImageEmbedder`
    (decode, resize, Triton encoder, the cache's fp16 round trip, staging), held until :meth:`close`."""

    def __init__(self, runner: asyncio.Runner, triton) -> None:
        from samserve.cache.embedder import DecodeBudget, EncodeLimiter, ImageEmbedder
        from samserve.cache.embedding_cache import EmbeddingCache
        from samserve.cache.image_store import ImageStore

        self.runner = runner
        meta = triton.served.meta
        cache = EmbeddingCache(triton, meta.cache_namespace, l1_bytes=1 << 30)
        self.embedder = ImageEmbedder(triton, meta.image_size, cache, EncodeLimiter(1, 64), DecodeBudget(10**9),
                                      ImageStore(l1_bytes=0, max_bytes=1 << 31))
        self.held = contextlib.AsyncExitStack()

    def get(self, image: np.ndarray):
        """The EmbeddedImage of ``image`` (H x W x 3 uint8), encoded on first use."""
        from samserve.cache.embedder import ImageRef

        reference = ImageRef.from_bytes(png_bytes(image), max_pixels=1 << 31)
        embedded, _ = self.runner.run(self.held.enter_async_context(self.embedder.embedded(reference)))
        return embedded

    def close(self) -> None:
        self.runner.run(self.held.aclose())


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()
