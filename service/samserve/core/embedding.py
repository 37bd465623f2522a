"""The two forms of an image embedding: the value (:class:`Embedding`) and the value staged for decoder calls
(:class:`EmbeddedImage`). Every module that handles an embedding uses these two types.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CropBox = tuple[int, int, int, int]
"""XYXY integer pixels of the original image."""


@dataclasses.dataclass(frozen=True)
class Embedding:
    """An image embedding and the sizes needed to post-process masks for it."""

    array: np.ndarray
    """C x h x w: float32 from the encoder, float16 as tier 2 stores it, the decoder's input dtype once staged."""
    original_size: tuple[int, int]
    """(H, W) of the original image (or crop), EXIF orientation applied."""
    input_size: tuple[int, int]
    """(h, w) of the resized image inside the encoder's S x S input."""

    def round_trip_fp16(self) -> Embedding:
        """This embedding exactly as tier 2 stores it (float16), back in float32: what every replica serves."""
        return dataclasses.replace(self, array=self.array.astype(np.float16).astype(np.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Staged:
    """Where an embedding transport put an embedding for the decoder (see :mod:`samserve.triton.transports`)."""

    region: str | None = None
    """Name of the Triton shared-memory region holding it; None when it travels inside each request."""
    handle: Any = None
    """The transport's handle of that region."""
    shared_bytes: int = 0
    """Bytes of shared memory it occupies (a second copy next to process memory)."""


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddedImage:
    """An embedding ready for decoder calls: what segmentation and segment-everything take."""

    embedding: Embedding
    """Its ``array`` is C x h x w in the served decoder's input dtype, C-contiguous."""
    staged: Staged

    @property
    def original_size(self) -> tuple[int, int]:
        return self.embedding.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self.embedding.input_size

    @property
    def nbytes(self) -> int:
        """Memory it holds: the array in process memory plus its shared-memory copy, if any."""
        return int(self.embedding.array.nbytes) + self.staged.shared_bytes
