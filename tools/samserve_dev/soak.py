"""Chaos soak: a real stack (one Triton, one Redis, two gateways sharing it) under a fixed-rate client load while
faults hit it on a schedule; every answer is checked against the answer the same request got without faults.

Used by ``bench/soak.py`` (10 minutes, JSON + PNG) and ``tests/integration/test_soak.py`` (60 seconds, asserting
the targets). The pieces, each replaceable on its own:

* :class:`SoakStack`: Triton on a rendered repository, redis-server, two gateway processes, on free loopback ports.
* :func:`reference_answers`: every request of the run answered once by a separate gateway without Redis, before
  any fault (the "fault-free" answer; new images are new to the soak gateways, which never saw them).
* :data:`OPERATIONS`: what the load does (weighted): clicks by ``image_id`` on a working set of embedded images
  (NOT_FOUND -> the client sends the bytes again, as the API says), clicks with the image bytes, Embed, clicks on an
  image never sent before. :class:`Load` fires them at a fixed rate from a thread pool (open loop).
* :data:`FAULTS`: one function per fault; :func:`schedule` places them in the run, in rounds scaled to its
  duration. The memory-limited gateway runs under :mod:`samserve_dev.memory_limits` (a cgroup where allowed).
* :func:`summarize`: per phase requests, failures by status code, wrong answers, p50/p99, time to recover;
  :data:`TARGETS` evaluates the issue's targets on that summary.

Answers are compared exactly first (RLE bytes and scores): every replica serves the embedding from one fp16 form.
But an embedding computed again is not always bit-equal: Triton's dynamic batcher runs the encoder on batches of
several images, and ONNX Runtime rounds differently per batch shape (measured on this CPU: the same image encoded
alone and in a batch of 8 differs by up to 1.2e-6 in fp32, and the fp16 forms differ), so when a fault makes a
gateway encode an image again (Redis lost or too slow, tier 1 dropped after a Triton restart) its masks can differ
from the fault-free ones at a few boundary pixels (seen: a few answers per thousand, in the Redis-slow and Triton
phases). So an answer that differs is "close"
when every mask has IoU >= :data:`CLOSE_IOU` with its fault-free mask and every score is within
:data:`CLOSE_SCORE`, else "wrong" (a mask of another image or prompt is far below both). Only "wrong" fails the
target; every phase records how many answers were not exact and by how much (``not_exact``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import redis
from PIL import Image

from samserve.core import model_spec
from samserve.core.api import pb, pb_grpc
from samserve.launch.redis_server import RedisServer
from samserve.launch.triton_server import TritonServer
from samserve.security.tls import client_channel
from samserve.vision import mask_encoding
from samserve_build.repository import write_repository
from samserve_dev.images import png_bytes, synthetic_image
from samserve_dev.local_stack import GatewayProcess, free_port
from samserve_dev.memory_limits import memory_limit, peak_rss_bytes
from samserve_dev.polling import wait_until

CLOSE_IOU = 0.99
CLOSE_SCORE = 0.01
CALL_TIMEOUT_S = 30.0
RECOVERY_STREAK = 5
"""Time to recover ends at the first of this many consecutive successful calls."""
TRITON_RECOVERY_TARGET_S = 30.0
OUTAGE_MARGIN_S = 0.5
"""A call counts as started during an outage when it started this long before the recovery point (Triton ready
is seen by polling, up to 0.25 s late; the gateways poll Triton every 0.2 s). Such a call answered OK was answered
thanks to the client's retries."""
WORKING_SET = 6
IMAGE_SIZE = (240, 320)
CLICKS = ((0.5, 0.4), (0.3, 0.3), (0.7, 0.6))
"""Click positions on working-set images, as fractions of (width, height)."""
BIG_IMAGE_SIZE = (6700, 9000)
"""~60 megapixels (height, width)."""


# -- the stack ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SoakStack:
    """Triton, Redis and two gateways sharing that Redis (started by :meth:`running`)."""

    workdir: Path
    triton: TritonServer
    redis: RedisServer
    gateways: list[GatewayProcess]

    @property
    def target(self) -> str:
        """Every gateway, for a round-robin client."""
        return ",".join(gateway.target for gateway in self.gateways)

    def start_triton(self, timeout_s: float = 300.0) -> None:
        self.triton.start()
        self.triton.wait_ready(timeout_s, (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL))

    def gateway(self, redis_url: str | None = "shared", **settings: object) -> GatewayProcess:
        """A gateway process on this Triton (not started); Redis: the shared one, or ``None``."""
        return GatewayProcess(self.triton.grpc_url, self.redis.url if redis_url == "shared" else redis_url,
                              self.workdir / "gateways", **settings)

    @classmethod
    @contextlib.contextmanager
    def running(cls, model_dir: Path, workdir: Path) -> Iterator[SoakStack]:
        workdir = Path(workdir)
        repository = write_repository(model_dir, workdir / "repository")
        triton = TritonServer(repository, workdir / "triton", free_port(), free_port(), free_port())
        stack = cls(workdir, triton, RedisServer(free_port(), workdir / "redis"), [])
        try:
            stack.start_triton()
            stack.redis.start()
            stack.gateways = [stack.gateway() for _ in range(2)]
            for gateway in stack.gateways:
                gateway.start()
            yield stack
        finally:
            for gateway in stack.gateways:
                gateway.stop()
            stack.redis.stop()
            triton.stop()


# -- the requests and their fault-free answers ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Answer:
    """What a Segment response says (masks as RLE counts per prompt result), or an Embed response's fields."""

    size: tuple[int, int]
    rles: tuple[bytes, ...]
    scores: tuple[float, ...]
    image_id: str = ""

    @classmethod
    def of_segment(cls, response: pb.SegmentResponse) -> Answer:
        masks = [mask for result in response.results for mask in result.masks]
        return cls((response.height, response.width), tuple(m.rle.counts for m in masks),
                   tuple(round(m.predicted_iou, 6) for m in masks), response.image_id)

    @classmethod
    def of_embed(cls, response: pb.EmbedResponse) -> Answer:
        return cls((response.height, response.width), (), (), response.image_id)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How an answer compares with the fault-free one."""

    verdict: str
    """exact | close (every mask IoU >= CLOSE_IOU and scores within CLOSE_SCORE) | wrong."""
    min_iou: float = 1.0
    """The lowest IoU of a mask with its fault-free counterpart (1.0 when every mask is identical)."""
    score_diff: float = 0.0
    """The largest difference of a predicted IoU score."""


def compare(expected: Answer, got: Answer) -> Comparison:
    if got == expected:
        return Comparison("exact")
    if (got.size, got.image_id, len(got.rles)) != (expected.size, expected.image_id, len(expected.rles)):
        return Comparison("wrong", 0.0, float("inf"))
    score_diff = max((abs(a - b) for a, b in zip(got.scores, expected.scores, strict=True)), default=0.0)
    min_iou = 1.0
    for mine, theirs in zip(got.rles, expected.rles, strict=True):
        if mine == theirs:
            continue
        a = mask_encoding.decode_rle(list(got.size), mine)
        b = mask_encoding.decode_rle(list(expected.size), theirs)
        union = np.logical_or(a, b).sum()
        min_iou = min(min_iou, float(np.logical_and(a, b).sum() / union) if union else 1.0)
    close = min_iou >= CLOSE_IOU and score_diff <= CLOSE_SCORE
    return Comparison("close" if close else "wrong", min_iou, score_diff)


@dataclasses.dataclass(frozen=True)
class Workload:
    """The images and prompts of a run: a working set (clicked again and again) and images sent once."""

    working: list[bytes]
    new: list[bytes]

    @classmethod
    def make(cls, new_images: int, seed: int = 0) -> Workload:
        height, width = IMAGE_SIZE
        return cls([png_bytes(synthetic_image(height, width, seed=seed + 500 + i)) for i in range(WORKING_SET)],
                   [png_bytes(synthetic_image(height, width, seed=seed + 10_000 + i)) for i in range(new_images)])


def click_request(click: int) -> pb.SegmentRequest:
    """A one-click multimask request (the image is filled in by the caller)."""
    fx, fy = CLICKS[click]
    height, width = IMAGE_SIZE
    return pb.SegmentRequest(mask_encoding=pb.MASK_ENCODING_RLE, prompts=[pb.Prompt(
        points=[pb.Point(x=fx * width, y=fy * height, label=pb.POINT_LABEL_FOREGROUND)], multimask_output=True)])


def with_bytes(click: int, image: bytes) -> pb.SegmentRequest:
    request = click_request(click)
    request.image_bytes = image
    return request


def with_id(click: int, image_id: str) -> pb.SegmentRequest:
    request = click_request(click)
    request.image_id = image_id
    return request


@dataclasses.dataclass
class Reference:
    """Fault-free answers: (image index, click) of the working set, new image index (click 0), Embed per image."""

    working: dict[tuple[int, int], Answer]
    new: dict[int, Answer]
    embed: dict[int, Answer]


def reference_answers(stack: SoakStack, workload: Workload) -> Reference:
    """Every request of the run through a separate gateway without Redis, before any fault; it is stopped after."""
    gateway = stack.gateway(redis_url=None).start()
    try:
        with client_channel(gateway.target) as channel:
            stub = pb_grpc.SegmentAnythingStub(channel)
            embed = {i: Answer.of_embed(stub.Embed(pb.EmbedRequest(image=image), timeout=CALL_TIMEOUT_S))
                     for i, image in enumerate(workload.working)}
            working = {(i, c): Answer.of_segment(stub.Segment(with_bytes(c, image), timeout=CALL_TIMEOUT_S))
                       for i, image in enumerate(workload.working) for c in range(len(CLICKS))}
            new = {i: Answer.of_segment(stub.Segment(with_bytes(0, image), timeout=CALL_TIMEOUT_S))
                   for i, image in enumerate(workload.new)}
    finally:
        gateway.stop()
    return Reference(working, new, embed)


# -- the load ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """One operation of the load (seconds from the start of the run)."""

    stream: str
    operation: str
    start_s: float
    end_s: float
    code: str
    """"OK", a gRPC status code name, or CLIENT_<exception> for a failure outside gRPC."""
    verdict: str | None = None
    """exact | close | wrong for answered calls."""
    resent: bool = False
    """The image_id was NOT_FOUND (no tier had it) and the client sent the bytes again."""
    comparison: Comparison | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK" and self.verdict != "wrong"


@dataclasses.dataclass
class LoadContext:
    stub: pb_grpc.SegmentAnythingStub
    workload: Workload
    reference: Reference
    new_images: Iterator[int]


Outcome = tuple[str, Comparison, bool]
"""(code, comparison with the fault-free answer, resent) of one answered operation."""


def _segment_by_id(context: LoadContext, rng: random.Random) -> Outcome:
    image, click = rng.randrange(WORKING_SET), rng.randrange(len(CLICKS))
    expected = context.reference.working[image, click]
    try:
        response = context.stub.Segment(with_id(click, expected.image_id), timeout=CALL_TIMEOUT_S)
        resent = False
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.NOT_FOUND:
            raise
        response = context.stub.Segment(with_bytes(click, context.workload.working[image]), timeout=CALL_TIMEOUT_S)
        resent = True
    return "OK", compare(expected, Answer.of_segment(response)), resent


def _segment_by_bytes(context: LoadContext, rng: random.Random) -> Outcome:
    image, click = rng.randrange(WORKING_SET), rng.randrange(len(CLICKS))
    response = context.stub.Segment(with_bytes(click, context.workload.working[image]), timeout=CALL_TIMEOUT_S)
    return "OK", compare(context.reference.working[image, click], Answer.of_segment(response)), False


def _embed(context: LoadContext, rng: random.Random) -> Outcome:
    image = rng.randrange(WORKING_SET)
    response = context.stub.Embed(pb.EmbedRequest(image=context.workload.working[image]), timeout=CALL_TIMEOUT_S)
    return "OK", compare(context.reference.embed[image], Answer.of_embed(response)), False


def _new_image(context: LoadContext, rng: random.Random) -> Outcome:
    index = next(context.new_images, None)
    if index is None:  # more new images asked for than made: click a working-set image instead
        return _segment_by_bytes(context, rng)
    response = context.stub.Segment(with_bytes(0, context.workload.new[index]), timeout=CALL_TIMEOUT_S)
    return "OK", compare(context.reference.new[index], Answer.of_segment(response)), False


@dataclasses.dataclass(frozen=True)
class Operation:
    weight: float
    run: Callable[[LoadContext, random.Random], Outcome]


OPERATIONS: dict[str, Operation] = {
    "segment_by_id": Operation(0.55, _segment_by_id),
    "segment_by_bytes": Operation(0.15, _segment_by_bytes),
    "embed": Operation(0.15, _embed),
    "new_image": Operation(0.15, _new_image),
}
NEW_IMAGE_SHARE = OPERATIONS["new_image"].weight / sum(op.weight for op in OPERATIONS.values())


class Load:
    """Operations at a fixed rate (open loop: a slow answer does not delay the next call), from a thread pool."""

    def __init__(self, stream: str, context: LoadContext, rate_per_s: float, operations: dict[str, Operation],
                 seed: int, clock: Callable[[], float]) -> None:
        self.stream, self.context, self.rate_per_s = stream, context, rate_per_s
        self.operations = operations
        self.rng = random.Random(seed)
        self.clock = clock
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def _execute(self, name: str, seed: int) -> None:
        start = self.clock()
        comparison: Comparison | None = None
        try:
            code, comparison, resent = self.operations[name].run(self.context, random.Random(seed))
        except grpc.RpcError as error:
            code, resent = error.code().name, False
        except Exception as error:  # noqa: BLE001 - recorded as a failure of the call, never lost
            code, resent = f"CLIENT_{type(error).__name__}", False
        call = Call(self.stream, name, start, self.clock(), code, comparison.verdict if comparison else None, resent,
                    comparison)
        with self._lock:
            self.calls.append(call)

    def run(self, stop: threading.Event, workers: int = 32) -> None:
        """Until ``stop`` is set; then waits for the calls in flight."""
        names = list(self.operations)
        weights = [self.operations[name].weight for name in names]
        begin = self.clock()
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=self.stream) as pool:
            for index in range(1 << 62):
                due = begin + index / self.rate_per_s
                if stop.wait(max(0.0, due - self.clock())):
                    break
                pool.submit(self._execute, self.rng.choices(names, weights)[0], self.rng.randrange(1 << 30))


def big_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` different ~60-megapixel JPEGs (smooth, so each is a few MB, under the request size limit)."""
    height, width = BIG_IMAGE_SIZE
    base = np.empty((height, width, 3), np.uint8)
    base[..., 0] = (np.arange(width) * 255 // (width - 1)).astype(np.uint8)[None, :]
    base[..., 1] = (np.arange(height) * 255 // (height - 1)).astype(np.uint8)[:, None]
    base[..., 2] = 96
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = base.copy()
        for _ in range(3):
            y, x = int(rng.integers(0, height - 2000)), int(rng.integers(0, width - 3000))
            image[y:y + 2000, x:x + 3000] = rng.integers(0, 256, 3)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


# -- the faults -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FaultContext:
    stack: SoakStack
    clock: Callable[[], float]
    big_images: list[bytes]
    memory_limit_bytes: int


Fault = Callable[[FaultContext, float], dict[str, object]]
"""Runs one fault for about ``window_s`` seconds (longer when a restart takes longer) and returns what happened;
``recovery_from_s`` (clock seconds) says from when time to recover counts, when not from the fault's end."""


def redis_sigkill(context: FaultContext, window_s: float) -> dict[str, object]:
    """SIGKILL redis-server (its data is lost: no persistence), keep it down half the window, start it again."""
    stack = context.stack
    assert stack.redis.process is not None
    stack.redis.process.kill()
    stack.redis.process.wait()
    time.sleep(window_s / 2)  # the fault itself: Redis down
    stack.redis.start()
    return {"down_s": window_s / 2, "recovery_from_s": context.clock()}


def redis_slow(context: FaultContext, window_s: float) -> dict[str, object]:
    """``CLIENT PAUSE`` in a loop: every client's commands stall, alternately 0.5 s (slow, under the gateway's
    1 s Redis timeout) and 1.5 s (over it: the gateway gives up on Redis for that call)."""
    client = redis.Redis(host=context.stack.redis.host, port=context.stack.redis.port, socket_timeout=5)
    deadline = time.monotonic() + window_s
    pauses: list[int] = []
    try:
        while time.monotonic() < deadline:
            pause_ms = 500 if len(pauses) % 2 == 0 else 1500
            client.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
            pauses.append(pause_ms)
            time.sleep(pause_ms / 1000 + 0.2)
    finally:
        client.close()
    return {"pauses_ms": pauses}


def gateway_rolling_restart(context: FaultContext, window_s: float) -> dict[str, object]:
    """SIGTERM to the second gateway (it drains: NOT_SERVING, GOAWAY, in-flight calls finish), then start it again
    on the same port and wait until it is SERVING."""
    gateway = context.stack.gateways[1]
    started = time.monotonic()
    code = gateway.stop()
    stopped = time.monotonic()
    gateway.start()
    return {"exit_code": code, "drain_s": stopped - started, "start_s": time.monotonic() - stopped,
            "recovery_from_s": context.clock()}


def triton_sigkill(context: FaultContext, window_s: float) -> dict[str, object]:
    """SIGKILL tritonserver, start it again at once on the same ports; time to recover counts from Triton ready."""
    triton = context.stack.triton
    assert triton.process is not None
    triton.process.kill()
    triton.process.wait()
    killed = time.monotonic()
    context.stack.start_triton()
    return {"restart_to_ready_s": time.monotonic() - killed, "recovery_from_s": context.clock(),
            "triton_ready_s": context.clock()}


def memory_limited_gateway(context: FaultContext, window_s: float) -> dict[str, object]:
    """A third gateway (shared Redis and Triton) under a memory limit gets several ~60-megapixel images at once
    (Embed, no client retries); records each call's code, whether it stays alive and SERVING, its peak memory."""
    stack = context.stack
    limit = memory_limit(context.memory_limit_bytes)
    gateway = stack.gateway(on_spawn=limit.apply)
    try:
        try:
            gateway.start()
        except AssertionError as error:  # it could not even start under the limit
            return {"limit": limit.name, "limit_bytes": context.memory_limit_bytes, "alive": False,
                    "health_after": None, "start_failed": str(error)[-2000:], "oom_kills": limit.oom_kills()}
        baseline = peak_rss_bytes(gateway.process.pid) if gateway.process else None
        codes: list[str] = []
        latencies: list[float] = []

        def embed(image: bytes) -> None:
            started = time.monotonic()
            with client_channel(gateway.target, retry_attempts=1) as channel:
                try:
                    pb_grpc.SegmentAnythingStub(channel).Embed(pb.EmbedRequest(image=image), timeout=120)
                    codes.append("OK")
                except grpc.RpcError as error:
                    codes.append(error.code().name)
            latencies.append(time.monotonic() - started)

        threads = [threading.Thread(target=embed, args=(image,)) for image in context.big_images]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        process = gateway.process
        assert process is not None

        def state() -> str | None:  # an OOM kill lands a moment after the calls fail: poll until it is one or other
            return "EXITED" if process.poll() is not None else gateway.health()

        with contextlib.suppress(AssertionError):
            wait_until(state, lambda status: status in ("SERVING", "EXITED"), "limited gateway health", 30)
        health = state()
        alive = health != "EXITED"
        return {
            "limit": limit.name, "limit_bytes": context.memory_limit_bytes, "images": len(context.big_images),
            "image_pixels": BIG_IMAGE_SIZE[0] * BIG_IMAGE_SIZE[1],
            "image_bytes": [len(image) for image in context.big_images],
            "codes": dict(Counter(codes)), "latencies_s": latencies, "alive": alive, "health_after": health,
            "exit_code": None if alive else process.returncode,
            "rss_before_bytes": baseline,
            "peak_rss_bytes": peak_rss_bytes(process.pid) if alive else None,
            "cgroup_peak_bytes": limit.peak_bytes(), "oom_kills": limit.oom_kills(),
            "log_tail": "\n".join(gateway.log().splitlines()[-15:]) if not alive else "",
        }
    finally:
        gateway.stop()
        limit.close()


FAULTS: dict[str, Fault] = {
    "redis_sigkill": redis_sigkill,
    "redis_slow": redis_slow,
    "gateway_rolling_restart": gateway_rolling_restart,
    "triton_sigkill": triton_sigkill,
    "memory_limited_gateway": memory_limited_gateway,
}


@dataclasses.dataclass
class Phase:
    """A stretch of the run: a fault (``fault`` set) or the quiet time after one (``after_<fault>``), or the
    baseline. ``cycle``: which round of the schedule (0 for the baseline)."""

    name: str
    start_s: float
    end_s: float
    cycle: int = 0
    fault: str | None = None
    details: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Planned:
    fault: str
    cycle: int
    start_s: float
    window_s: float


BASELINE_SHARE, BASELINE_MAX_S = 0.1, 30.0
CYCLE_S = 120.0
"""About one round of every fault per this many seconds of the run (at least one round)."""
WINDOW_SHARE = 0.6
"""Of each fault's slot, the share its window takes; the rest is quiet time after it."""


def schedule(duration_s: float) -> list[Planned]:
    """The faults, in :data:`FAULTS` order, repeated in rounds after a baseline (10 % of the run, at most 30 s):
    ``round(duration / CYCLE_S)`` rounds (at least 1), each fault a slot of equal length whose window is 60 % of
    it. A fault that overruns its window delays the ones after it."""
    baseline = min(duration_s * BASELINE_SHARE, BASELINE_MAX_S)
    cycles = max(1, round(duration_s / CYCLE_S))
    slot = (duration_s - baseline) / (cycles * len(FAULTS))
    return [Planned(name, cycle + 1, baseline + (cycle * len(FAULTS) + index) * slot, slot * WINDOW_SHARE)
            for cycle in range(cycles) for index, name in enumerate(FAULTS)]


def run_faults(context: FaultContext, plan: list[Planned], stop: threading.Event,
               progress: Callable[[str], None]) -> list[Phase]:
    """Runs the plan (waiting for each planned start) and returns the fault phases as they happened."""
    phases = []
    for planned in plan:
        if stop.wait(max(0.0, planned.start_s - context.clock())):
            break
        start = context.clock()
        progress(f"[{start:6.1f} s] fault {planned.fault} #{planned.cycle} (window {planned.window_s:.1f} s)")
        details = FAULTS[planned.fault](context, planned.window_s)
        end = context.clock()
        progress(f"[{end:6.1f} s] fault {planned.fault} #{planned.cycle} over after {end - start:.1f} s")
        phases.append(Phase(planned.fault, start, end, planned.cycle, planned.fault, details))
    return phases


def all_phases(faults: list[Phase], end_s: float) -> list[Phase]:
    """The fault phases with the quiet stretches between them: baseline, fault, after_<fault>, fault, ..."""
    phases, cursor, previous, cycle = [], 0.0, "baseline", 0
    for fault in faults:
        phases.append(Phase(previous, cursor, fault.start_s, cycle))
        phases.append(fault)
        cursor, previous, cycle = fault.end_s, f"after_{fault.name}", fault.cycle
    phases.append(Phase(previous, cursor, end_s, cycle))
    return phases


# -- summary and targets ----------------------------------------------------------------------------------------------
def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else None


def phase_stats(calls: list[Call]) -> dict[str, object]:
    """Requests, failures by code, wrong answers, verdicts, NOT_FOUND resends, p50/p99 of the calls given."""
    latencies = [c.end_s - c.start_s for c in calls if c.code == "OK"]
    return {
        "requests": len(calls),
        "ok": sum(c.ok for c in calls),
        "failures_by_code": dict(Counter(c.code for c in calls if c.code != "OK")),
        "wrong_answers": sum(c.verdict == "wrong" for c in calls),
        "verdicts": dict(Counter(c.verdict for c in calls if c.verdict)),
        "resent_after_not_found": sum(c.resent for c in calls),
        "not_exact": _not_exact(calls),
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
    }


def _not_exact(calls: list[Call]) -> dict[str, object]:
    """Answers that differ from the fault-free one at all: how many, in masks or in scores only, and by how much."""
    differ = [c.comparison for c in calls if c.comparison is not None and c.comparison.verdict != "exact"]
    return {"answers": len(differ), "masks_differ": sum(c.min_iou < 1.0 for c in differ),
            "min_iou": min((c.min_iou for c in differ), default=None),
            "max_score_diff": max((c.score_diff for c in differ), default=None)}


def recovery_s(calls: list[Call], since_s: float, streak: int = RECOVERY_STREAK) -> float | None:
    """Seconds from ``since_s`` to the end of the first of ``streak`` consecutive successful calls started after it."""
    after = sorted((c for c in calls if c.start_s >= since_s), key=lambda c: c.start_s)
    for index in range(len(after) - streak + 1):
        if all(call.ok for call in after[index:index + streak]):
            return after[index].end_s - since_s
    return None


def _inside(calls: list[Call], phase: Phase) -> list[Call]:
    return [c for c in calls if phase.start_s <= c.start_s < phase.end_s]


def summarize(phases: list[Phase], calls: list[Call]) -> dict[str, object]:
    """``phases``: one entry per phase (calls assigned by their start): stats, and for a fault the time to recover,
    the calls started during the outage yet answered, what the fault reported. ``by_fault``: per fault, the calls
    during its phases and the quiet phases after them together, every recovery time, the worst."""
    entries = []
    for phase in phases:
        inside = _inside(calls, phase)
        entry: dict[str, object] = {"name": phase.name, "cycle": phase.cycle, "start_s": phase.start_s,
                                    "end_s": phase.end_s, **phase_stats(inside)}
        if phase.fault is not None:
            since = float(phase.details.get("recovery_from_s", phase.end_s))  # type: ignore[arg-type]
            entry["recovery_from_s"] = since
            entry["recovery_s"] = recovery_s(calls, since)
            entry["ok_started_during_outage"] = sum(c.ok for c in inside if c.start_s < since - OUTAGE_MARGIN_S)
            entry["details"] = {k: v for k, v in phase.details.items() if k != "recovery_from_s"}
        entries.append(entry)
    by_fault: dict[str, object] = {}
    for fault in FAULTS:
        mine = [e for e in entries if e["name"] == fault]
        if not mine:
            continue
        stretch = [c for phase in phases if phase.name in (fault, f"after_{fault}") for c in _inside(calls, phase)]
        recoveries = [e["recovery_s"] for e in mine]
        by_fault[fault] = {
            "runs": len(mine), **phase_stats(stretch),
            "recovery_s": recoveries,
            "worst_recovery_s": None if None in recoveries else max(recoveries),  # type: ignore[type-var]
            "ok_started_during_outage": sum(e["ok_started_during_outage"] for e in mine),  # type: ignore[misc]
        }
    return {"phases": entries, "by_fault": by_fault}


def fault_runs(summary: dict, fault: str) -> list[dict]:
    """The phase entries of every run of ``fault``."""
    return [entry for entry in summary["phases"] if entry["name"] == fault]


Target = Callable[[dict, list[Call]], tuple[bool, object]]
"""(met, what was measured) from the summary and the main load's calls."""


def _no_wrong_answers(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    wrong = sum(c.verdict == "wrong" for c in calls)
    return wrong == 0, wrong


def _failures(summary: dict, *faults: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for fault in faults:
        total.update(summary["by_fault"].get(fault, {}).get("failures_by_code", {}))
    return dict(total)


def _ran(summary: dict, *faults: str) -> bool:
    return all(fault in summary["by_fault"] for fault in faults)


def _redis_no_failures(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    failures = _failures(summary, "redis_sigkill", "redis_slow")
    return _ran(summary, "redis_sigkill", "redis_slow") and not failures, failures


def _rolling_no_failures(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    failures = _failures(summary, "gateway_rolling_restart")
    return _ran(summary, "gateway_rolling_restart") and not failures, failures


def _rolling_no_resends(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    """Image bytes re-sent after NOT_FOUND during and after the rolling restart: calls that "0 failed" counts as
    answered, though the client had to send the image again because no tier held it."""
    resent = summary["by_fault"].get("gateway_rolling_restart", {}).get("resent_after_not_found")
    return _ran(summary, "gateway_rolling_restart") and resent == 0, resent


def _triton_only_unavailable(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    failures = _failures(summary, "triton_sigkill")
    return _ran(summary, "triton_sigkill") and set(failures) <= {"UNAVAILABLE"}, failures


def _triton_recovery(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    """Every run: recovered within the target after Triton ready, and no failed call started later than that in
    the quiet time after it."""
    runs = fault_runs(summary, "triton_sigkill")
    late: Counter[str] = Counter()
    for run in runs:
        after = next((e for e in summary["phases"]
                      if e["name"] == "after_triton_sigkill" and e["cycle"] == run["cycle"]), run)
        late.update(c.code for c in calls if not c.ok
                    and run["recovery_from_s"] + TRITON_RECOVERY_TARGET_S <= c.start_s < after["end_s"])
    recoveries = [run["recovery_s"] for run in runs]
    met = bool(runs) and None not in recoveries and max(recoveries) <= TRITON_RECOVERY_TARGET_S and not late
    return met, {"recovery_s": recoveries, "failures_30s_after_ready": dict(late)}


def _memory_runs(summary: dict) -> list[dict]:
    return [run["details"] for run in fault_runs(summary, "memory_limited_gateway")]


def _limited_gateway_up(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    runs = _memory_runs(summary)
    states = [{"alive": d.get("alive"), "health_after": d.get("health_after"), "oom_kills": d.get("oom_kills")}
              for d in runs]
    return bool(runs) and all(s["alive"] and s["health_after"] == "SERVING" for s in states), states


BIG_IMAGE_ANSWERS = frozenset({"OK", "RESOURCE_EXHAUSTED"})
"""What a big image may get: an answer (perhaps after waiting its turn) or "too much work now, retry later"."""


def _big_images_rejected_or_queued(summary: dict, calls: list[Call]) -> tuple[bool, object]:
    codes: Counter[str] = Counter()
    for details in _memory_runs(summary):
        codes.update(details.get("codes") or {})  # type: ignore[arg-type]
    return bool(codes) and set(codes) <= BIG_IMAGE_ANSWERS, dict(codes)


TARGETS: dict[str, tuple[str, Target]] = {
    "no_wrong_answers": ("0 wrong answers in the whole run", _no_wrong_answers),
    "redis_faults_no_failed_calls": ("0 failed calls during and after Redis SIGKILL and Redis slow",
                                     _redis_no_failures),
    "rolling_restart_no_failed_calls": ("0 failed calls during and after the rolling restart of a gateway",
                                        _rolling_no_failures),
    "rolling_restart_no_resends": ("0 image re-sends after NOT_FOUND during and after the rolling restart",
                                   _rolling_no_resends),
    "triton_restart_only_unavailable": ("during and after the Triton restart, failures are UNAVAILABLE only",
                                        _triton_only_unavailable),
    "triton_recovery_within_30s": (f"{RECOVERY_STREAK} consecutive successes within {TRITON_RECOVERY_TARGET_S:.0f} s"
                                   " of Triton ready, no failure later", _triton_recovery),
    "memory_limited_gateway_stays_up": ("the memory-limited gateway is alive and SERVING after the big images",
                                        _limited_gateway_up),
    "big_images_rejected_or_queued": ("each big image is answered (queued) or refused with RESOURCE_EXHAUSTED",
                                      _big_images_rejected_or_queued),
}


def evaluate(summary: dict, calls: list[Call]) -> dict[str, dict[str, object]]:
    results = {}
    for name, (description, target) in TARGETS.items():
        met, measured = target(summary, calls)
        results[name] = {"target": description, "met": met, "measured": measured}
    return results


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SoakResult:
    duration_s: float
    rate_per_s: float
    phases: list[Phase]
    calls: list[Call]
    """The main load (client retries on)."""
    probe_calls: list[Call]
    """The no-retry probe (retry_attempts=1): what the retries hid."""
    summary: dict[str, object]
    probe_summary: dict[str, object]
    targets: dict[str, dict[str, object]]
    setup: dict[str, object]


def run_soak(model_dir: Path, workdir: Path, duration_s: float, rate_per_s: float = 8.0,
             big_image_count: int = 4, memory_limit_bytes: int = 1536 << 20, tail_s: float = 5.0,
             progress: Callable[[str], None] = print) -> SoakResult:
    """Start the stack, take the reference answers, run the load with the faults for ``duration_s`` (longer when a
    fault overruns its window: the load goes on ``tail_s`` after the last fault), summarize and evaluate."""
    new_needed = math.ceil(duration_s * rate_per_s * NEW_IMAGE_SHARE * 1.3) + 10
    setup_started = time.monotonic()
    workload = Workload.make(new_needed)
    big = big_images(big_image_count)
    with SoakStack.running(model_dir, workdir) as stack:
        progress(f"stack up in {time.monotonic() - setup_started:.1f} s: gateways {stack.target}, "
                 f"Triton {stack.triton.grpc_url}, Redis {stack.redis.url}")
        reference = reference_answers(stack, workload)
        progress(f"reference answers: {len(reference.working)} working-set clicks, {len(reference.new)} new images")
        with client_channel(stack.target) as channel, client_channel(stack.target, retry_attempts=1) as bare:
            warm = pb_grpc.SegmentAnythingStub(channel)
            for image in workload.working:  # the interactive session: every working image embedded once
                warm.Embed(pb.EmbedRequest(image=image), timeout=CALL_TIMEOUT_S)
            t0 = time.monotonic()

            def clock() -> float:
                return time.monotonic() - t0

            new_images = iter(range(len(workload.new)))
            load = Load("load", LoadContext(warm, workload, reference, new_images), rate_per_s, OPERATIONS, 1, clock)
            probe_ops = {"segment_by_id": OPERATIONS["segment_by_id"]}
            probe = Load("probe", LoadContext(pb_grpc.SegmentAnythingStub(bare), workload, reference, iter(())),
                         max(1.0, rate_per_s / 4), probe_ops, 2, clock)
            stop = threading.Event()
            threads = [threading.Thread(target=stream.run, args=(stop,)) for stream in (load, probe)]
            for thread in threads:
                thread.start()
            context = FaultContext(stack, clock, big, memory_limit_bytes)
            try:
                faults = run_faults(context, schedule(duration_s), stop, progress)
                end_at = max(duration_s, (faults[-1].end_s if faults else 0.0) + tail_s)
                stop.wait(max(0.0, end_at - clock()))
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            end_s = clock()
        setup = {"working_set_images": WORKING_SET, "clicks_per_image": len(CLICKS), "image_size": list(IMAGE_SIZE),
                 "new_images_made": len(workload.new), "operations": {k: v.weight for k, v in OPERATIONS.items()},
                 "probe_rate_per_s": probe.rate_per_s, "gateways": 2, "call_timeout_s": CALL_TIMEOUT_S,
                 "schedule": [dataclasses.asdict(planned) for planned in schedule(duration_s)]}
    phases = all_phases(faults, end_s)
    summary = summarize(phases, load.calls)
    probe_summary = summarize(phases, probe.calls)
    return SoakResult(duration_s, rate_per_s, phases, load.calls, probe.calls, summary, probe_summary,
                      evaluate(summary, load.calls), setup)
