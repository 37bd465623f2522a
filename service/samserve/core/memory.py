"""Giving memory back: the C allocator's settings for a process whose requests allocate large, short-lived arrays.

glibc's malloc serves a block of up to 32 MiB from its heaps once a block that size was freed (the mmap threshold
rises dynamically), and heap memory mostly stays with the process after it is freed: after one request with large
images the gateway would keep its peak resident for good. A fixed threshold (``M_MMAP_THRESHOLD``) makes every
block of 1 MiB or more (mask planes, logits, decoded images) its own mapping, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

LOG = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 16 << 20


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at 1 MiB and its trim threshold at 16 MiB; False (and nothing changed) where the
    C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        LOG.info("not glibc: allocator left at its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))
