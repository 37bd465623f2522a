"""Official SamPredictor vs the Triton models, side by side in one run (vit_b, seeded random weights).

* encoder: ``SamPredictor.set_image`` vs samserve's preprocessing + the Triton ``sam_encoder`` call;
* decoder: ``SamPredictor.predict`` (1 point, multimask, incl. its mask postprocessing) vs the Triton
  ``sam_decoder`` call + samserve's postprocessing (upscale, threshold), and the bare decoder call for reference.

The calls of each stage are timed interleaved (``common.interleaved_samples``: round robin, the order rotated each
round), so that a slow phase of the machine hits every side alike. Prints a table (median, p90, ratio
ours/official) and writes bench/results/models_cpu.json.
Targets on the 2-core CPU: encoder <= 0.5x official set_image; decoder path <= 0.7x official predict. Measured for
the fp32 target (cpu-onnxruntime) and, when it differs, for what ``auto`` picks on this CPU (its encoder's target:
<= 0.25x on CPUs with native bf16): both served at once, their calls and the official ones in one round robin, so
the official predictor is timed once for both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable

from bench.common import (
    WORK,
    Scene,
    ServedEmbeddings,
    add_image_arguments,
    environment,
    interleaved_samples,
    print_table,
    sampling_record,
    scene,
    summary,
    triton_client,
    write_results,
)
from samserve.core.settings import TransportName
from samserve.vision import processing, segmentation
from samserve_build import cpu_choice
from samserve_build.targets import SERVING_TARGETS, ServingTarget, ServingTargetName
from samserve_dev import local_stack

ENCODER_TARGET = 0.5
BF16_ENCODER_TARGET = 0.25
"""auto's encoder on a CPU with native bf16 (the CPU-speed issue's target; ENCODER_TARGET on any other CPU)."""
DECODER_TARGET = 0.7
ENCODER_WARMUP, DECODER_WARMUP = 1, 3


Measured = tuple[dict[str, list[float]], dict[str, list[float]], list[float]]
"""Encoder samples, decoder samples (name -> seconds; the official predictor's among them) and the pixel agreement
of each multimask output with the official masks."""
OFFICIAL = ("official_set_image", "official_predict")


def measure(targets: dict[str, ServingTarget], setup: Scene, args: argparse.Namespace
            ) -> tuple[dict[str, Measured], dict[str, list[str]]]:
    """Encoder and decoder samples of each of ``targets`` (a name -> a target) served by Triton, every target's
    stack up at once and its calls in one round robin with the official predictor's: the official calls are timed
    once for all targets, interleaved with each. Name -> what :data:`Measured` holds, the official samples in each;
    and the calls of each round robin ("encoders", "decoders": their names, ``<target name>:<call>``)."""
    model_dir, meta, image = setup.model_dir, setup.meta, setup.image
    point, label, predictor = setup.point, setup.label, setup.predictor
    prompt = processing.Prompt(points=point, labels=label, multimask_output=True)
    with asyncio.Runner() as runner, contextlib.ExitStack() as stacks:
        encoder_calls: dict[str, Callable[[], object]] = {OFFICIAL[0]: lambda: predictor.set_image(image)}
        decoder_calls: dict[str, Callable[[], object]] = {
            OFFICIAL[1]: lambda: predictor.predict(point, label, multimask_output=True)}
        agreement_checks: dict[str, Callable[[], list[float]]] = {}
        for name, target in targets.items():
            server = stacks.enter_context(
                local_stack.serve_locally(model_dir, WORK / "models_cpu" / target.name, target=target))
            triton = triton_client(runner, server.grpc_url)
            triton_grpc = triton_client(runner, server.grpc_url, TransportName.GRPC)
            stacks.callback(lambda t=triton, g=triton_grpc: (runner.run(t.close()), runner.run(g.close())))
            # What the embedder runs on a cache miss: preprocessing + the Triton encoder; interleaved with set_image.
            encoder_calls[f"{name}:triton_encoder"] = (
                lambda t=triton: runner.run(t.encode(processing.prepare_image(image, meta.image_size))))
            embeddings = ServedEmbeddings(runner, triton)
            stacks.callback(embeddings.close)
            embedded = embeddings.get(image)
            batch = processing.decoder_batches([prompt], embedded.original_size, embedded.input_size,
                                               meta.low_res_mask_size)[0]
            inline = runner.run(triton_grpc.stage(embedded.embedding))
            decoder_calls.update({
                f"{name}:triton_decoder_plus_postprocessing":
                    lambda t=triton, e=embedded: runner.run(segmentation.segment(t, meta, e, [prompt])),
                f"{name}:triton_decoder_bare": lambda t=triton, e=embedded, b=batch: runner.run(t.decode(e, b)),
                f"{name}:triton_decoder_bare_embedding_inline_grpc":
                    lambda g=triton_grpc, i=inline, b=batch: runner.run(g.decode(i, b)),
            })

            def agreement(t=triton, e=embedded) -> list[float]:  # same answer on both sides: equal work compared
                masks, _, _ = predictor.predict(point, label, multimask_output=True)
                ours = runner.run(segmentation.segment(t, meta, e, [prompt]))[0]
                return [float((masks[k] == ours.masks[k]).mean()) for k in range(len(masks))]

            agreement_checks[name] = agreement
        encoders = interleaved_samples(encoder_calls, args.encoder_repeats, ENCODER_WARMUP)
        decoders = interleaved_samples(decoder_calls, args.decoder_repeats, DECODER_WARMUP)
        agreements = {name: check() for name, check in agreement_checks.items()}

    def of(name: str, samples: dict[str, list[float]]) -> dict[str, list[float]]:
        return {call.removeprefix(f"{name}:"): times for call, times in samples.items()
                if call in OFFICIAL or call.startswith(f"{name}:")}

    return ({name: (of(name, encoders), of(name, decoders), agreements[name]) for name in targets},
            {"encoders": list(encoder_calls), "decoders": list(decoder_calls)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-repeats", type=int, default=3)
    parser.add_argument("--decoder-repeats", type=int, default=50)
    add_image_arguments(parser)
    args = parser.parse_args()
    setup = scene(args)
    meta = setup.meta
    fp32 = SERVING_TARGETS[ServingTargetName.CPU_ONNXRUNTIME]
    auto = cpu_choice.resolve(setup.model_dir, WORK)
    measured, calls = measure({"fp32": fp32} if auto is fp32 else {"fp32": fp32, "auto": auto}, setup, args)
    encoders, decoders, agreement = measured["fp32"]
    auto_measured = measured.get("auto", measured["fp32"])
    results = {name: summary(samples) for name, samples in {**encoders, **decoders}.items()}
    encoder_ratio = results["triton_encoder"]["median_ms"] / results["official_set_image"]["median_ms"]
    decoder_ratio = (results["triton_decoder_plus_postprocessing"]["median_ms"]
                     / results["official_predict"]["median_ms"])
    rows = [
        ["encoder", results["official_set_image"]["median_ms"], results["official_set_image"]["p90_ms"],
         results["triton_encoder"]["median_ms"], results["triton_encoder"]["p90_ms"], encoder_ratio,
         f"<= {ENCODER_TARGET}"],
        ["decoder (1 pt, multimask, + postprocess)", results["official_predict"]["median_ms"],
         results["official_predict"]["p90_ms"], results["triton_decoder_plus_postprocessing"]["median_ms"],
         results["triton_decoder_plus_postprocessing"]["p90_ms"], decoder_ratio, f"<= {DECODER_TARGET}"],
        ["bare Triton decoder call (embedding in shm)", "", "", results["triton_decoder_bare"]["median_ms"],
         results["triton_decoder_bare"]["p90_ms"], "", ""],
        ["bare Triton decoder call (embedding inline, gRPC)", "", "",
         results["triton_decoder_bare_embedding_inline_grpc"]["median_ms"],
         results["triton_decoder_bare_embedding_inline_grpc"]["p90_ms"], "", ""],
    ]
    print_table(
        f"vit_b, seeded random weights, {args.height}x{args.width} image (ms)",
        ["stage", "official p50", "official p90", "samserve p50", "samserve p90", "ratio", "target"], rows,
    )
    write_results("models_cpu.json", {
        "benchmark": "bench/models_cpu.py",
        "environment": environment(),
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)", "model_id": meta.model_id},
        "image": {"height": args.height, "width": args.width},
        "backend": "cpu-onnxruntime: ONNX Runtime (fp32) in Triton's python backend, tritonserver from "
                   "nvidia-pytriton; `auto` below: this CPU's choice (samserve_build.cpu_choice)",
        "embedding_transport": "Triton system shared memory (default); inline gRPC timed for comparison",
        "results": results,
        "sampling": {"encoders": sampling_record(calls["encoders"], args.encoder_repeats, ENCODER_WARMUP),
                     "decoders": sampling_record(calls["decoders"], args.decoder_repeats, DECODER_WARMUP)},
        "ratios": {"encoder": encoder_ratio, "decoder_path": decoder_ratio},
        "targets": {"encoder": ENCODER_TARGET, "decoder_path": DECODER_TARGET},
        "targets_met": {"encoder": encoder_ratio <= ENCODER_TARGET, "decoder_path": decoder_ratio <= DECODER_TARGET},
        "mask_pixel_agreement_with_official": agreement,
        "auto": {"target": auto.label, **auto_record(auto_measured)},
    })


def auto_record(measured: tuple[dict[str, list[float]], dict[str, list[float]], list[float]]) -> dict[str, object]:
    """The figures of ``auto``'s target (this CPU's choice, samserve_build.cpu_choice): the encoder ratio against
    its target (BF16_ENCODER_TARGET where the CPU has native bf16, else ENCODER_TARGET)."""
    encoders, decoders, agreement = measured
    results = {name: summary(samples) for name, samples in {**encoders, **decoders}.items()}
    encoder_ratio = results["triton_encoder"]["median_ms"] / results["official_set_image"]["median_ms"]
    decoder_ratio = (results["triton_decoder_plus_postprocessing"]["median_ms"]
                     / results["official_predict"]["median_ms"])
    cpu = cpu_choice.Cpu.detect()
    bf16 = bool(set(SERVING_TARGETS[ServingTargetName.CPU_OPENVINO_BF16].native_flags) & set(cpu.flags))
    target = BF16_ENCODER_TARGET if bf16 else ENCODER_TARGET
    print(f"auto's target: encoder {encoder_ratio:.2f}x official set_image (target <= {target}), decoder path "
          f"{decoder_ratio:.2f}x official predict")
    return {"results": results, "ratios": {"encoder": encoder_ratio, "decoder_path": decoder_ratio},
            "native_bf16": bf16, "targets": {"encoder": target}, "targets_met": {"encoder": encoder_ratio <= target},
            "mask_pixel_agreement_with_official": agreement}


if __name__ == "__main__":
    main()
