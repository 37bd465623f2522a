"""The gpu-torch runtime vs the official code in fp32 eager, side by side in one run: ViT-H on a GPU (``--device
cuda``), or the tiny model on the CPU (``--device cpu``, what `make test` runs so this script cannot rot before a GPU
appears).

Weights: seeded random weights in Meta's format, written here (nothing downloads). Both sides run the same
checkpoint; "official" is ``segment_anything`` as released (fp32, its own attention), "ours" is
:class:`samserve_build.torch_runtime.TorchSam` (the gpu-torch target's runtime: bf16 autocast by default, SDPA,
batched encoder), in-process, without Triton or the gateway.

Measured (timings: ``--repeats`` calls after one warm-up, device synchronized; the median, and every sample):

* encoder images/s at batch 1, 8, 32: official ``SamPredictor.set_image`` at batch 1 and the official image encoder
  on a stacked batch at 8 and 32 (``Sam.preprocess`` included); ours ``TorchSam.encode`` on uint8 images
  (normalization, padding, host<->device copies included). A batch that runs out of memory is reported as such.
* decoder p50 for 1 and for 64 prompts (one point each): official ``SamPredictor.predict_torch`` (prompt encoder +
  mask decoder + its upscaling to full resolution); ours ``TorchSam.decode`` (prompt encoder + mask decoder, the
  low-res logits back on the host: the gateway upscales only what it returns, on its CPU threads).
* segment everything, seconds per image (``points_per_side`` 32, thresholds 0 so no mask is filtered before NMS on
  either side, random weights keep few masks otherwise; encoder excluded on both sides): the official
  ``SamAutomaticMaskGenerator`` vs samserve's generator (:mod:`samserve.vision.amg`, the GenerateMasks code) driving
  ``TorchSam.decode``. Mask counts of both sides are recorded; 0 vs 0 is "not measured", never agreement.
* masks of ours in reduced precision vs ours in fp32 and vs official fp32 (and ours in fp32 vs official: SDPA and
  the served graph modules change nothing): IoU per prompt (point and box prompts on
  several images; the low-res logits of each side upscaled by the official ``postprocess_masks``, thresholded at the
  mask threshold; prompts empty on both sides are skipped and counted).
* peak device memory (``torch.cuda.max_memory_allocated``) per phase; on the CPU: not measured.

Writes bench/results/gpu_<device>.json (``--out`` elsewhere). Targets (GPU, ViT-H): encoder >= 60 images/s at batch
>= 8 and >= 5x official; decoder p50 <= 2 ms (1 prompt) and <= 5 ms (64 prompts); segment everything <= 1 s; masks
IoU >= 0.98, median >= 0.99. On the CPU the figures are recorded and the targets are "not applicable".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from samserve_build.timing import time_calls

TARGETS = {"encoder_images_per_s": 60.0, "encoder_speedup": 5.0, "decoder_p50_ms_1": 2.0, "decoder_p50_ms_64": 5.0,
           "amg_s_per_image": 1.0, "iou_min": 0.98, "iou_median": 0.99}


DECODER_PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")
COMPARISONS = (("vs_ours_fp32", "reduced", "fp32"), ("vs_official_fp32", "reduced", "official"),
               ("ours_fp32_vs_official_fp32", "fp32", "official"))
"""(result key, masks, reference masks) of the mask comparison."""


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(torch: Any, device: Any, fn: Callable[[], object]) -> float | None:
    """Peak bytes allocated on ``device`` during ``fn`` (GiB); None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(torch, device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def out_of_memory(torch: Any) -> type[BaseException]:
    return getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


def official_batch(torch: Any, device: Any, official: Any, images: np.ndarray) -> object:
    """The official image encoder on a stacked batch (``images``: B x S x S x 3 uint8), ``Sam.preprocess`` included."""
    with torch.inference_mode():
        tensor = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).contiguous()
        return official.image_encoder(official.preprocess(tensor))


def official_predict(torch: Any, predictor: Any, coords: Any, labels: Any) -> object:
    with torch.inference_mode():
        return predictor.predict_torch(coords, labels, multimask_output=True)


def encoder_rows(torch: Any, device: Any, official: Any, predictor: Any, ours: Any, images: np.ndarray,
                 batches: list[int], repeats: int) -> list[dict]:
    """Images/s of both sides per batch size (``images``: B x H x W x 3 uint8, S-sized, one per batch slot)."""
    size = ours.encoder.image_size
    rows = []
    for batch in batches:
        stacked = np.repeat(images[:1], batch, axis=0)
        sizes = np.tile(np.array([[size, size]], dtype=np.int64), (batch, 1))
        feeds = {"image": stacked, "input_size": sizes}
        row: dict[str, Any] = {"batch": batch}
        if batch == 1:
            official_call: Callable[[], object] = functools.partial(predictor.set_image, stacked[0])
        else:
            official_call = functools.partial(official_batch, torch, device, official, stacked)
        for side, call in (("official", official_call), ("ours", functools.partial(ours.encode, feeds))):
            try:
                samples = time_calls(call, repeats, after_each=functools.partial(_sync, torch, device))
                row[side] = {"images_per_s": batch / statistics.median(samples), "median_s": statistics.median(samples),
                             "samples_s": samples, "peak_gib": peak_memory(torch, device, call)}
            except out_of_memory(torch) as error:  # a batch too large for the device: say so, go on
                row[side] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if "images_per_s" in row["official"] and "images_per_s" in row["ours"]:
            row["speedup"] = row["ours"]["images_per_s"] / row["official"]["images_per_s"]
        rows.append(row)
    return rows


def decoder_rows(torch: Any, device: Any, predictor: Any, ours: Any, embedding: np.ndarray, image_hw: tuple[int, int],
                 meta: Any, repeats: int) -> list[dict]:
    """p50 of both sides for 1 and for 64 single-point prompts on one image (its embedding set on both sides)."""
    rng = np.random.default_rng(0)
    rows = []
    size = meta.image_size
    for prompts in (1, 64):
        points = rng.uniform(0, 1, (prompts, 1, 2)) * np.array([image_hw[1], image_hw[0]])
        coords_t = torch.as_tensor(predictor.transform.apply_coords(points, image_hw), dtype=torch.float32,
                                   device=device)
        labels_t = torch.ones((prompts, 1), dtype=torch.float32, device=device)

        official_call = functools.partial(official_predict, torch, predictor, coords_t, labels_t)

        scale = size / max(image_hw)
        coords = np.concatenate([points * scale, np.zeros((prompts, 1, 2))], axis=1).astype(np.float32)
        feeds = {"image_embeddings": embedding[None], "point_coords": coords,
                 "point_labels": np.tile(np.array([[1.0, -1.0]], dtype=np.float32), (prompts, 1)),
                 "mask_input": np.zeros((prompts, 1, *meta.low_res_mask_size), dtype=np.float32),
                 "has_mask_input": np.zeros((prompts,), dtype=np.float32)}
        row: dict[str, Any] = {"prompts": prompts}
        for side, call in (("official", official_call), ("ours", functools.partial(ours.decode, feeds))):
            samples = time_calls(call, repeats, after_each=functools.partial(_sync, torch, device))
            row[side] = {"p50_ms": 1000 * statistics.median(samples), "samples_ms": [1000 * s for s in samples]}
        rows.append(row)
    return rows


def amg_row(torch: Any, device: Any, official: Any, ours: Any, image: np.ndarray, embedding: np.ndarray,
            meta: Any, points_per_side: int) -> dict:
    """Segment everything on one image, encoder excluded on both sides."""
    try:
        from segment_anything import SamAutomaticMaskGenerator

        from samserve.core.embedding import EmbeddedImage, Embedding, Staged
        from samserve.vision import amg, processing
    except ImportError as error:  # OpenCV or pycocotools missing on this machine
        return {"error": f"not measured: {error}"}
    params = {"points_per_side": points_per_side, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    generator = SamAutomaticMaskGenerator(official, output_mode="coco_rle", **params)
    generator.predictor.set_image(image)
    noop = generator.predictor.set_image
    generator.predictor.set_image = lambda *args, **kwargs: None  # the embedding stays set: encoder excluded
    started = time.perf_counter()
    official_masks = generator.generate(image)
    _sync(torch, device)
    official_s = time.perf_counter() - started
    generator.predictor.set_image = noop
    hw = (int(image.shape[0]), int(image.shape[1]))
    staged = EmbeddedImage(Embedding(embedding, hw, processing.resized_size(hw, meta.image_size)), Staged())

    @contextlib.asynccontextmanager
    async def crop_embedding(crop: Any) -> Any:
        yield staged

    async def decode(image_: Any, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        feeds = {"image_embeddings": image_.embedding.array[None], "point_coords": batch.point_coords,
                 "point_labels": batch.point_labels, "mask_input": batch.mask_input,
                 "has_mask_input": batch.has_mask_input}
        out = await asyncio.to_thread(ours.decode, feeds)
        return out["low_res_masks"], out["iou_predictions"]

    def ours_call() -> Any:
        return asyncio.run(amg.MaskGenerator(amg.AmgParams(**params), meta, decode, crop_embedding).generate(hw))

    ours_call()  # warm-up
    started = time.perf_counter()
    ours_masks = ours_call()
    ours_s = time.perf_counter() - started
    row = {"points_per_side": points_per_side, "official_s": official_s, "ours_s": ours_s,
           "official_masks": len(official_masks), "ours_masks": len(ours_masks)}
    if row["official_masks"] and row["ours_masks"]:
        row["speedup"] = official_s / ours_s
    else:
        row["note"] = "not measured: a side kept no mask"
    return row


def iou_rows(torch: Any, device: Any, sams: dict[str, Any], official: Any, images: list[np.ndarray],
             meta: Any) -> dict:
    """Masks of ``sams['reduced']`` vs ``sams['fp32']`` and vs the released modules in fp32 (official attention),
    and ``sams['fp32']`` vs those: IoU per (image, prompt)."""
    from PIL import Image

    from samserve_build.graphs import DecoderGraph

    official_decoder = DecoderGraph(official)
    rng = np.random.default_rng(1)
    size = meta.image_size
    results: dict[str, list[float]] = {key: [] for key, _, _ in COMPARISONS}
    skipped = 0
    for image in images:
        hw = (int(image.shape[0]), int(image.shape[1]))
        input_hw = tuple(int(v) for v in np.round(np.array(hw) * size / max(hw)))
        padded = np.zeros((1, size, size, 3), dtype=np.uint8)
        resized = np.asarray(Image.fromarray(image).resize((input_hw[1], input_hw[0]), Image.Resampling.BILINEAR))
        padded[0, : input_hw[0], : input_hw[1]] = resized
        enc = {"image": padded, "input_size": np.array([input_hw], dtype=np.int64)}
        embeddings = {name: sam.encode(enc)["image_embeddings"] for name, sam in sams.items()}
        with torch.inference_mode():
            official_embedding = official.image_encoder(official.preprocess(
                torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float()))
        points = rng.uniform(0.1, 0.9, (8, 2)) * np.array([input_hw[1], input_hw[0]])
        corners = np.sort(rng.uniform(0.05, 0.95, (8, 2, 2)) * np.array([input_hw[1], input_hw[0]]), axis=1)
        prompts = [(np.stack([p, [0, 0]])[None], np.array([[1.0, -1.0]])) for p in points] + [
            (c[None], np.array([[2.0, 3.0]])) for c in corners]
        for coords, labels in prompts:
            feeds = {"point_coords": coords.astype(np.float32), "point_labels": labels.astype(np.float32),
                     "mask_input": np.zeros((1, 1, *meta.low_res_mask_size), dtype=np.float32),
                     "has_mask_input": np.zeros((1,), dtype=np.float32)}
            logits = {name: sam.decode({**feeds, "image_embeddings": embeddings[name]})["low_res_masks"]
                      for name, sam in sams.items()}
            with torch.inference_mode():
                official_logits = official_decoder(official_embedding, *(
                    torch.as_tensor(feeds[name], device=device) for name in DECODER_PROMPT_INPUTS))[0].cpu().numpy()
            masks = {}
            for name, value in (*logits.items(), ("official", official_logits)):
                with torch.inference_mode():
                    full = official.postprocess_masks(torch.as_tensor(value[:, :1]), input_hw, hw)
                masks[name] = (full > meta.mask_threshold).numpy()[0, 0]
            for key, mine, reference in COMPARISONS:
                union = np.logical_or(masks[mine], masks[reference]).sum()
                if union == 0:
                    skipped += 1
                    continue
                results[key].append(float(np.logical_and(masks[mine], masks[reference]).sum() / union))

    def stats(values: list[float]) -> dict:
        if not values:
            return {"n": 0, "note": "not measured: every prompt empty on both sides"}
        return {"n": len(values), "min": min(values), "median": statistics.median(values),
                "mean": statistics.fmean(values)}

    return {"prompts_per_image": 16, "images": len(images), "comparisons_skipped_empty_on_both_sides": skipped,
            **{key: stats(values) for key, values in results.items()}}


def device_record(torch: Any, device: Any) -> dict:
    if device.type != "cuda":
        return {"kind": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"kind": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--variant", help="default: vit_h on cuda, tiny on cpu")
    parser.add_argument("--precision", choices=["bf16", "fp16"], default="bf16", help="ours, reduced")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", default="1,8,32", help="encoder batch sizes")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--iou-images", type=int, default=4)
    common.add_output_argument(parser)
    args = parser.parse_args()

    import torch
    from segment_anything import SamPredictor

    from samserve_build import architectures, export
    from samserve_build.torch_runtime import TorchSam
    from samserve_dev.images import synthetic_image

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    variant = args.variant or ("vit_h" if args.device == "cuda" else "tiny")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        checkpoint = architectures.write_random_checkpoint(variant, 0, Path(work) / f"{variant}-seed0.pth")
        official = architectures.load_sam(variant, checkpoint).to(device).eval()
        arch = architectures.architecture_for(variant, checkpoint)
        meta = export.model_metadata(official, variant, architectures.sha256_file(checkpoint), variant, arch.to_dict())
        ours = TorchSam(checkpoint, meta, device=args.device, precision=args.precision, verify_weights=False)
        ours_fp32 = TorchSam(checkpoint, meta, device=args.device, precision="fp32", verify_weights=False)
    predictor = SamPredictor(official)
    size = meta.image_size
    square = synthetic_image(size, size, seed=5)[None]
    print(f"{variant} on {device} ({args.precision}); weights ready in {time.perf_counter() - started:.0f} s",
          flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    encoder = encoder_rows(torch, device, official, predictor, ours, square, batches, args.repeats)
    common.print_table("encoder (images/s)", ["batch", "official", "ours", "speedup"],
                       [[r["batch"], r["official"].get("images_per_s", "oom"), r["ours"].get("images_per_s", "oom"),
                         r.get("speedup", "-")] for r in encoder])
    image = synthetic_image(int(size * 0.75), size, seed=7)
    predictor.set_image(image)
    hw = (int(image.shape[0]), int(image.shape[1]))
    input_hw = predictor.input_size
    padded = np.zeros((1, size, size, 3), dtype=np.uint8)
    padded[0, : input_hw[0], : input_hw[1]] = predictor.transform.apply_image(image)
    sizes = np.array([input_hw], dtype=np.int64)
    embedding = ours.encode({"image": padded, "input_size": sizes})["image_embeddings"][0]
    decoder = decoder_rows(torch, device, predictor, ours, embedding, hw, meta, args.repeats)
    common.print_table("decoder p50 (ms)", ["prompts", "official", "ours"],
                       [[r["prompts"], r["official"]["p50_ms"], r["ours"]["p50_ms"]] for r in decoder])
    segment_everything = amg_row(torch, device, official, ours, image, embedding, meta, args.points_per_side)
    print(f"\nsegment everything: {segment_everything}")
    images = [synthetic_image(int(size * 0.75), size, seed=11 + i) for i in range(args.iou_images)]
    masks = iou_rows(torch, device, {"reduced": ours, "fp32": ours_fp32}, official, images, meta)
    print(f"masks {args.precision} vs fp32: {masks}")

    gpu = device.type == "cuda"
    best = max((r for r in encoder if r["batch"] >= 8 and "images_per_s" in r["ours"]),
               key=lambda r: r["ours"]["images_per_s"], default=None)
    met: dict[str, Any] = {"applicable": gpu and variant == "vit_h"}
    if met["applicable"]:
        vs = masks["vs_ours_fp32"]
        fastest = best["ours"]["images_per_s"] if best is not None else 0.0
        met.update({
            "encoder_images_per_s": fastest >= TARGETS["encoder_images_per_s"],
            "encoder_speedup": best is not None and best.get("speedup", 0) >= TARGETS["encoder_speedup"],
            "decoder_1": decoder[0]["ours"]["p50_ms"] <= TARGETS["decoder_p50_ms_1"],
            "decoder_64": decoder[1]["ours"]["p50_ms"] <= TARGETS["decoder_p50_ms_64"],
            "segment_everything": segment_everything.get("ours_s", float("inf")) <= TARGETS["amg_s_per_image"],
            "masks": vs["n"] > 0 and vs["min"] >= TARGETS["iou_min"] and vs["median"] >= TARGETS["iou_median"],
        })
    environment = common.environment()
    record = device_record(torch, device)
    if gpu:
        environment["machine"] = f"{record['name']} (compute capability {record['compute_capability']}), " \
                                 f"{environment['cpu']['cores']} CPU cores"
    payload = {
        "benchmark": "gpu", "environment": {**environment, "device": record}, "variant": variant,
        "precision": args.precision, "repeats": args.repeats, "encoder": encoder, "decoder": decoder,
        "segment_everything": segment_everything, "masks": masks, "targets": TARGETS, "met": met,
        "seconds": time.perf_counter() - started,
    }
    name = "gpu_" + re.sub(r"[^a-z0-9]+", "-", (record.get("name") or "cpu").lower()).strip("-") + ".json"
    common.write_results(name, payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
