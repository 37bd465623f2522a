"""OpenVINO on the exported graphs (serving targets ``cpu-openvino`` and ``cpu-openvino-bf16``).

The same ONNX files as ONNX Runtime runs, compiled by OpenVINO's CPU plugin. ``precision`` says what the plugin
computes in: ``fp32`` keeps parity with PyTorch (OpenVINO's own default is bf16 on CPUs with AMX, so it is always
set), ``bf16`` runs the matrix products in bf16 on CPUs with native bf16 (AVX-512-bf16, AMX) and is judged on masks
(tests/integration/test_cpu_runtimes.py: cpu-openvino-bf16 runs the encoder in bf16; a bf16 decoder too moved masks
past the gate). Inputs and outputs keep the graphs' names, dtypes and layouts
(:mod:`samserve.core.model_spec`); outputs are float32 whatever the precision.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from samserve.core import model_spec

INFERENCE_PRECISION: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}
"""Config parameter ``precision`` -> OpenVINO's ``INFERENCE_PRECISION_HINT``."""


OUTPUT_NAMES = frozenset({model_spec.ENC_EMBEDDING, *model_spec.DECODER_OUTPUTS})


def _graph_output_name(names: set[str]) -> str:
    """The graph's name of an output (OpenVINO also gives it the names of the node that computes it)."""
    known = names & OUTPUT_NAMES
    if len(known) != 1:
        raise ValueError(f"an output named {sorted(names)} is none of the exported graphs' {sorted(OUTPUT_NAMES)}")
    return next(iter(known))


class OpenVinoRunner:
    """One compiled graph (parameters ``precision``, ``threads``: OpenVINO's inference threads, 0 = all cores).

    ``run`` may be called from several threads (the mask gates do): each thread gets its own infer request."""

    def __init__(self, path: Path, parameters: Mapping[str, str]) -> None:
        import openvino as ov

        precision = parameters.get(model_spec.PRECISION_PARAMETER, "fp32")
        if precision not in INFERENCE_PRECISION:
            raise ValueError(f"OpenVINO precision {precision!r} is none of {sorted(INFERENCE_PRECISION)}")
        config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
                                        "PERFORMANCE_HINT": "LATENCY"}
        threads = int(parameters.get("threads", "0"))
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.output_names = [_graph_output_name(output.get_names()) for output in self.compiled.outputs]
        self._local = threading.local()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer(dict(feeds), share_outputs=False)  # copies: the next run reuses the request
        return {name: results[index] for index, name in enumerate(self.output_names)}

    def close(self) -> None:
        self._local = threading.local()
        self.compiled = None


def create_runner(path: Path, model: str, parameters: Mapping[str, str], meta: model_spec.ModelMetadata,
                  device_id: int) -> OpenVinoRunner:
    """``samserve.backends.python_model.RUNTIMES['openvino']``."""
    return OpenVinoRunner(path, parameters)
