"""The Interact session stream through a real gateway process, a real Triton and real gRPC / WebSocket
connections: answers in event order, a burst folded into one decode, undo / reset / choices answered from the
history, errors naming the event, the bounds (sessions per tenant, points, idle timeout), auth and the decoder
prompt quota, the metrics. Parity of the mask_input feedback with SamPredictor: tests/integration/test_parity.py."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import websocket
from google.rpc import error_details_pb2, status_pb2

from samserve.client.interact import InteractAnswer, InteractSession
from samserve.client.typed_client import SamServeClient
from samserve.core.api import pb, pb_grpc
from samserve.core.settings import ClientSettings
from samserve.security.tls import client_channel
from samserve.transport.status import STATUS_DETAILS_HEADER
from samserve_dev.images import new_image
from samserve_dev.metrics import sample, scrape
from samserve_dev.polling import wait_until
from samserve_dev.served_models import ServedModel

SAMSERVE = str(Path(__file__).parents[2] / ".venv" / "bin" / "samserve")
MAX_POINTS = 3


@pytest.fixture(scope="module")
def bounded(module_gateway_factory, tiny_triton: ServedModel):
    """A gateway with small session bounds (auth off: the per-tenant limit does not apply)."""
    return module_gateway_factory(tiny_triton.url, None, interact_max_sessions=2,
                                  interact_max_sessions_per_tenant=1, interact_idle_timeout_s=3,
                                  max_points_per_prompt=MAX_POINTS)


@pytest.fixture
def client(bounded):
    with SamServeClient(bounded.target, timeout_s=60) as made:
        yield made


def _answers_until_finished(session: InteractSession) -> list[InteractAnswer]:
    answers = [session.answer()]
    while not answers[-1].finished:
        answers.append(session.answer())
    return answers


def _field_violation(error: grpc.RpcError) -> str:
    status = status_pb2.Status.FromString(dict(error.trailing_metadata())[STATUS_DETAILS_HEADER])
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in status.details), status
    return bad.field_violations[0].field


def test_a_click_is_answered_with_the_multimask_masks_and_the_best_shown(client):
    with client.interact(new_image(), timeout_s=60) as session:
        assert session.opened.width == 160 and session.opened.height == 120 and not session.opened.cached
        event = session.add_point(80, 60)
        answer = session.answer()
        assert answer.event_id == event and answer.decoded and answer.points == 1
        assert answer.masks.token_index == [1, 2, 3]
        assert answer.chosen == int(np.argmax(answer.masks.predicted_iou))
        assert answer.masks.masks.shape == (3, 120, 160)
        session.add_point(40, 30, foreground=False)
        second = session.answer()
        assert second.masks.token_index == [0] and second.chosen == 0 and second.decoded
        session.finish()
        final = session.answer()
        assert final.finished and not final.decoded  # finish adds nothing to decode
        assert np.array_equal(final.masks.masks, second.masks.masks)


def test_a_burst_is_folded_into_the_newest_state_and_every_id_is_acknowledged_in_order(client):
    """Events sent at once, before any answer: the gateway decodes what is newest when its decoder is free; the
    ids it skipped come back as superseded, before the answer that includes them."""
    with client.interact(new_image(), timeout_s=60) as session:
        sent = [session.add_point(20, 20), session.add_point(60, 40), session.add_point(100, 80, foreground=False),
                session.set_box(10, 10, 120, 100), session.finish()]
        answers = _answers_until_finished(session)
    answered = [a.event_id for a in answers]
    assert answered == sorted(answered) and answered[-1] == sent[-1]
    assert sorted(answered + session.superseded) == sent  # each id exactly once
    assert session.superseded, "five events sent at once were all decoded one by one: nothing was folded"
    assert answers[-1].points == 3 and answers[-1].masks.token_index == [0]
    assert len(answers) < len(sent)


def test_undo_reset_and_choices_are_answered_from_the_history(client):
    with client.interact(new_image(), timeout_s=60) as session:
        session.add_point(80, 60)
        first = session.answer()
        other = next(k for k in range(3) if k != first.chosen)
        session.choose_mask(first.masks.token_index[other])
        chosen = session.answer()
        assert not chosen.decoded and chosen.chosen == other
        assert np.array_equal(chosen.masks.masks, first.masks.masks)
        session.add_point(30, 90, foreground=False)
        assert session.answer().decoded
        session.undo()
        undone = session.answer()
        assert not undone.decoded and undone.chosen == other and undone.points == 1
        assert np.array_equal(undone.masks.masks, first.masks.masks)
        session.reset()
        reset = session.answer()
        assert reset.points == 0 and reset.masks.masks.shape[0] == 0
        session.undo()
        back = session.answer()
        assert back.points == 1 and not back.decoded and back.chosen == other


@pytest.mark.parametrize("events, field", [
    ([{"add_point": pb.Point(x=500, y=10, label=pb.POINT_LABEL_FOREGROUND)}], "events[id=1].add_point"),
    ([{"add_point": pb.Point(x=5, y=10)}], "events[id=1].add_point.label"),
    ([{"set_box": pb.Box(x0=50, y0=10, x1=20, y1=30)}], "events[id=1].set_box"),
    ([{"add_point": pb.Point(x=5 * k, y=10, label=pb.POINT_LABEL_FOREGROUND)} for k in range(MAX_POINTS + 1)],
     f"events[id={MAX_POINTS + 1}].add_point"),
    ([{"set_box": pb.Box(x0=1, y0=1, x1=20, y1=30)}, {"choose_mask": 2}], "events[id=2].choose_mask"),
    ([{"add_point": pb.Point(x=5, y=10, label=pb.POINT_LABEL_FOREGROUND)}, {"choose_mask": 4}],
     "events[id=2].choose_mask"),
], ids=["outside", "label", "box", "points", "choose-no-multimask", "choose-token"])
def test_a_bad_event_ends_the_session_naming_it(client, events, field):
    with client.interact(new_image(), timeout_s=60) as session:
        for action in events:
            session.send(**action)
        with pytest.raises(grpc.RpcError) as caught:
            _answers_until_finished(session)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_violation(caught.value) == field


def test_a_session_starts_with_open_and_ids_increase(bounded):
    with client_channel(bounded.target) as channel:
        stub = pb_grpc.SegmentAnythingStub(channel)
        event = pb.InteractRequest(event=pb.InteractEvent(id=1, undo=pb.InteractEvent.Undo()))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Interact(iter([event]), timeout=60))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_violation(caught.value) == "open"
        opening = pb.InteractRequest(open=pb.InteractOpen(image_bytes=new_image()))
        again = pb.InteractRequest(event=pb.InteractEvent(id=1, reset=pb.InteractEvent.Reset()))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Interact(iter([opening, event, again]), timeout=60))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field_violation(caught.value) == "events[id=1].id"


def test_sessions_are_bounded_per_gateway_and_an_idle_one_ends(client, bounded):
    open_sessions = lambda: sample(scrape(bounded.metrics_url), "samserve_interact_sessions")  # noqa: E731
    wait_until(open_sessions, lambda n: n == 0, "the earlier tests' sessions released")
    image = new_image()
    first = client.interact(image, timeout_s=60)
    second = client.interact(image, timeout_s=60)
    with pytest.raises(grpc.RpcError) as caught:
        client.interact(image, timeout_s=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "(SAMSERVE_INTERACT_MAX_SESSIONS)" in caught.value.details()
    assert open_sessions() == 2
    first.finish()
    assert first.answer().finished
    first.close()
    # `second` sends nothing: the gateway ends it after the idle timeout, and its slot is free again.
    with pytest.raises(grpc.RpcError) as caught:
        second.answer()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "SAMSERVE_INTERACT_IDLE_TIMEOUT_S" in caught.value.details()
    wait_until(open_sessions, lambda n: n == 0, "both sessions released")
    with client.interact(image, timeout_s=60) as third:
        third.add_point(10, 10)
        assert third.answer().decoded
    samples = scrape(bounded.metrics_url)
    assert sample(samples, "samserve_rpc_requests_total", method="Interact", code="RESOURCE_EXHAUSTED") >= 1
    assert sample(samples, "samserve_rpc_requests_total", method="Interact", code="DEADLINE_EXCEEDED") >= 1
    assert sample(samples, "samserve_interact_events_total", outcome="decoded") >= 1


def _close_code(socket: websocket.WebSocket) -> int:
    """The code of the close frame the server sends next."""
    opcode, frame = socket.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE, opcode
    return int.from_bytes(frame[:2], "big")


def test_the_websocket_speaks_the_same_session_in_json(bounded):
    socket = websocket.create_connection(f"ws://127.0.0.1:{bounded.http_port}/v1/interact", timeout=60,
                                         header=["x-request-id: ws-session-1"])
    try:
        socket.send(json.dumps({"open": {"imageBytes": base64.b64encode(new_image()).decode(),
                                         "maskEncoding": "MASK_ENCODING_POLYGON"}}))
        opened = json.loads(socket.recv())["opened"]
        assert opened["width"] == 160 and opened["height"] == 120
        socket.send(json.dumps({"event": {"id": "1", "addPoint": {"x": 80, "y": 60,
                                                                   "label": "POINT_LABEL_FOREGROUND"}}}))
        answer = json.loads(socket.recv())["answer"]
        assert answer["eventId"] == "1" and len(answer["masks"]) == 3 and answer["decoded"]
        assert all("polygons" in mask for mask in answer["masks"])
        socket.send(json.dumps({"event": {"id": "2", "finish": {}}}))
        assert json.loads(socket.recv())["answer"]["finished"]
        assert _close_code(socket) == 1000
        # A bad event: one last frame with the status (as the HTTP routes' error bodies), then close 1008.
        socket = websocket.create_connection(f"ws://127.0.0.1:{bounded.http_port}/v1/interact", timeout=60)
        socket.send(json.dumps({"open": {"imageBytes": base64.b64encode(new_image()).decode()}}))
        socket.recv()
        socket.send(json.dumps({"event": {"id": "1", "addPoint": {"x": 999, "y": 1,
                                                                   "label": "POINT_LABEL_FOREGROUND"}}}))
        error = json.loads(socket.recv())["error"]
        assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "160x120" in error["message"]
        (bad,) = (d for d in error["details"] if d["@type"].endswith("BadRequest"))
        assert bad["fieldViolations"][0]["field"] == "events[id=1].add_point"
        assert _close_code(socket) == 1008
        # Not JSON of an InteractRequest: the same.
        socket = websocket.create_connection(f"ws://127.0.0.1:{bounded.http_port}/v1/interact", timeout=60)
        socket.send('{"opn": {}}')
        error = json.loads(socket.recv())["error"]
        assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "InteractRequest" in error["message"]
        assert _close_code(socket) == 1008
    finally:
        socket.close()


def test_auth_the_tenant_bound_and_the_decoder_prompt_quota_hold_for_sessions(gateway_factory, tiny_triton,
                                                                             tmp_path):
    """Each decode costs one decoder prompt of the tenant's bucket; sessions are bounded per tenant; a key without
    Interact is refused."""
    path = tmp_path / "keys.json"
    tokens = {}
    for tenant, methods in (("clicker", "Interact"), ("segmenter", "Segment")):
        done = subprocess.run([SAMSERVE, "keys", "add", "--tenant", tenant, "--methods", methods, "--file",
                               str(path)], capture_output=True, text=True, timeout=60, check=True)
        tokens[tenant] = done.stdout.strip()
    document = json.loads(path.read_text())
    document["tenants"] = {"clicker": {"decoder_prompts_per_min": 0.01, "decoder_prompts_burst": 2}}
    path.write_text(json.dumps(document))
    gateway = gateway_factory(tiny_triton.url, None, auth="api-keys", api_keys_file=path,
                              interact_max_sessions_per_tenant=1)
    with SamServeClient(gateway.target, security=ClientSettings(token=tokens["segmenter"])) as refused:
        with pytest.raises(grpc.RpcError) as caught:
            refused.interact(new_image(), timeout_s=60)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with SamServeClient(gateway.target, security=ClientSettings(token=tokens["clicker"])) as allowed:
        with allowed.interact(new_image(), timeout_s=60) as session:
            with pytest.raises(grpc.RpcError) as caught:  # one session at a time for this tenant
                allowed.interact(new_image(), timeout_s=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "SAMSERVE_INTERACT_MAX_SESSIONS_PER_TENANT" in caught.value.details()
            for x in (10, 20):
                session.add_point(x, 10)
                assert session.answer().decoded
            session.add_point(30, 10)
            with pytest.raises(grpc.RpcError) as caught:
                session.answer()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "decoder_prompts" in caught.value.details()
    samples = scrape(gateway.metrics_url)
    assert sample(samples, "samserve_tenant_usage_total", tenant="clicker", limit="decoder_prompts") == 2
    assert sample(samples, "samserve_tenant_requests_total", tenant="clicker", method="Interact",
                  code="RESOURCE_EXHAUSTED") == 2  # the second session, and the third decode


def test_the_cli_drives_a_session_from_command_lines(bounded, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(new_image())
    script = tmp_path / "clicks.txt"
    script.write_text("# a person's clicks\npoint 80,60\npoint 20,100,0\nundo\nchoose 3\nbox 10,10,150,110\n")
    out = tmp_path / "overlay.png"
    done = subprocess.run([SAMSERVE, "interact", str(image), "--events", str(script), "--out", str(out),
                           "--target", bounded.target], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("session on ") and "160x120" in lines[0]
    answered = [line for line in lines if line.startswith("event ")]
    superseded = [int(i) for line in lines if line.startswith("superseded:")
                  for i in line.split("events ")[1].split(" (")[0].split(", ")]
    assert answered[-1].startswith("event 6: 1 point(s), 1 mask(s)")  # finish, sent at the end of the file
    assert len(answered) + len(superseded) == 6
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    script.write_text("point 80,60\nwiggle\n")
    done = subprocess.run([SAMSERVE, "interact", str(image), "--events", str(script), "--target", bounded.target],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a command: 'wiggle'" in done.stderr
    script.write_text("point 999,60\n")
    done = subprocess.run([SAMSERVE, "interact", str(image), "--events", str(script), "--target", bounded.target],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "160x120" in done.stderr
