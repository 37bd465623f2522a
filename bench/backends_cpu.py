"""The CPU serving targets side by side on the exported vit_b graphs, in-process, and what ``auto`` picks here.

Times the encoder (one 768x1024 image) and the decoder (1 point, all mask tokens; and 16 such prompts in one run)
of each CPU target (``samserve_build.targets.CPU_TARGETS``, with the runners and parameters Triton's python backend
uses) against the official PyTorch modules, all calls interleaved (``common.interleaved_samples``), with each one's
relative error against PyTorch (same weights). Two decoders that no target serves are measured beside them, to
show why: OpenVINO computing the decoder in bf16 and ONNX Runtime's dynamic int8 quantization of the decoder
(``quantize_dynamic``, int8 weights of the MatMuls), each with its masks against the fp32 decoder's (the vit_b
gate of tests/integration/test_cpu_runtimes.py). ``auto``'s choice is :func:`samserve_build.cpu_choice.choose`
applied to these medians over the candidates of this CPU (the encoder and the decoder chosen apart). Writes
bench/results/backends_cpu.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import torch

from bench.common import (
    BY_CPU,
    WORK,
    cpu_key,
    environment,
    interleaved_samples,
    print_table,
    sampling_record,
    summary,
    vit_b_model,
    write_results,
)
from samserve.backends.openvino_runner import OpenVinoRunner
from samserve.backends.python_model import OnnxRunner
from samserve.core import model_spec
from samserve.vision import processing
from samserve_build import architectures, cpu_choice, export, graph_quality
from samserve_build.graphs import DecoderGraph, EncoderGraph
from samserve_build.targets import CPU_TARGETS, SERVING_TARGETS
from samserve_dev import mixed_precision
from samserve_dev.images import synthetic_image

ENCODER_REPEATS, DECODER_REPEATS, BATCH_REPEATS = 3, 30, 5
BATCH_PROMPTS = 16
REFERENCE = "pytorch-official-modules"
UNSERVED_DECODERS = ("openvino-bf16-decoder", "onnxruntime-int8-decoder")


def int8_decoder(model_dir: Path) -> Path:
    """The vit_b decoder with ONNX Runtime's dynamic int8 quantization (written once into the work folder)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = WORK / "backends_cpu" / "decoder.int8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(model_dir / model_spec.DECODER_FILE), str(path), weight_type=QuantType.QInt8)
    return path


def main() -> None:
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    checkpoint, model_dir, meta = vit_b_model()
    sam = architectures.load_sam("vit_b", checkpoint)
    prepared = processing.prepare_image(synthetic_image(768, 1024, seed=7), meta.image_size)
    encoder_feeds = {
        model_spec.ENC_IMAGE: prepared.padded[None],
        model_spec.ENC_INPUT_SIZE: np.asarray([prepared.input_size], dtype=np.int64),
    }
    encoder_graph, decoder_graph = EncoderGraph(sam).eval(), DecoderGraph(sam).eval()
    reference_embedding = encoder_graph(*(torch.from_numpy(encoder_feeds[n]) for n in model_spec.ENCODER_INPUTS))
    reference_embedding = reference_embedding.numpy()
    prompt = processing.Prompt(points=np.array([[512.0, 300.0]]), labels=np.array([1]))
    decoder_feeds = {}
    for name, count in (("decoder", 1), ("decoder_16", BATCH_PROMPTS)):
        batch = processing.decoder_batches([prompt] * count, prepared.original_size, prepared.input_size,
                                           meta.low_res_mask_size)[0]
        decoder_feeds[name] = {
            model_spec.DEC_EMBEDDING: reference_embedding, model_spec.DEC_POINT_COORDS: batch.point_coords,
            model_spec.DEC_POINT_LABELS: batch.point_labels, model_spec.DEC_MASK_INPUT: batch.mask_input,
            model_spec.DEC_HAS_MASK_INPUT: batch.has_mask_input}
    feeds = {"encoder": encoder_feeds, **decoder_feeds}

    def official(graph: torch.nn.Module, inputs: tuple[str, ...], stage: str):
        tensors = [torch.from_numpy(feeds[stage][n]) for n in inputs]
        return lambda: graph(*tensors)

    reference_masks = official(decoder_graph, model_spec.DECODER_INPUTS, "decoder")()[0].numpy()
    runners = {name: {"encoder": sam_.encoder, "decoder": sam_.decoder} for name, sam_ in
               ((str(target), graph_quality.OnnxSam.of_target(model_dir, target)) for target in CPU_TARGETS)}
    runners["openvino-bf16-decoder"] = {"decoder": OpenVinoRunner(model_dir / model_spec.DECODER_FILE,
                                                                  {model_spec.PRECISION_PARAMETER: "bf16"})}
    runners["onnxruntime-int8-decoder"] = {"decoder": OnnxRunner(int8_decoder(model_dir), {})}
    for graphs in runners.values():
        graphs["decoder_16"] = graphs["decoder"]

    calls = {stage: {REFERENCE: official(encoder_graph if stage == "encoder" else decoder_graph,
                                         model_spec.ENCODER_INPUTS if stage == "encoder" else model_spec.DECODER_INPUTS,
                                         stage)} for stage in feeds}
    for name, graphs in runners.items():
        for stage, runner in graphs.items():
            calls[stage][name] = (lambda run, stage_feeds: lambda: run(stage_feeds))(runner.run, feeds[stage])
    repeats = {"encoder": ENCODER_REPEATS, "decoder": DECODER_REPEATS, "decoder_16": BATCH_REPEATS}
    warmups = {"encoder": 1, "decoder": 3, "decoder_16": 1}
    samples = {stage: interleaved_samples(calls[stage], repeats[stage], warmup=warmups[stage]) for stage in feeds}

    references = {"encoder": (reference_embedding, model_spec.ENC_EMBEDDING),
                  "decoder": (reference_masks, model_spec.DEC_LOW_RES_MASKS)}
    runtimes: dict[str, dict] = {REFERENCE: {"encoder_relative_error": 0.0, "decoder_relative_error": 0.0}}
    for name, graphs in runners.items():
        runtimes[name] = {f"{stage}_relative_error": export.relative_error(
            graphs[stage].run(feeds[stage])[output], expected) for stage, (expected, output) in references.items()
            if stage in graphs}
    for name, record in runtimes.items():
        record.update({stage: summary(samples[stage][name]) for stage in feeds if name in samples[stage]})
    for name in CPU_TARGETS:
        runtimes[name]["description"] = SERVING_TARGETS[name].description
    # Why the two decoders are not served: the vit_b mask gate of tests/integration/test_cpu_runtimes.py, each with
    # the fp32 encoder, against the fp32 decoder.
    fp32 = graph_quality.OnnxSam.of_target(model_dir, CPU_TARGETS[0])
    images, prompts = mixed_precision.vit_b_inputs()
    for name in UNSERVED_DECODERS:
        reduced = graph_quality.OnnxSam(fp32.encoder, runners[name]["decoder"], meta)
        agreement = graph_quality.mask_agreement(fp32, reduced, images, prompts).summary()
        runtimes[name]["vit_b_mask_gate"] = {**agreement, "met": bool(
            agreement["min_iou"] >= graph_quality.MIN_IOU and agreement["median_iou"] >= graph_quality.MEDIAN_IOU)}

    cpu = cpu_choice.Cpu.detect()
    candidates = cpu_choice.candidates(cpu)
    choice = cpu_choice.choose({name: cpu_choice.Timing(runtimes[name]["encoder"]["median_ms"],
                                                        runtimes[name]["decoder"]["median_ms"])
                                for name in candidates})
    auto = {"candidates": [str(name) for name in candidates], "encoder": str(choice.encoder),
            "decoder": str(choice.decoder),
            "why": "the fastest encoder and the fastest decoder among this CPU's candidates (flags: "
                   f"{' '.join(cpu.flags) or 'none of interest'}), a later candidate only when "
                   f"{cpu_choice.MARGIN:.0%} faster; cpu-openvino-bf16 is a candidate only with native bf16 "
                   "(AVX-512-bf16 or AMX)"}

    rows = [[name, r.get("encoder", {}).get("median_ms", "—"), r["decoder"]["median_ms"],
             r["decoder_16"]["median_ms"], f"{r.get('encoder_relative_error', float('nan')):.1e}",
             f"{r['decoder_relative_error']:.1e}"] for name, r in runtimes.items()]
    print_table("vit_b graphs in-process, 2-core CPU (ms, median)",
                ["runtime", "encoder", "decoder", f"decoder x{BATCH_PROMPTS}", "enc rel err", "dec rel err"], rows)
    print(f"auto picks the encoder of {choice.encoder} and the decoder of {choice.decoder}")
    machine = {**environment(), "openvino": ov.__version__}
    # This CPU's row of the cross-CPU table, kept next to the other CPUs' rows (docs/cpu-runtimes.md).
    write_results(f"{cpu_key(machine['cpu'])}.json", {
        "benchmark": "bench/backends_cpu.py", "environment": machine, "model": "vit_b, seeded random (seed 0)",
        "median_ms": {name: {stage: r[stage]["median_ms"] for stage in ("encoder", "decoder") if stage in r}
                      for name, r in runtimes.items()},
        "auto": {"encoder": auto["encoder"], "decoder": auto["decoder"]},
    }, BY_CPU)
    write_results("backends_cpu.json", {
        "benchmark": "bench/backends_cpu.py",
        "environment": machine,
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)"},
        "runtimes": runtimes,
        "unserved_decoders": list(UNSERVED_DECODERS),
        "batch_prompts": BATCH_PROMPTS,
        "sampling": {stage: sampling_record(list(calls[stage]), repeats[stage], warmups[stage]) for stage in feeds},
        "auto": auto,
    })


if __name__ == "__main__":
    main()
