"""Mixed-precision graph files: their names, sizes (external data included), and the fp32 graph of an export
rewritten into one, written atomically and checked by onnx's checker."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_model

from samserve.core import model_spec
from samserve_build.precision.analysis import Precision, tensor_bytes
from samserve_build.precision.rewriter import convert_model

LOG = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000
"""A mixed graph whose initializers exceed this is saved with external data ``<file>.data`` (protobuf's hard limit
is 2 GiB; ViT-H's fp16 encoder is about 1.3 GB and stays one file)."""
def mixed_precision_file(graph_file: str, precision: Precision) -> str:
    """The mixed graph's file name: ``encoder.onnx`` -> ``encoder.fp16.onnx`` (a folder in front is kept)."""
    stem, dot, suffix = graph_file.rpartition(".")
    if not dot or not stem or suffix != "onnx":
        raise ValueError(f"not an .onnx file name: {graph_file!r}")
    return f"{stem}.{Precision(precision).value}.onnx"


@dataclasses.dataclass(frozen=True)
class MixedPrecisionReport:
    """What :func:`write_mixed_precision` did to one graph."""

    source: Path
    destination: Path
    precision: Precision
    converted_nodes: int
    """Nodes that compute in low precision."""
    converted_op_types: Mapping[str, int]
    kept_fp32_op_types: Mapping[str, int]
    """Nodes on the activation path kept in fp32, by op type."""
    kept_fp32_reasons: Mapping[str, int]
    """The same nodes by reason: ``op`` (:data:`FP32_OPS`), ``layernorm`` (decomposed), ``scope``
    (:data:`FP32_SCOPES`), ``trig-argument``, ``constant-range``, ``unsupported-type``, ``fp32-consumers``
    (:data:`DATA_MOVEMENT_OPS`)."""
    off_path_fp32_nodes: int
    """Float nodes off the activation path (index and shape arithmetic), left in fp32."""
    casts_inserted: int
    initializers_converted: int
    source_bytes: int
    """The source graph's file(s), external data included."""
    destination_bytes: int
    external_data: bool

    def summary(self) -> str:
        kept = ", ".join(f"{op} {count}" for op, count in sorted(self.kept_fp32_op_types.items()))
        return (f"{self.destination.name}: {self.converted_nodes} nodes in {self.precision}, fp32 kept: {kept} "
                f"(+{self.off_path_fp32_nodes} off-path), {self.casts_inserted} casts, "
                f"{self.source_bytes / 2**20:.1f} MiB -> {self.destination_bytes / 2**20:.1f} MiB")


def graph_bytes(path: Path) -> int:
    """Size of a graph file with its external data (``<file>.data`` or whatever its tensors name)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer if tensor.data_location == TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def write_mixed_precision(source: Path, destination: Path, precision: Precision = Precision.FP16
                          ) -> MixedPrecisionReport:
    """Write the mixed-precision graph of the fp32 graph ``source`` (external data beside it is read) to
    ``destination``; with external data ``<destination>.data`` when its initializers exceed
    :data:`EXTERNAL_DATA_THRESHOLD_BYTES`. Written into a scratch folder and moved into place, so an interrupted
    run leaves no half-written graph. The result passes onnx's checker (full type inference)."""
    source, destination = Path(source), Path(destination)
    precision = Precision(precision)
    model = onnx.load(str(source), load_external_data=False)
    load_external_data_for_model(model, str(source.parent))
    model, counts = convert_model(model, precision)
    weights = sum(tensor_bytes(t) for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = destination.name + ".data"
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".mixed-precision-") as scratch:
        written = Path(scratch) / destination.name
        if external:
            onnx.save_model(model, str(written), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.chmod(written.with_name(data_name), 0o644)  # readable by a Triton running as another user
        else:
            onnx.save_model(model, str(written))
        del model
        onnx.checker.check_model(str(written), full_check=True)
        if external:
            os.replace(written.with_name(data_name), destination.with_name(data_name))
        else:
            destination.with_name(data_name).unlink(missing_ok=True)
        os.chmod(written, 0o644)
        os.replace(written, destination)
    report = MixedPrecisionReport(
        source=source, destination=destination, source_bytes=graph_bytes(source),
        destination_bytes=graph_bytes(destination), external_data=external, **counts,
    )
    LOG.info("%s", report.summary())
    return report


def write_mixed_precision_model(model_dir: Path, precision: Precision = Precision.FP16) -> list[Path]:
    """Write the mixed-precision encoder and decoder of an export folder (``encoder.onnx`` and ``decoder.onnx``,
    :data:`samserve.core.model_spec.ENCODER_FILE`, :data:`~samserve.core.model_spec.DECODER_FILE`) beside them, e.g.
    ``encoder.fp16.onnx``; returns their paths."""
    model_dir = Path(model_dir)
    written = []
    for graph_file in (model_spec.ENCODER_FILE, model_spec.DECODER_FILE):
        destination = model_dir / mixed_precision_file(graph_file, precision)
        write_mixed_precision(model_dir / graph_file, destination, precision)
        written.append(destination)
    return written
