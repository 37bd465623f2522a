"""An Interact session's state (samserve.vision.interaction) and its answering loop (samserve.transport.interact)
with a fake decoder the test controls: what is decoded, with which mask_input, what is superseded, in which order.
The stack end to end: tests/integration/test_interact.py; parity with SamPredictor: test_parity.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from samserve.core.errors import DeadlineExceeded, InvalidArgument
from samserve.transport import interact
from samserve.vision import interaction, processing
from samserve.vision.interaction import Action, Event

LOGITS = (4, 4)


def _decoded(prompt: processing.Prompt, tag: float) -> interaction.Decoded[str]:
    """A fake answer whose logits say which decode made them (every value ``tag``, plus the token index)."""
    tokens = [1, 2, 3] if prompt.multimask_output else [0]
    logits = np.stack([np.full(LOGITS, tag + t, np.float32) for t in tokens])
    return interaction.Decoded([f"mask{t}" for t in tokens], np.array([0.5, 0.9, 0.7][: len(tokens)], np.float32),
                               logits, tokens)


def _point(event_id: int, x: float = 1.0) -> Event:
    return Event(event_id, Action.ADD_POINT, point=(x, 2.0, 1))


def test_a_click_is_multimask_and_later_decodes_feed_back_the_shown_logits():
    session: interaction.Session[str] = interaction.Session(max_points=8, max_history=8, num_mask_tokens=4)
    session.apply(_point(1))
    prompt = session.next_decode()
    assert prompt is not None and prompt.multimask_output and prompt.mask_input is None
    session.record(session.current, _decoded(prompt, 10.0))
    assert session.current.shown() == 1  # best predicted IoU: token 2
    session.apply(_point(2, x=5.0))
    prompt = session.next_decode()
    assert prompt is not None and not prompt.multimask_output
    assert prompt.points is not None and prompt.points.tolist() == [[1.0, 2.0], [5.0, 2.0]]
    np.testing.assert_array_equal(prompt.mask_input, np.full(LOGITS, 12.0))  # token 2's plane
    session.record(session.current, _decoded(prompt, 20.0))
    session.apply(Event(3, Action.UNDO))
    assert session.next_decode() is None and len(session.current.points) == 1  # answered from the history
    session.apply(Event(4, Action.CHOOSE_MASK, token=3))
    assert session.current.shown() == 2 and session.next_decode() is None
    session.apply(_point(5, x=7.0))
    prompt = session.next_decode()
    assert prompt is not None
    np.testing.assert_array_equal(prompt.mask_input, np.full(LOGITS, 13.0))  # the chosen token 3's plane


def test_superseded_states_are_skipped_and_a_reset_stops_the_feedback():
    session: interaction.Session[str] = interaction.Session(max_points=8, max_history=8, num_mask_tokens=4)
    session.apply(_point(1))
    session.record(session.current, _decoded(session.next_decode(), 10.0))  # type: ignore[arg-type]
    session.apply(_point(2))
    session.apply(_point(3))  # 2 was never decoded: 3 refines 1's answer
    prompt = session.next_decode()
    assert prompt is not None
    np.testing.assert_array_equal(prompt.mask_input, np.full(LOGITS, 12.0))
    session.apply(Event(4, Action.RESET))
    session.apply(_point(5))
    prompt = session.next_decode()
    assert prompt is not None and prompt.mask_input is None and prompt.multimask_output


def test_take_returns_the_newest_id_and_those_it_supersedes():
    session: interaction.Session[str] = interaction.Session(max_points=8, max_history=8, num_mask_tokens=4)
    assert session.take() is None
    for event_id in (1, 2, 5):
        session.apply(_point(event_id))
    newest, skipped, state, finishing = session.take()  # type: ignore[misc]
    assert (newest, skipped, len(state.points), finishing) == (5, [1, 2], 3, False)
    assert session.take() is None


def test_events_are_checked_and_the_history_is_bounded():
    session: interaction.Session[str] = interaction.Session(max_points=2, max_history=3, num_mask_tokens=4)
    session.apply(_point(1))
    with pytest.raises(InvalidArgument, match="not above") as caught:
        session.apply(_point(1))
    assert caught.value.field == "events[id=1].id"
    session.apply(_point(2))
    with pytest.raises(InvalidArgument, match="SAMSERVE_MAX_POINTS_PER_PROMPT") as caught:
        session.apply(_point(3))
    assert caught.value.field == "events[id=3].add_point"
    with pytest.raises(InvalidArgument, match="several masks"):
        session.apply(Event(4, Action.CHOOSE_MASK, token=1))
    for event_id in range(5, 9):
        session.apply(Event(event_id, Action.SET_BOX, box=(0, 0, event_id, event_id)))
    for event_id in range(9, 20):  # undo stops at the oldest state kept
        session.apply(Event(event_id, Action.UNDO))
    assert len(session.history) == 1 and session.current.box == (0, 0, 5, 5)
    session.apply(Event(20, Action.FINISH))
    with pytest.raises(InvalidArgument, match="after finish"):
        session.apply(_point(21))


async def _run(first: list[Event], during: list[Event]) -> tuple[list[tuple], list[processing.Prompt]]:
    """The responses of :func:`interact.run_session` when ``first`` is sent, then ``during`` arrives while the
    first decode runs (the fake decoder lets the loop run until the session has applied them all)."""
    session: interaction.Session[str] = interaction.Session(max_points=8, max_history=8, num_mask_tokens=4)
    prompts: list[processing.Prompt] = []
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    for event in first:
        queue.put_nowait(event)

    async def decode(prompt: processing.Prompt) -> interaction.Decoded[str]:
        prompts.append(prompt)
        if len(prompts) == 1 and during:
            for event in during:
                queue.put_nowait(event)
            while session.last_event_id < during[-1].id:
                await asyncio.sleep(0)  # a yield to the reader, not a wait for time
        return _decoded(prompt, 10.0 * len(prompts))

    async def requests() -> AsyncIterator[Event]:
        while (event := await queue.get()) is not None:
            yield event

    responses = []
    async for response in interact.run_session(
            session, requests(), lambda event: event, decode,
            lambda event_id, state, now, finished: ("answer", event_id, len(state.points), now, finished),
            lambda ids: ("superseded", ids), idle_timeout_s=5.0):
        responses.append(response)
    return responses, prompts


def test_events_during_a_decode_are_folded_into_one_decode_of_the_newest_state():
    responses, prompts = asyncio.run(_run([_point(1)], [_point(2), _point(3), Event(4, Action.FINISH)]))
    assert responses == [("answer", 1, 1, True, False), ("superseded", [2, 3]), ("answer", 4, 3, True, True)]
    assert [len(p.points) for p in prompts if p.points is not None] == [1, 3]
    assert prompts[1].mask_input is not None  # the first answer's shown logits


def test_a_client_that_closes_its_side_gets_what_is_owed_then_the_end():
    responses, prompts = asyncio.run(_run([_point(1), None], []))  # type: ignore[list-item]
    assert responses == [("answer", 1, 1, True, False)] and len(prompts) == 1


def test_an_idle_session_ends_with_deadline_exceeded():
    async def scenario() -> None:
        session: interaction.Session[str] = interaction.Session(max_points=8, max_history=8, num_mask_tokens=4)

        async def silent() -> AsyncIterator[Event]:
            await asyncio.Event().wait()
            yield _point(1)

        async for _ in interact.run_session(session, silent(), lambda e: e, None,  # type: ignore[arg-type]
                                            lambda *a: a, lambda ids: ids, idle_timeout_s=0.05):
            pass

    with pytest.raises(DeadlineExceeded, match="SAMSERVE_INTERACT_IDLE_TIMEOUT_S"):
        asyncio.run(scenario())
