"""Bounded polling of an observable condition, instead of sleeping for a guessed time. Each wait either returns
what it observed or fails with an AssertionError saying what it last saw."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout_s: float = 60.0,
               interval_s: float = 0.1) -> T:
    """Call ``probe`` until ``done(value)``; the value. AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout_s} s")
        time.sleep(interval_s)


def wait_until_stable(probe: Callable[[], T], what: str, polls: int = 5, timeout_s: float = 60.0,
                      interval_s: float = 0.2) -> T:
    """Call ``probe`` until it returns the same value ``polls`` times in a row; that value. AssertionError when it
    still changes after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen = [probe()]
    while len(seen) < polls or len(set(seen[-polls:])) > 1:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still changing after {timeout_s} s (last values {seen[-polls:]})")
        time.sleep(interval_s)
        seen.append(probe())
    return seen[-1]


async def wait_until_async(probe: Callable[[], T | Awaitable[T]], done: Callable[[T], bool], what: str,
                           timeout_s: float = 60.0, interval_s: float = 0.01) -> T:
    """:func:`wait_until` inside an event loop (for what runs on the same loop, e.g. an in-process gateway): the
    loop keeps running between polls. ``probe`` may be a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if done(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout_s} s")
        await asyncio.sleep(interval_s)
