"""The embedding's tier-2 record: fp16 with its sizes and a checksum (:class:`EmbeddingCodec`), shared by every
replica, so all of them answer identically."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from samserve.core.embedding import Embedding


class CorruptRecord(ValueError):
    """A tier-2 record that fails its version, length or checksum check."""


class EmbeddingCodec:
    """``magic "SAME" | version u8 | dtype u8 | C,h,w u16 | H,W,h_in,w_in u32 | fp16 payload | crc32 u32``.

    Little-endian; the CRC-32 covers everything before it.
    """

    MAGIC = b"SAME"
    VERSION = 1
    FLOAT16 = 1
    HEADER = struct.Struct("<4sBBHHHIIII")
    TRAILER = struct.Struct("<I")

    @classmethod
    def encode(cls, embedding: Embedding) -> bytes:
        channels, height, width = embedding.array.shape
        header = cls.HEADER.pack(cls.MAGIC, cls.VERSION, cls.FLOAT16, channels, height, width,
                                 *embedding.original_size, *embedding.input_size)
        body = header + np.ascontiguousarray(embedding.array, dtype="<f2").tobytes()
        return body + cls.TRAILER.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, record: bytes) -> Embedding:
        if len(record) < cls.HEADER.size + cls.TRAILER.size:
            raise CorruptRecord(f"record of {len(record)} bytes is too short")
        body, (crc,) = record[: -cls.TRAILER.size], cls.TRAILER.unpack(record[-cls.TRAILER.size :])
        if zlib.crc32(body) != crc:
            raise CorruptRecord("checksum mismatch")
        magic, version, dtype, channels, height, width, oh, ow, ih, iw = cls.HEADER.unpack_from(body)
        if magic != cls.MAGIC or version != cls.VERSION or dtype != cls.FLOAT16:
            raise CorruptRecord(f"unknown record (magic {magic!r}, version {version}, dtype {dtype})")
        payload = body[cls.HEADER.size :]
        if len(payload) != channels * height * width * 2:
            raise CorruptRecord("payload length does not match its shape")
        array = np.frombuffer(payload, dtype="<f2").reshape(channels, height, width)
        return Embedding(array=array, original_size=(oh, ow), input_size=(ih, iw))
