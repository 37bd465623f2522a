"""An interactive session's state: the clicks, box and choices a person made on one image, with an undo history,
and what the next decode of that state is (the ``Interact`` RPC, :mod:`samserve.transport.interact`, drives it).

SAM's interactive rule (the paper's training loop, and ``SamPredictor``'s notebook use):

* a single click, with no box, is ambiguous: it is decoded with the multimask output (3 masks), and the one shown
  is the best predicted IoU unless the person chose another;
* any other state (several clicks, or a box) is decoded with the single-mask output;
* each decode feeds the low-res logits of the previous answer's shown mask back as ``mask_input``: the nearest
  earlier state in the history that was decoded (states folded into a later one before their decode, superseded,
  are skipped; an empty state, after a reset, means no mask).

Nothing here calls the model: :meth:`Session.next_decode` says what to decode, :meth:`Session.record` keeps what it
gave.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Generic, TypeVar

import numpy as np

from samserve.core.errors import InvalidArgument
from samserve.vision import processing

M = TypeVar("M")


class Action(enum.Enum):
    """What an event does to the state."""

    ADD_POINT = "add_point"
    SET_BOX = "set_box"
    UNDO = "undo"
    RESET = "reset"
    CHOOSE_MASK = "choose_mask"
    FINISH = "finish"


@dataclasses.dataclass(frozen=True)
class Event:
    """One validated event, in original-image pixels."""

    id: int
    action: Action
    point: tuple[float, float, int] | None = None
    """ADD_POINT: x, y and the model's label (:data:`samserve.core.model_spec.LABEL_FOREGROUND` or background)."""
    box: tuple[float, float, float, float] | None = None
    """SET_BOX: XYXY."""
    token: int | None = None
    """CHOOSE_MASK: the multimask token, 1 .. M - 1."""

    @property
    def field(self) -> str:
        """The request field an error about this event names."""
        return f"events[id={self.id}].{self.action.value}"


@dataclasses.dataclass(frozen=True)
class Decoded(Generic[M]):
    """What one decode of a state gave."""

    masks: list[M]
    """The masks as the session's encoding made them, in mask-token order (empty for an empty state)."""
    iou_predictions: np.ndarray
    """float32, K."""
    low_res_logits: np.ndarray
    """float32, K x 4h x 4w: the shown mask's plane feeds the next decode."""
    token_indices: list[int]


@dataclasses.dataclass(frozen=True)
class State(Generic[M]):
    """The prompt a person has built so far, and its answer once decoded. Immutable: each event makes a new one."""

    points: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None
    chosen_token: int | None = None
    """The multimask token the person chose (None: show the best predicted IoU)."""
    decoded: Decoded[M] | None = None

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    @property
    def multimask(self) -> bool:
        """A single click with no box: SAM's ambiguous prompt, answered with the multimask output."""
        return len(self.points) == 1 and self.box is None

    def shown(self) -> int:
        """Index in the decoded masks of the mask shown (decoded, non-empty states only)."""
        assert self.decoded is not None and self.decoded.masks
        if self.chosen_token is not None:
            return self.decoded.token_indices.index(self.chosen_token)
        return int(np.argmax(self.decoded.iou_predictions))


class Session(Generic[M]):
    """The state history of one session: at most ``max_history`` states (undo stops at the oldest kept), the ids
    of events applied since the last answer, and whether the person finished."""

    def __init__(self, max_points: int, max_history: int, num_mask_tokens: int) -> None:
        self.max_points = max_points
        self.num_mask_tokens = num_mask_tokens
        self.history: collections.deque[State[M]] = collections.deque([State()], maxlen=max_history + 1)
        self.last_event_id = 0
        self.unanswered: list[int] = []
        """Ids of the events applied since the last answer, oldest first."""
        self.finishing = False

    @property
    def current(self) -> State[M]:
        return self.history[-1]

    def apply(self, event: Event) -> None:
        """Fold ``event`` into the state (no decode here). InvalidArgument names the event: an id not above the
        last one, a point too many, a choice with no multimask answer, an event after finish."""
        if event.id <= self.last_event_id:
            raise InvalidArgument(f"event id {event.id} is not above the previous one ({self.last_event_id}): ids "
                                  "must increase", field=f"events[id={event.id}].id")
        if self.finishing:
            raise InvalidArgument("an event after finish", field=event.field)
        current = self.current
        if event.action is Action.ADD_POINT:
            assert event.point is not None
            if len(current.points) >= self.max_points:
                raise InvalidArgument(f"the state already holds {len(current.points)} points, the limit "
                                      "(SAMSERVE_MAX_POINTS_PER_PROMPT): undo or reset first", field=event.field)
            self.history.append(State(points=(*current.points, event.point), box=current.box))
        elif event.action is Action.SET_BOX:
            self.history.append(State(points=current.points, box=event.box))
        elif event.action is Action.UNDO:
            if len(self.history) > 1:
                self.history.pop()
        elif event.action is Action.RESET:
            if not current.empty:
                self.history.append(State())
        elif event.action is Action.CHOOSE_MASK:
            if not current.multimask:
                raise InvalidArgument("choose_mask needs a state with several masks (a single click, no box)",
                                      field=event.field)
            if event.token is None or not 1 <= event.token < self.num_mask_tokens:
                raise InvalidArgument(f"choose_mask must be a multimask token, 1 to {self.num_mask_tokens - 1}",
                                      field=event.field)
            self.history.append(dataclasses.replace(current, chosen_token=event.token))
        else:  # FINISH
            self.finishing = True
        self.last_event_id = event.id
        self.unanswered.append(event.id)

    def feedback(self) -> np.ndarray | None:
        """The ``mask_input`` of the current state's decode: the shown logits of the nearest earlier decoded
        state (None when an empty state, or the start of the history, comes first)."""
        for state in reversed(list(self.history)[:-1]):
            if state.empty:
                return None
            if state.decoded is not None:
                return state.decoded.low_res_logits[state.shown()]
        return None

    def next_decode(self) -> processing.Prompt | None:
        """The prompt the current state needs decoded; None when it has its answer already (or is empty)."""
        state = self.current
        if state.decoded is not None or state.empty:
            return None
        points = np.array([p[:2] for p in state.points], dtype=np.float64) if state.points else None
        labels = np.array([p[2] for p in state.points], dtype=np.float64) if state.points else None
        box = np.array(state.box, dtype=np.float64) if state.box is not None else None
        return processing.Prompt(points=points, labels=labels, box=box, mask_input=self.feedback(),
                                 multimask_output=state.multimask)

    def record(self, state: State[M], decoded: Decoded[M]) -> State[M]:
        """``state`` (the current state when its decode started) with its answer, kept in the history when it is
        still there (events applied meanwhile may have undone it)."""
        answered = dataclasses.replace(state, decoded=decoded)
        for k, kept in enumerate(self.history):
            if kept is state:
                self.history[k] = answered
        return answered

    def take(self) -> tuple[int, list[int], State[M], bool] | None:
        """What is owed now: the newest unanswered event id, the ids it supersedes (applied since the last answer,
        never answered alone), the current state and whether the session is finishing; None when every event has
        its answer. They count as answered from here."""
        if not self.unanswered:
            return None
        *skipped, newest = self.unanswered
        self.unanswered = []
        return newest, skipped, self.current, self.finishing
