"""What a client needs to decode masks itself: the served model's decoder graph and the embedding layout.

The gateway gives browsers (and any other client) the image embedding it already has, and the decoder ONNX graph
of the exported model, so a hover or click becomes a mask on the client with no round trip (docs/api.md, "Client-side
decoding"). The decoder file comes from ``SAMSERVE_CLIENT_DECODER_DIR``: an exported model folder
(``metadata.json`` + ``decoder.onnx``, what ``samserve-build`` writes). It is given out only while its weights are
the served model's, so a client never pairs one model's embedding with another model's decoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np

from samserve.core import model_spec
from samserve.core.embedding import Embedding

LOG = logging.getLogger(__name__)

EMBEDDING_LAYOUT_VERSION = 1
"""Layout of ``samserve.v1.Embedding``: float16, little-endian, C-order, shape [1, C, h, w]. Bump on any change."""
EMBEDDING_DTYPE = "float16"


def embedding_bytes(embedding: Embedding) -> tuple[list[int], bytes]:
    """(shape [1, C, h, w], float16 little-endian bytes) of an embedding in layout 1. The served embedding already
    went through the cache's float16 form (:meth:`Embedding.round_trip_fp16`), so this conversion is exact."""
    array = np.ascontiguousarray(embedding.array, dtype="<f2")
    return [1, *map(int, array.shape)], array.tobytes()


@dataclasses.dataclass(frozen=True)
class DecoderFile:
    """An exported decoder graph, read once."""

    metadata: model_spec.ModelMetadata
    data: bytes
    sha256: str

    def serves(self, meta: model_spec.ModelMetadata) -> bool:
        """True when this graph belongs to the served model ``meta`` (same weights and preprocessing)."""
        return self.metadata.cache_namespace == meta.cache_namespace


class DecoderFiles:
    """The decoder graph of ``directory`` (None: client-side decoding is off), re-read when its metadata changes
    (a new export in the same folder)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._loaded: DecoderFile | None = None

    def for_model(self, meta: model_spec.ModelMetadata) -> DecoderFile | None:
        """The decoder of the served model ``meta``, or None when none is configured or the folder holds another
        model's export (logged)."""
        if self.directory is None:
            return None
        if self._loaded is None or not self._loaded.serves(meta):
            self._loaded = self._read()
        if self._loaded is None or not self._loaded.serves(meta):
            LOG.warning("SAMSERVE_CLIENT_DECODER_DIR %s does not hold the served model %s: no client-side decoding",
                        self.directory, meta.cache_namespace)
            return None
        return self._loaded

    def _read(self) -> DecoderFile | None:
        assert self.directory is not None
        try:
            metadata = model_spec.ModelMetadata.read(self.directory)
            data = (self.directory / model_spec.DECODER_FILE).read_bytes()
        except (OSError, ValueError) as error:
            LOG.warning("cannot read the client decoder in %s: %s", self.directory, error)
            return None
        return DecoderFile(metadata, data, hashlib.sha256(data).hexdigest())
