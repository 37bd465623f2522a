"""Which runtime serves the CPU target: ONNX Runtime vs OpenVINO on the exported vit_b graphs (one run).

Times the encoder (one 768x1024 image) and the decoder (1 point, all mask tokens) in-process, every runtime's calls
interleaved with the others' (``common.interleaved_samples``), and reports each
runtime's relative error against PyTorch (the official modules, same weights). Writes
bench/results/backends_cpu.json. The choice (ONNX Runtime, fp32) is documented in README.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.support

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    environment,
    interleaved_samples,
    print_table,
    sampling_record,
    summary,
    vit_b_model,
    write_results,
)  # noqa: E402

from samserve import model_spec, onnx_backend, processing  # noqa: E402
from samserve_build import architectures, export  # noqa: E402
from tests.support.images import synthetic_image  # noqa: E402

ENCODER_REPEATS, DECODER_REPEATS = 5, 30
CHOICE = "onnxruntime-fp32"
FP32_RUNTIMES = ("onnxruntime-fp32", "openvino-f32")
"""The runtimes that keep parity with PyTorch (the 1e-4 export check); a reduced-precision runtime is judged on
masks, not here."""


def why(runtimes: dict[str, dict]) -> str:
    """The choice's reasons, stated from this run's medians (no claim the figures do not carry)."""
    def ratio(graph: str, other: str) -> float:
        return runtimes[CHOICE][graph]["median_ms"] / runtimes[other][graph]["median_ms"]

    parts = [f"{CHOICE} vs {other}: encoder x{ratio('encoder', other):.2f}, decoder x{ratio('decoder', other):.2f} "
             f"(time relative to it)" for other in runtimes if other != CHOICE]
    fastest = min(FP32_RUNTIMES, key=lambda name: runtimes[name]["decoder"]["median_ms"])
    verdict = ("it is the choice" if fastest == CHOICE else
               f"NOT the choice ({CHOICE}): this CPU argues for revisiting it")
    return ("Fp32 keeps parity with PyTorch (relative error ~1e-6, far below the 1e-4 export check). Among the fp32 "
            f"runtimes the fastest decoder (the per-prompt hot path) in this run is {fastest}: {verdict}. bf16 is "
            "outside the parity tolerance; it is judged on masks in the CPU-precision work. Measured: "
            + "; ".join(parts) + ".")


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
    encoder_graph, decoder_graph = export.EncoderGraph(sam).eval(), export.DecoderGraph(sam).eval()
    encoder_tensors = [torch.from_numpy(encoder_feeds[n]) for n in model_spec.ENCODER_INPUTS]
    reference_embedding = encoder_graph(*encoder_tensors).numpy()
    prompt = processing.Prompt(points=np.array([[512.0, 300.0]]), labels=np.array([1]))
    batch = processing.decoder_batches([prompt], prepared.original_size, prepared.input_size, meta.low_res_mask_size)[0]
    decoder_feeds = {
        model_spec.DEC_EMBEDDING: reference_embedding,
        model_spec.DEC_POINT_COORDS: batch.point_coords,
        model_spec.DEC_POINT_LABELS: batch.point_labels,
        model_spec.DEC_MASK_INPUT: batch.mask_input,
        model_spec.DEC_HAS_MASK_INPUT: batch.has_mask_input,
    }
    reference_masks = decoder_graph(*(torch.from_numpy(decoder_feeds[n]) for n in model_spec.DECODER_INPUTS))[0].numpy()

    sessions = {
        "onnxruntime-fp32": (
            onnx_backend.create_session(model_dir / model_spec.ENCODER_FILE),
            onnx_backend.create_session(model_dir / model_spec.DECODER_FILE),
        )
    }
    core = ov.Core()
    for precision in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        sessions[f"openvino-{precision}"] = (
            core.compile_model(str(model_dir / model_spec.ENCODER_FILE), "CPU", config),
            core.compile_model(str(model_dir / model_spec.DECODER_FILE), "CPU", config),
        )

    def runner(compiled, feeds):
        if isinstance(compiled, ov.CompiledModel):
            return lambda: compiled(feeds)
        return lambda: onnx_backend.run(compiled, feeds)

    def first_output(compiled, feeds) -> np.ndarray:
        out = runner(compiled, feeds)()
        return out[0] if isinstance(compiled, ov.CompiledModel) else next(iter(out.values()))

    decoder_tensors = [torch.from_numpy(decoder_feeds[n]) for n in model_spec.DECODER_INPUTS]
    reference = "pytorch-official-modules"
    encoders = {reference: lambda: encoder_graph(*encoder_tensors)}
    decoders = {reference: lambda: decoder_graph(*decoder_tensors)}
    for name, (encoder, decoder) in sessions.items():
        encoders[name], decoders[name] = runner(encoder, encoder_feeds), runner(decoder, decoder_feeds)
    encoder_samples = interleaved_samples(encoders, ENCODER_REPEATS, warmup=1)
    decoder_samples = interleaved_samples(decoders, DECODER_REPEATS, warmup=3)
    runtimes = {reference: {"encoder_relative_error": 0.0, "decoder_relative_error": 0.0}}
    for name, (encoder, decoder) in sessions.items():
        runtimes[name] = {
            "encoder_relative_error": export.relative_error(first_output(encoder, encoder_feeds), reference_embedding),
            "decoder_relative_error": export.relative_error(first_output(decoder, decoder_feeds), reference_masks),
        }
    for name, record in runtimes.items():
        record.update(encoder=summary(encoder_samples[name]), decoder=summary(decoder_samples[name]))
    rows = [
        [name, r["encoder"]["median_ms"], r["decoder"]["median_ms"], f"{r['encoder_relative_error']:.1e}",
         f"{r['decoder_relative_error']:.1e}"]
        for name, r in runtimes.items()
    ]
    print_table("vit_b graphs in-process, 2-core CPU (ms, median)",
                ["runtime", "encoder", "decoder", "enc rel err", "dec rel err"], rows)
    write_results("backends_cpu.json", {
        "benchmark": "bench/backends_cpu.py",
        "environment": {**environment(), "openvino": ov.__version__},
        "model": {"variant": "vit_b", "weights": "seeded random (seed 0)"},
        "runtimes": runtimes,
        "sampling": {"encoder": sampling_record(list(encoders), ENCODER_REPEATS, 1),
                     "decoder": sampling_record(list(decoders), DECODER_REPEATS, 3)},
        "choice": CHOICE,
        "why": why(runtimes),
    })


if __name__ == "__main__":
    main()
