"""Segment everything: the official ``SamAutomaticMaskGenerator.generate`` vs the GenerateMasks RPC, on inputs
where masks survive.

Cases (a model, the generator's parameters, an image; the same on both sides):

* ``scenes/card``: the shipped scenes model (``build/checkpoints/samserve_scenes_v1.pth``) on a held-out generated
  scene at its native size, at the thresholds its model card gives (pred_iou_thresh 0.2, stability 0.5);
* ``scenes/defaults``: the same at the official defaults (0.88 / 0.95), where this model keeps no mask;
* ``scenes/card/including_encoder``: ``scenes/card`` with the encoder in the timed call;
* ``vit_b/no_filter``: vit_b with seeded random weights on the 1024x768 synthetic image, pred_iou_thresh 0 and
  stability_score_thresh 0 (``--vit-b-points-per-side``, default :data:`VIT_B_POINTS_PER_SIDE`): no mask is
  filtered before NMS, so every one goes through full-resolution post-processing on both sides (our worst case).

Encoder excluded: official, the embedding set beforehand (``set_image``/``reset_image`` no-ops inside ``generate``);
ours, the image embedded by an Embed call first, GenerateMasks by image_id. Encoder included: official, plain
``generate``; ours, new PNG bytes of the same pixels on every call, so nothing is cached.

The official generator runs in a long-lived worker process per model (2 torch threads; the model loaded and the
embedding set once, then one ``generate`` per request, JSON lines over stdin/stdout), ours is the gateway process +
Triton. The two sides never run at the same time: each waits idle while the other runs. Per case: one warm-up call
per side (official, then ours), then the case's timed calls per side (``Case.samples``, or ``--samples`` for every
case), alternating official, ours, official, ours... Reported per side: median, min, max and every sample; the
speedup is median official / median ours (and official / ours per interleaved pair).

Peak memory: the proportional set size (PSS: a page shared by k processes counts 1/k in each, so shared memory
counts once) sampled every 50 ms from this process during the warm-up call of each side (sampling costs CPU, so
never during a timed call): the official worker process, and for ours the gateway process plus Triton's process
tree (tritonserver and its python-backend stubs) together. Both include the loaded model; ours also the resident
encoder, idle when the encoder is excluded.

Parity: the last timed call's masks of both sides matched one to one at IoU >= 0.95
(``tools/samserve_dev/amg_reference.match``). When both sides keep 0 masks a comparison proves nothing: the counts are
reported and the parity (and the targets) are "not applicable", never a score.

Writes amg_cpu.json to bench/results (or ``--out``). Targets on the 2-core CPU: with the encoder excluded >= 3x
faster than official; peak memory no more than official's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

from bench.amg_figures import IOU_MIN, PEAK_MEMORY_RATIO_TARGET, SPEEDUP_TARGET, parity, spread, targets_met
from bench.common import REPO_ROOT, WORK, add_output_argument, environment, print_table, vit_b_model, write_results

RESULTS_FILE = "amg_cpu.json"
CARD_THRESHOLDS = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.5}
"""What build/checkpoints/MODEL_CARD.md says to use with the scenes model ("about 0.2 / 0.5")."""
NO_FILTER = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
DEMO_SCENE = 100_046
"""Held-out evaluation scene i has the seed ``samserve_build.scenes.EVAL_SEED_OFFSET`` + i, never drawn in training;
this one is the README's demo (build/checkpoints/demo_scene.png)."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    """"scenes" or "vit_b"."""
    params: dict[str, float | int]
    """The official generator's parameters by name; unset ones keep its defaults (on both sides)."""
    include_encoder: bool = False
    samples: int = 3
    """Timed calls per side. Fewer where the spread allows: vit_b's three speedups per pair at 2e789d6 were
    6.37, 6.33 and 6.39 (1 % apart), so 2; scenes/defaults keeps 0 masks on both sides, so its timing is no target
    and 1 shows it."""


VIT_B_POINTS_PER_SIDE = 12
"""432 masks (3 per point) through full-resolution post-processing on each side. 16 (768 masks) took 54 to 89 s
per official call, more than half of this benchmark's run, for speedups per pair of 6.3 to 7.3 against a target
of 3."""


def cases(vit_b_points_per_side: int) -> list[Case]:
    return [
        Case("scenes/card", "scenes", CARD_THRESHOLDS),
        Case("scenes/defaults", "scenes", {}, samples=1),
        Case("scenes/card/including_encoder", "scenes", CARD_THRESHOLDS, include_encoder=True),
        Case("vit_b/no_filter", "vit_b", {**NO_FILTER, "points_per_side": vit_b_points_per_side}, samples=2),
    ]


# -- memory of processes --------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            todo.extend(int(c) for c in (task / "children").read_text().split())
    return pids


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of the processes together: a page shared by k of them (Triton's shared-memory
    regions, the python backend's tensor pool) counts 1/k in each, so the sum counts it once."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakMemory:
    """Samples the PSS of groups of processes every ``interval_s`` in a thread: ``peak`` (all groups together),
    ``peak_by_group`` (each group's own peak), ``before`` (all groups, at the start)."""

    def __init__(self, groups: dict[str, list[int]], interval_s: float = 0.05) -> None:
        self.groups, self.interval_s = groups, interval_s
        self.peak_by_group = {name: pss_bytes(pids) for name, pids in groups.items()}
        self.peak = self.before = sum(self.peak_by_group.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample_once(self) -> None:
        sizes = {name: pss_bytes(pids) for name, pids in self.groups.items()}
        self.peak = max(self.peak, sum(sizes.values()))
        for name, size in sizes.items():
            self.peak_by_group[name] = max(self.peak_by_group[name], size)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()


# -- models and images ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Model:
    variant: str
    checkpoint: Path
    directory: Path
    """The exported model (encoder.onnx, decoder.onnx, metadata.json)."""
    model_id: str
    weights: str


def scenes_model() -> Model:
    """The shipped scenes checkpoint, exported (as the integration tests' ``scenes_model``) on first use and again
    whenever the checkpoint's hash differs from the exported one's."""
    from samserve.core import model_spec
    from samserve_build import architectures, export
    from samserve_build.settings import SCENES_CHECKPOINT

    directory = WORK / "scenes"
    sha = architectures.sha256_file(SCENES_CHECKPOINT)
    metadata = directory / model_spec.METADATA_FILE
    if (not metadata.exists() or model_spec.ModelMetadata.read(directory).weights_sha256 != sha
            or not export.written_by_this_exporter(model_spec.ModelMetadata.read(directory))):
        export.export_model("scenes", SCENES_CHECKPOINT, directory)
    return Model("scenes", SCENES_CHECKPOINT, directory, model_spec.ModelMetadata.read(directory).model_id,
                 f"shipped checkpoint samserve_scenes_v1 (sha256 {sha})")


def exported(model: str) -> Model:
    if model == "scenes":
        return scenes_model()
    checkpoint, directory, meta = vit_b_model()
    return Model("vit_b", checkpoint, directory, meta.model_id, "seeded random (seed 0)")


def image_of(model: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(H x W x 3 uint8 image, its description) of ``model``'s cases."""
    if model == "scenes":
        from samserve_build import scenes

        seed = scenes.EVAL_SEED_OFFSET + args.scene
        scene = scenes.generate_scene(seed)
        height, width = scene.image.shape[:2]
        return scene.image, {"source": "samserve_build.scenes.generate_scene(seed), held out", "scene": args.scene,
                             "seed": seed, "height": height, "width": width, "instances": len(scene.instances)}
    from samserve_dev.images import synthetic_image

    return (synthetic_image(args.height, args.width, seed=7),
            {"source": "samserve_dev.images.synthetic_image(seed=7)", "height": args.height, "width": args.width})


# -- the two sides --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generated:
    seconds: float
    rles: list[dict]
    """COCO RLE per mask."""


class Side(Protocol):
    name: str

    def processes(self) -> dict[str, list[int]]: ...

    def generate(self, case: Case) -> Generated: ...


def worker_arguments(args: argparse.Namespace) -> list[str]:
    return ["--scene", str(args.scene), "--height", str(args.height), "--width", str(args.width)]


def official_worker(model_name: str, args: argparse.Namespace) -> None:
    """The official side: loads ``model_name``, sets its image's embedding once, answers "ready", then per request
    line ``{"params", "include_encoder"}`` runs ``generate`` and answers ``{"seconds", "rles"}`` (one JSON line
    each on stdout; anything else printed goes to stderr)."""
    protocol: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    import torch
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from samserve_build import architectures

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    model = exported(model_name)
    sam = architectures.load_sam(model.variant, model.checkpoint)
    image, _ = image_of(model_name, args)
    embedded = SamPredictor(sam)
    embedded.set_image(image)
    embedded.set_image = lambda *a, **k: None  # the embedding is set beforehand
    embedded.reset_image = lambda: None
    protocol.write(json.dumps({"ready": True, "torch_threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **request["params"])
        if not request["include_encoder"]:
            generator.predictor = embedded
        start = time.perf_counter()
        records = generator.generate(image)
        seconds = time.perf_counter() - start
        protocol.write(json.dumps({"seconds": seconds, "rles": [r["segmentation"] for r in records]}) + "\n")


class Official:
    """A running :func:`official_worker` (idle between requests)."""

    name = "official"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.amg_cpu", "--official-worker", model, *worker_arguments(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the official worker exited with {self.process.wait()}")
        return json.loads(line)

    def processes(self) -> dict[str, list[int]]:
        return {"official": [self.process.pid]}

    def generate(self, case: Case) -> Generated:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"params": case.params, "include_encoder": case.include_encoder}) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        return Generated(answer["seconds"], answer["rles"])

    def __enter__(self) -> Official:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """On success the worker ends at the end of its input; after a failure it is killed (it may be mid-call)."""
        assert self.process.stdin is not None
        if exc_type is not None:
            self.process.kill()
        self.process.stdin.close()
        self.process.wait(timeout=60)


class Ours:
    """GenerateMasks through a running gateway + Triton; the image embedded once (untimed) for the cases that
    exclude the encoder."""

    name = "ours"

    def __init__(self, client: Any, image: Any, pids: dict[str, list[int]]) -> None:
        from bench.gateway_cpu import png_with_tag

        self.client, self.image, self.pids = client, image, pids
        self.png_with_tag = png_with_tag
        self.tags = itertools.count()  # new bytes of the same pixels on every call: nothing cached
        self.image_id = client.embed(png_with_tag(image, -1)).image_id

    def processes(self) -> dict[str, list[int]]:
        return self.pids

    def generate(self, case: Case) -> Generated:
        image = self.png_with_tag(self.image, next(self.tags)) if case.include_encoder else self.image_id
        start = time.perf_counter()
        answer = self.client.generate_masks(image, **case.params)
        seconds = time.perf_counter() - start
        return Generated(seconds, [a["segmentation"] for a in answer.annotations])


@contextmanager
def our_stack(model: Model, image: Any) -> Iterator[Ours]:
    from samserve.client.typed_client import SamServeClient
    from samserve_dev import local_stack

    work = WORK / "amg_cpu" / model.variant
    with local_stack.serve_locally(model.directory, work) as triton, \
            local_stack.GatewayProcess(triton.grpc_url, None, work) as gateway, \
            SamServeClient(gateway.target) as client:
        assert triton.process is not None and gateway.process is not None
        yield Ours(client, image, {"gateway": [gateway.process.pid], "triton": process_tree(triton.process.pid)})


# -- one case -------------------------------------------------------------------------------------------------
def measure(case: Case, official: Side, ours: Side, samples: int) -> dict[str, Any]:
    """Warm-up call per side with its peak memory sampled, then ``samples`` timed calls per side, alternating."""
    sides = (official, ours)
    record: dict[str, dict[str, Any]] = {side.name: {} for side in sides}
    masks: dict[str, list[int]] = {side.name: [] for side in sides}
    last: dict[str, Generated] = {}
    for side in sides:
        with PeakMemory(side.processes()) as memory:
            warm = side.generate(case)
        masks[side.name].append(len(warm.rles))
        record[side.name].update(warmup_s=warm.seconds, peak_bytes=memory.peak, before_bytes=memory.before,
                                 peak_bytes_by_process=memory.peak_by_group)
    timed: dict[str, list[float]] = {side.name: [] for side in sides}
    for _ in range(samples):
        for side in sides:
            last[side.name] = side.generate(case)
            timed[side.name].append(last[side.name].seconds)
            masks[side.name].append(len(last[side.name].rles))
    from samserve_dev.amg_reference import match

    matching = match(last["official"].rles, last["ours"].rles, IOU_MIN)
    figures = parity(matching.official, matching.ours, len(matching.pairs))
    for side in sides:
        record[side.name].update(spread(timed[side.name]), masks=masks[side.name][-1], masks_per_call=masks[side.name])
    speedup = record["official"]["median_s"] / record["ours"]["median_s"]
    memory_ratio = record["ours"]["peak_bytes"] / record["official"]["peak_bytes"]
    result = {
        "model": case.model, "parameters": case.params,
        "encoder": "included" if case.include_encoder else "excluded",
        **record,
        "speedup": speedup,
        "speedup_per_pair": [o / u for o, u in zip(timed["official"], timed["ours"], strict=True)],
        "peak_memory_ratio": memory_ratio,
        "parity": figures,
        "targets_met": targets_met(case.include_encoder, speedup, memory_ratio, figures),
    }
    print(f"{case.name}: official {record['official']['median_s']:.2f} s, ours {record['ours']['median_s']:.2f} s "
          f"(x{speedup:.2f}), memory ratio {memory_ratio:.2f}, {figures}", flush=True)
    return result


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per model: what it is and its image; per case: the measurement)."""
    selected = [case for case in cases(args.vit_b_points_per_side) if case.name in args.cases]
    models: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for model_name in dict.fromkeys(case.model for case in selected):
        model = exported(model_name)  # exported once, outside any timing
        image, description = image_of(model_name, args)
        with Official(model_name, args) as official, our_stack(model, image) as ours:
            for case in (c for c in selected if c.model == model_name):
                results[case.name] = measure(case, official, ours, args.samples or case.samples)
        models[model_name] = {"variant": model.variant, "weights": model.weights, "model_id": model.model_id,
                              "image": description, "official_torch_threads": official.ready["torch_threads"]}
    return models, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, help="timed calls per side for every case (default: each case's own)")
    parser.add_argument("--vit-b-points-per-side", type=int, default=VIT_B_POINTS_PER_SIDE)
    parser.add_argument("--cases", nargs="+", default=[c.name for c in cases(16)],
                        choices=[c.name for c in cases(16)])
    parser.add_argument("--scene", type=int, default=DEMO_SCENE, help="held-out evaluation scene (index >= 0)")
    parser.add_argument("--height", type=int, default=768, help="vit_b's synthetic image")
    parser.add_argument("--width", type=int, default=1024, help="vit_b's synthetic image")
    add_output_argument(parser)
    parser.add_argument("--official-worker", choices=["scenes", "vit_b"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_worker:
        official_worker(args.official_worker, args)
        return
    if args.samples is not None and args.samples < 1:
        parser.error("--samples: at least 1")
    if args.scene < 0:
        parser.error("--scene: an index >= 0 (the held-out scenes)")
    started = time.perf_counter()
    models, results = run(args)
    rows = [[name, r["official"]["median_s"], r["ours"]["median_s"], r["speedup"],
             f'{r["official"]["peak_bytes"] / 2**20:.0f}', f'{r["ours"]["peak_bytes"] / 2**20:.0f}',
             f'{r["official"]["masks"]}/{r["ours"]["masks"]}', r["parity"]["parity"]] for name, r in results.items()]
    print_table("segment everything, medians", ["case", "official s", "GenerateMasks s", "speedup",
                                                "official peak MiB", "ours peak MiB", "masks", "parity"], rows)
    write_results(RESULTS_FILE, {
        "benchmark": "bench/amg_cpu.py",
        "environment": environment(),
        "stack": "samserve gateway process + Triton (ONNX Runtime fp32, python backend), loopback, no Redis",
        "method": {
            "samples": {case: len(result["official"]["samples_s"]) for case, result in results.items()},
            "order": "per case: one warm-up call per side (official, then ours; peak memory sampled), then the "
                     "timed calls alternating official, ours, official, ours...; never both at once",
            "official": "SamAutomaticMaskGenerator(output_mode='coco_rle') in a long-lived worker process per model",
            "peak_memory": "PSS sampled every 50 ms during the warm-up call; ours = gateway + Triton process tree",
            "parity": f"the last timed call's masks, matched one to one at IoU >= {IOU_MIN}",
            "minutes": (time.perf_counter() - started) / 60,
        },
        "models": models,
        "cases": results,
        "targets": {"speedup_excluding_encoder": SPEEDUP_TARGET, "peak_memory_ratio": PEAK_MEMORY_RATIO_TARGET},
    }, args.out)


if __name__ == "__main__":
    main()
