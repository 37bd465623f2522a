"""The contract between exporter, Triton models and gateway: tensor names, layouts and model metadata.

Every tensor name used anywhere in the project is defined here once. The ONNX exporter names graph inputs and
outputs with these, the Triton configs (``model_repository/``) declare them, the python-backend models read them
and the gateway sends them. A later TensorRT target keeps the same names.

Sizes are never constants: they come from :class:`ModelMetadata`, written by the exporter beside the graphs and
embedded into each Triton model config as the parameter :data:`METADATA_PARAMETER`, so that any model of the SAM
architecture (ViT-H/L/B at 1024 px, a tiny test model at 256 px, ...) serves through the same code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ENCODER_MODEL = "sam_encoder"
DECODER_MODEL = "sam_decoder"

# Encoder inputs/outputs. Triton batch dimension B = images.
ENC_IMAGE = "image"
"""uint8, B x S x S x 3 (NHWC, RGB): the image resized so its longest side is S, top-left aligned, padded with
zeros at the bottom and right. Pixel normalization happens inside the graph."""
ENC_INPUT_SIZE = "input_size"
"""int64, B x 2: (height, width) of the resized image before padding. The graph normalizes those pixels and sets
the padding to 0 *after* normalization, exactly as the official ``Sam.preprocess`` does."""
ENC_EMBEDDING = "image_embeddings"
"""float32, B x C x h x w: the image embedding (C=256, h=w=S/16 for the released models)."""

# Decoder inputs/outputs. In the ONNX graph: one image embedding and N prompts of P points each.
# In Triton (max_batch_size > 0) every tensor gains a leading batch axis B = images, so a request carries
# B x [one embedding + N prompts].
DEC_EMBEDDING = "image_embeddings"
"""float32 (or float16 on the wire), 1 x C x h x w in the graph."""
DEC_POINT_COORDS = "point_coords"
"""float32, N x P x 2: (x, y) in resized-image pixels (original coordinates times the resize scale). Boxes are
two corner points (x0, y0) and (x1, y1) with labels 2 and 3; padding points have label -1."""
DEC_POINT_LABELS = "point_labels"
"""float32, N x P: 1 foreground, 0 background, 2 box top-left, 3 box bottom-right, -1 padding."""
DEC_MASK_INPUT = "mask_input"
"""float32, N x 1 x 4h x 4w: low-res mask logits from an earlier answer (zeros when unused)."""
DEC_HAS_MASK_INPUT = "has_mask_input"
"""float32, N: 1.0 where ``mask_input`` is used for that prompt, 0.0 otherwise."""
DEC_LOW_RES_MASKS = "low_res_masks"
"""float32, N x M x 4h x 4w: mask logits of all M=4 mask tokens (token 0: single-mask output; 1..3: multimask)."""
DEC_IOU_PREDICTIONS = "iou_predictions"
"""float32, N x M: predicted IoU of each of the M mask tokens."""

ENCODER_INPUTS = (ENC_IMAGE, ENC_INPUT_SIZE)
ENCODER_OUTPUTS = (ENC_EMBEDDING,)
DECODER_INPUTS = (DEC_EMBEDDING, DEC_POINT_COORDS, DEC_POINT_LABELS, DEC_MASK_INPUT, DEC_HAS_MASK_INPUT)
DECODER_OUTPUTS = (DEC_LOW_RES_MASKS, DEC_IOU_PREDICTIONS)
NO_MASK_DECODER_INPUTS = (DEC_EMBEDDING, DEC_POINT_COORDS, DEC_POINT_LABELS)
"""Inputs of the no-mask decoder graph (:data:`DECODER_NO_MASK_FILE`): the decoder's without ``mask_input`` and
``has_mask_input`` (every prompt has none); its outputs are :data:`DECODER_OUTPUTS`."""

# Point labels (SAM's convention).
LABEL_PADDING = -1
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3

PREPROCESSING_VERSION = 1
"""Bump whenever resize, padding, normalization or coordinate handling changes: embeddings made by another
preprocessing version must never be served (it is part of the embedding cache key)."""

METADATA_SCHEMA_VERSION = 1
"""Major version of the metadata format. A gateway refuses metadata of a higher major version (its meaning
changed); fields it does not know within its version are ignored (a newer exporter may add some)."""

METADATA_FILE = "metadata.json"
METADATA_PARAMETER = "samserve_metadata"
"""Name of the Triton model-config parameter holding :class:`ModelMetadata` as JSON."""
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DECODER_NO_MASK_FILE = "decoder.nomask.onnx"
"""File names of the exported ONNX graphs (the exporter's output; which file a serving target loads is the
target's business, see ``samserve_build.targets``). The no-mask decoder serves runs in which no prompt has a mask
input: it does the image-side work of the first transformer layer once per image instead of once per prompt."""
CHECKPOINT_FILE = "sam.pth"
"""Name of the Meta-format checkpoint in the version folder of targets that run the PyTorch modules (gpu-torch)."""

PRECISION_PARAMETER = "precision"
"""Model-config parameter: the precision the model computes in (one of :data:`PRECISIONS`)."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""Precisions a gateway of this version serves. Embeddings of different precisions never share a cache entry."""
ENGINE_PARAMETER_PREFIX = "samserve_engine_cc"
"""Model-config parameters ``samserve_engine_cc<major><minor>``: one :class:`EngineRecord` (JSON) per TensorRT plan,
appended by the engine build (``samserve-build tensorrt``) beside the plan it built."""


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    """Where and with what a TensorRT plan was built (plans run only on that GPU architecture and TensorRT)."""

    plan: str
    """File name of the plan in the version folder (the config's ``cc_model_filenames`` entry)."""
    compute_capability: str
    """``major.minor`` of the GPU it was built on, e.g. ``9.0`` (H100, H200)."""
    gpu_name: str
    """As ``nvidia-smi`` names it, e.g. ``NVIDIA H100 80GB HBM3``."""
    tensorrt_version: str
    """TensorRT's version as ``trtexec`` reports it, e.g. ``10.7.0``."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineRecord:
        raw = json.loads(text)
        return cls(**{field.name: str(raw[field.name]) for field in dataclasses.fields(cls)})

    @property
    def parameter(self) -> str:
        """The config parameter that holds this record."""
        return ENGINE_PARAMETER_PREFIX + self.compute_capability.replace(".", "")


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """What the gateway needs to know about an exported model; everything size-related comes from here."""

    model_id: str
    """Human-readable identifier, e.g. ``vit_b`` or ``tiny-random-seed0``."""
    variant: str
    """Architecture name in the exporter's registry (``vit_h``, ``vit_l``, ``vit_b``, ``tiny``, or ``custom``)."""
    weights_sha256: str
    """SHA-256 of the checkpoint file (state dict) the graphs were exported from."""
    image_size: int
    """S: the encoder's square input side (1024 for Meta's models)."""
    embedding_shape: tuple[int, int, int]
    """C x h x w of one image embedding."""
    low_res_mask_size: tuple[int, int]
    """4h x 4w: size of the decoder's mask logits and of ``mask_input``."""
    num_mask_tokens: int
    """M: masks the decoder emits per prompt (4 for SAM: 1 single + 3 multimask)."""
    mask_threshold: float
    """Logit threshold that binarizes masks (0.0 for SAM)."""
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    preprocessing_version: int
    exporter_version: str
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The architecture hyper-parameters, for the record."""
    schema_version: int = METADATA_SCHEMA_VERSION
    """:data:`METADATA_SCHEMA_VERSION` of the exporter that wrote it (absent in older exports: 1)."""
    precision: str = "fp32"
    """What the served encoder computes in (:data:`PRECISIONS`): the exporter writes fp32, ``samserve-build
    repository`` the serving target's (its configs' ``precision`` parameter)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        raw = json.loads(text)
        version = int(raw.get("schema_version", 1))
        if version > METADATA_SCHEMA_VERSION:
            raise ValueError(f"model metadata schema version {version} is newer than this gateway's "
                             f"{METADATA_SCHEMA_VERSION}: upgrade the gateway")
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {name: value for name, value in raw.items() if name in known}  # a newer exporter's extra fields
        raw["embedding_shape"] = tuple(raw["embedding_shape"])
        raw["low_res_mask_size"] = tuple(raw["low_res_mask_size"])
        raw["pixel_mean"] = tuple(raw["pixel_mean"])
        raw["pixel_std"] = tuple(raw["pixel_std"])
        return cls(**raw)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / METADATA_FILE
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> ModelMetadata:
        return cls.from_json((Path(directory) / METADATA_FILE).read_text())

    @property
    def cache_namespace(self) -> str:
        """Everything an embedding depends on except the image: model, weights, preprocessing, and the precision
        when it is not fp32 (replicas serving fp32 and bf16 share a Redis without mixing their embeddings)."""
        suffix = "" if self.precision == "fp32" else f":{self.precision}"
        return f"{self.model_id}:{self.weights_sha256}:pp{self.preprocessing_version}{suffix}"

    def unservable_reason(self) -> str | None:
        """Why a gateway of this version cannot serve this metadata, or None."""
        if self.precision not in PRECISIONS:
            return f"model precision {self.precision!r} is none of {PRECISIONS}: upgrade the gateway"
        return None
