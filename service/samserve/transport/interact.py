"""The ``Interact`` stream: a person's events folded into the session's state as they arrive, the newest state
decoded when the decoder is free, the answers sent in event order (:func:`run_session`), and the bounds on
sessions (:class:`SessionSlots`).

Two tasks per session: the reader applies each event to the state (cheap: no model call) and wakes the answerer;
the answerer (the stream's own generator) takes what is owed (:meth:`samserve.vision.interaction.Session.take`),
acknowledges the superseded ids, decodes the newest state when it needs it, and answers. Events that arrive
during a decode are folded while it runs: when it ends, only the newest state is decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from samserve.core import metrics
from samserve.core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from samserve.core.settings import AuthMode, GatewaySettings
from samserve.vision import interaction, processing

DecodeState = Callable[[processing.Prompt], Awaitable[interaction.Decoded[Any]]]
"""One prompt of the session's image -> its decoded answer (the servicer binds the model, encoding and deadline)."""
ParseEvent = Callable[[Any], interaction.Event]
"""One ``InteractRequest`` after the open message -> a validated event (InvalidArgument names the field)."""


class SessionSlots:
    """Sessions open per gateway and per tenant (``SAMSERVE_INTERACT_MAX_SESSIONS``, ``..._PER_TENANT`` with auth
    on)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.max_sessions = settings.interact_max_sessions
        # With auth off every caller is the same tenant: the gateway's limit alone applies.
        self.max_per_tenant = (settings.interact_max_sessions_per_tenant if settings.auth is not AuthMode.OFF
                               else settings.interact_max_sessions)
        self.open = 0
        self.by_tenant: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        """Held for a session's life; RESOURCE_EXHAUSTED naming the limit when none is free."""
        if self.open >= self.max_sessions:
            raise ResourceExhausted(f"{self.open} interactive sessions are open on this gateway, its limit "
                                    "(SAMSERVE_INTERACT_MAX_SESSIONS): retry later, or finish a session",
                                    retry_after_s=1.0, quota="interact_max_sessions")
        if self.by_tenant.get(tenant, 0) >= self.max_per_tenant:
            raise ResourceExhausted(f"tenant {tenant!r} has {self.by_tenant[tenant]} interactive sessions open, its "
                                    "limit (SAMSERVE_INTERACT_MAX_SESSIONS_PER_TENANT): finish one first",
                                    retry_after_s=1.0, quota="interact_max_sessions_per_tenant")
        self.open += 1
        self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + 1
        metrics.INTERACT_SESSIONS.inc()
        try:
            yield
        finally:
            self.open -= 1
            self.by_tenant[tenant] -= 1
            if not self.by_tenant[tenant]:
                del self.by_tenant[tenant]
            metrics.INTERACT_SESSIONS.dec()


async def next_message(requests: AsyncIterator[Any], idle_timeout_s: float) -> Any | None:
    """The client's next message; None when it closed its side; DEADLINE_EXCEEDED after ``idle_timeout_s``."""
    try:
        return await asyncio.wait_for(anext(requests), idle_timeout_s)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise DeadlineExceeded(f"no event for {idle_timeout_s:g} s (SAMSERVE_INTERACT_IDLE_TIMEOUT_S): the session "
                               "is closed; open a new one") from None


async def run_session(
    session: interaction.Session[Any], requests: AsyncIterator[Any], parse: ParseEvent, decode: DecodeState,
    answer: Callable[[int, interaction.State[Any], bool, bool], Any], superseded: Callable[[list[int]], Any],
    idle_timeout_s: float,
) -> AsyncIterator[Any]:
    """The session's responses, in event order, until the client finishes (its answer is the last) or closes
    its side (the state owed is answered first). ``answer(event_id, state, decoded_now, finished)`` and
    ``superseded(ids)`` make the response messages. Errors of the reader (a bad event, the idle timeout) end
    the session by raising here."""
    wake = asyncio.Event()
    received: dict[int, float] = {}

    async def read() -> None:
        try:
            while not session.finishing:
                message = await next_message(requests, idle_timeout_s)
                if message is None:
                    return
                event = parse(message)
                session.apply(event)
                received[event.id] = time.perf_counter()
                wake.set()
        finally:
            wake.set()

    reader = asyncio.create_task(read(), name="interact-reader")
    try:
        while True:
            await wake.wait()
            wake.clear()
            owed = session.take()
            if owed is None:
                if reader.done():
                    reader.result()  # raises the reader's error
                    return
                continue
            newest, skipped, state, finishing = owed
            if skipped:
                metrics.INTERACT_EVENTS.labels("superseded").inc(len(skipped))
                for event_id in skipped:
                    received.pop(event_id, None)
                yield superseded(skipped)
            prompt = session.next_decode()
            if prompt is not None:
                state = session.record(state, await decode(prompt))
            outcome = "decoded" if prompt is not None else "history"
            metrics.INTERACT_EVENTS.labels(outcome).inc()
            metrics.INTERACT_EVENT_SECONDS.labels(outcome).observe(time.perf_counter() - received.pop(newest))
            yield answer(newest, state, prompt is not None, finishing)
            if finishing:
                return
            if reader.done():
                wake.set()  # answer what is owed, then end
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


def check_open(message: Any) -> Any:
    """The open message of a session's first request; INVALID_ARGUMENT otherwise."""
    if message is None or message.WhichOneof("kind") != "open":
        raise InvalidArgument("the first message of an Interact session must be `open` (the image), and only the "
                              "first", field="open")
    return message.open
