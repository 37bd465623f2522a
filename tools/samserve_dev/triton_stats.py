"""What Triton itself counts: inferences per model (its statistics extension), to prove what ran and what did not."""

from __future__ import annotations

import tritonclient.grpc as tritongrpc

from samserve.core import model_spec


def inference_count(triton_url: str, model: str) -> int:
    """How many inferences Triton ran for ``model`` (its own statistics)."""
    client = tritongrpc.InferenceServerClient(triton_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)
        return sum(int(m.get("inference_count", 0)) for m in stats["model_stats"])
    finally:
        client.close()


def encoder_count(triton_url: str) -> int:
    return inference_count(triton_url, model_spec.ENCODER_MODEL)


def decoder_count(triton_url: str) -> int:
    return inference_count(triton_url, model_spec.DECODER_MODEL)
