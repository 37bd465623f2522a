"""ONNX Runtime sessions: one definition of how the exported graphs run (serving target ``cpu-onnxruntime``).

Used by the Triton python-backend models and by the exporter's post-export check, so the check verifies exactly
what is served.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def create_session(
    path: Path | str, intra_op_threads: int = 0, providers: Sequence[str] = DEFAULT_PROVIDERS
) -> ort.InferenceSession:
    """An inference session for ``path`` (external data is resolved beside it).

    ``intra_op_threads``: 0 lets ONNX Runtime use every core. ``providers``: execution providers in order of
    preference (a serving target's config names them).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting between runs: on a small CPU the spinning threads would steal the cores that the
    # gateway and the other model need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], shrink_arena: bool = False
) -> dict[str, np.ndarray]:
    """Run ``session`` and return its outputs by name. ``shrink_arena``: hand the memory the run grew back to
    the system afterwards (measured with the vit_b encoder: keeps 0.65 GB resident instead of 4.1 GB, peak
    2.4 GB instead of 4.1 GB, about 10 % slower)."""
    names = [output.name for output in session.get_outputs()]
    options = ort.RunOptions()
    if shrink_arena:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return dict(zip(names, session.run(names, dict(feeds), options), strict=True))
