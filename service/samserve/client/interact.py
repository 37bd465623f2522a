"""The client side of an ``Interact`` session (:meth:`samserve.client.typed_client.SamServeClient.interact`): send
events as a person makes them, read the answers in event order.

    with client.interact(image_bytes) as session:
        session.add_point(500, 375)                  # returns the event id
        answer = session.answer()                    # the newest state's masks; superseded ids in session.superseded
        best = answer.masks.masks[answer.chosen]     # H x W bool
        session.add_point(620, 410, foreground=False)
        session.finish()
        final = session.answer()

Sending never waits for an answer: events sent while a decode runs are folded into one state by the gateway, and
their ids come back in :attr:`InteractSession.superseded`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from typing import Any

from samserve.client.masks import Masks, masks_from_proto
from samserve.core.api import pb

_LABELS = {True: pb.POINT_LABEL_FOREGROUND, False: pb.POINT_LABEL_BACKGROUND}


@dataclasses.dataclass(frozen=True)
class InteractAnswer:
    """One state's answer."""

    event_id: int
    masks: Masks
    """The state's masks in mask-token order (3 for a single click, else 1; none after reset)."""
    chosen: int
    """Index in ``masks`` of the mask shown."""
    decoded: bool
    points: int
    finished: bool


class InteractSession:
    """One open session; thread-safe sends, answers read by one thread. Errors raise ``grpc.RpcError`` (from
    :meth:`answer`) with the API's status codes."""

    def __init__(self, stub: Any, open_request: pb.InteractOpen, timeout_s: float | None,
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self._outbox: queue.SimpleQueue[pb.InteractRequest | None] = queue.SimpleQueue()
        self._outbox.put(pb.InteractRequest(open=open_request))
        self._lock = threading.Lock()
        self._next_id = 1
        self._call = stub.Interact(iter(self._outbox.get, None), timeout=timeout_s, metadata=metadata)
        self._responses: Iterator[pb.InteractResponse] = iter(self._call)
        self.superseded: list[int] = []
        """Ids the gateway folded into a later state, in the order it acknowledged them."""
        self.opened: pb.InteractOpened = self._next().opened

    def _next(self) -> pb.InteractResponse:
        return next(self._responses)

    def send(self, **action: Any) -> int:
        """Send one event (``add_point=pb.Point(...)``, ``undo=pb.InteractEvent.Undo()``, ...); its id."""
        with self._lock:
            event_id, self._next_id = self._next_id, self._next_id + 1
            self._outbox.put(pb.InteractRequest(event=pb.InteractEvent(id=event_id, **action)))
        return event_id

    def add_point(self, x: float, y: float, foreground: bool = True) -> int:
        return self.send(add_point=pb.Point(x=x, y=y, label=_LABELS[foreground]))

    def set_box(self, x0: float, y0: float, x1: float, y1: float) -> int:
        return self.send(set_box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))

    def undo(self) -> int:
        return self.send(undo=pb.InteractEvent.Undo())

    def reset(self) -> int:
        return self.send(reset=pb.InteractEvent.Reset())

    def choose_mask(self, token: int) -> int:
        """Show the multimask answer of ``token`` (1..3) instead of the best-scored one."""
        return self.send(choose_mask=token)

    def finish(self) -> int:
        return self.send(finish=pb.InteractEvent.Finish())

    def answer(self) -> InteractAnswer:
        """The next answer (blocking); superseded acknowledgements met on the way go to :attr:`superseded`."""
        while True:
            response = self._next()
            if response.WhichOneof("kind") == "superseded":
                self.superseded.extend(response.superseded.event_ids)
                continue
            message = response.answer
            masks = masks_from_proto(pb.PromptResult(masks=message.masks), self.opened.height, self.opened.width)
            return InteractAnswer(message.event_id, masks, message.chosen, message.decoded, message.points,
                                  message.finished)

    def close(self) -> None:
        """End the session: the gateway answers what is owed; call :meth:`answer` first to read it."""
        self._outbox.put(None)
        self._call.cancel()

    def __enter__(self) -> InteractSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
