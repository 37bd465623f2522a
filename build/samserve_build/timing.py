"""The one timing loop of the project: ``auto``'s calibration (:mod:`samserve_build.cpu_choice`) and every benchmark
(bench/) time calls with it."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               after_each: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls (compilation
    caches, memory arenas). ``after_each`` runs inside the timed span after every call: a device synchronization,
    so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
        if after_each is not None:
            after_each()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if after_each is not None:
            after_each()
        samples.append(time.perf_counter() - start)
    return samples
