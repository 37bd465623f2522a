"""The fuzz tier's contract, in one place: how a request reaches the real gateway (raw bytes on a real gRPC channel),
what every answer must satisfy (a status code in :data:`ALLOWED`, never INTERNAL, UNKNOWN or DEADLINE_EXCEEDED; the
gateway alive; its peak memory under :data:`PEAK_RSS_BOUND_BYTES`), and the wall-clock budget
(``SAMSERVE_FUZZ_SECONDS``) that hypothesis itself lacks.

A request that breaks the property is written to ``.samserve/fuzz-failures/<Method>.<CODE>.bin`` (git-ignored; the
smallest one per method and code is kept, i.e. hypothesis's shrunk example): copy it into ``tests/fuzz/regressions/``
as ``<Method>.<EXPECTED_CODE>.<what-it-is>.bin`` once the service is fixed, and every run replays it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf.message import Message
from hypothesis import HealthCheck, seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from samserve.core.api import SERVICE_NAME, pb
from samserve_dev.local_stack import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".samserve"  # git-ignored: hypothesis's example database and the failing requests live here
DATABASE = DirectoryBasedExampleDatabase(str(STATE / "hypothesis"))
FAILURES = STATE / "fuzz-failures"
HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"

ALLOWED = frozenset({
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,    # undecodable images, malformed messages, values outside their domain
    grpc.StatusCode.NOT_FOUND,           # image ids the cache does not hold (random ids, uncached crops)
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # messages over max_request_bytes, too many encodes queued
})
"""Every fuzzed call must end with one of these codes (INTERNAL, UNKNOWN, UNAVAILABLE... are bugs, and so is
DEADLINE_EXCEEDED: a hang, see :data:`CALL_DEADLINE_S`)."""
CALL_DEADLINE_S = 30.0
"""Deadline of every fuzzed call: far above any example's normal time (milliseconds to a second on the tiny model,
even on a busy 2-core machine), so a DEADLINE_EXCEEDED is a hang: it fails the run and its request is saved as a
regression case, and one hung example cannot stall the run."""
PEAK_RSS_BOUND_BYTES = 2 << 30
"""Bound on the gateway's peak resident memory during any one fuzzed call (VmHWM, reset before each call) and over
the run. Fuzzed calls run one at a time. The gateway idles at about 0.2 GB. The most one request may legitimately
cost is bounded by the settings: decoding an image of ``max_image_pixels`` (64 M, checked from the header before
decoding), measured at 1.46 GB for an 8000 x 8000 RGBA PNG (test_images.py; about 23 bytes a pixel: decoded,
transposed, converted, copied to numpy), and a Segment answer's full-size masks (``max_segment_mask_pixels``). 2 GiB
leaves allocator slack and no more: a leak, an unchecked decompression bomb (a 65535 x 65535 image is 12 GB) or
work that grows with a request's numbers (NMS over K masks in K x K matrices) breaks it."""

METHODS = {
    "Embed": (pb.EmbedRequest, pb.EmbedResponse),
    "Segment": (pb.SegmentRequest, pb.SegmentResponse),
    "GenerateMasks": (pb.GenerateMasksRequest, pb.GenerateMasksResponse),
}

SEED_IMAGE_HW = (48, 64)
"""(height, width) of the image the prompt and parameter fuzzers refer to by image_id (embedded once)."""


def fuzz_seconds() -> float:
    """The whole tier's generation budget: ``SAMSERVE_FUZZ_SECONDS`` (default 60; `make fuzz` sets more)."""
    return float(os.environ.get("SAMSERVE_FUZZ_SECONDS", "60"))


SHARES = {"images": 0.3, "segment_fields": 0.2, "generate_fields": 0.2, "raw_messages": 0.15,
          "mutated_messages": 0.15}
"""Each target's share of :func:`fuzz_seconds` (they sum to 1)."""


def base_seed() -> int:
    """``SAMSERVE_FUZZ_SEED`` when set (to replay a run's generation), else a fresh one (printed by each target)."""
    given = os.environ.get("SAMSERVE_FUZZ_SEED")
    return int(given) if given else random.SystemRandom().randrange(1 << 32)


def fuzz_settings(batch: int) -> settings:
    """Hypothesis settings of one batch: random (not derandomized), no per-example deadline (the gRPC deadline
    bounds each call), failures kept in the local database and replayed first on the next run."""
    return settings(
        max_examples=batch, deadline=None, database=DATABASE, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )


def run_for(target: str, test: Callable[[], None], batch: int = 25) -> int:
    """Run the hypothesis ``test`` (already given its settings) in batches with seeds base+0, base+1, ... until
    ``target``'s share of the budget is spent (checked between batches: a batch is a few seconds at most); at least
    one batch. Hypothesis has no wall-clock limit of its own. Returns the number of batches."""
    budget = fuzz_seconds() * SHARES[target]
    base = base_seed()
    print(f"fuzz {target}: budget {budget:.0f} s, SAMSERVE_FUZZ_SEED={base} (batch i uses seed {base} + i)")
    stop = time.monotonic() + budget
    batches = 0
    while True:
        seed(base + batches)(test)()
        batches += 1
        if time.monotonic() >= stop:
            return batches


def reset_peak_rss(pid: int) -> None:
    """Set the process's VmHWM back to its current RSS (Linux ``clear_refs`` 5), so the next read is one call's peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident set size) of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@dataclasses.dataclass
class FuzzTarget:
    """The real gateway process and a channel that sends request bytes exactly as given."""

    gateway: GatewayProcess
    channel: grpc.Channel
    image_id: str
    """Id of the embedded seed image (:data:`SEED_IMAGE_HW`)."""
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """(method, status code name) -> calls, over the session."""
    peak_bytes: int = 0
    """The largest peak RSS of the gateway during one call, over the session."""
    last_peak_bytes: int = 0
    """The gateway's peak RSS during the last call."""

    @property
    def pid(self) -> int:
        assert self.gateway.process is not None
        return self.gateway.process.pid

    def call(self, method: str, payload: bytes) -> grpc.StatusCode:
        """Send ``payload`` as the serialized request of ``method``; check the property; the status code."""
        stub = self.channel.unary_unary(f"/{SERVICE_NAME}/{method}")  # no serializers: bytes in, bytes out
        details = ""
        reset_peak_rss(self.pid)
        try:
            answer = stub(payload, timeout=CALL_DEADLINE_S)
            code = grpc.StatusCode.OK
            METHODS[method][1].FromString(answer)  # an OK answer is a well-formed response message
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        self.codes[(method, code.name)] += 1
        alive = self.gateway.process is not None and self.gateway.process.poll() is None
        peak = peak_rss_bytes(self.pid) if alive else 0
        self.last_peak_bytes, self.peak_bytes = peak, max(self.peak_bytes, peak)
        if code not in ALLOWED or not alive or peak >= PEAK_RSS_BOUND_BYTES:
            where = record_failure(method, code.name if peak < PEAK_RSS_BOUND_BYTES else "MEMORY", payload)
            raise AssertionError(
                f"{method} answered {code.name} ({details!r}); gateway alive: {alive}; peak RSS during the call "
                f"{peak / 2**20:.0f} MiB; request saved as {where}\ngateway log tail:\n{self.gateway.log()[-3000:]}"
            )
        return code

    def send(self, method: str, request: Message) -> grpc.StatusCode:
        """:meth:`call` with a request message."""
        return self.call(method, request.SerializeToString())

    @contextlib.contextmanager
    def memory_checked(self) -> Iterator[None]:
        """Prints, after the block, the largest per-call peak RSS so far and the calls by code; asserts the bound
        (each call checks it too: this catches growth between calls, e.g. a cache or a leak)."""
        yield
        peak = max(self.peak_bytes, peak_rss_bytes(self.pid))
        print(f"gateway peak RSS (VmHWM) {peak / 2**20:.0f} MiB; calls by (method, code): {dict(self.codes)}")
        assert peak < PEAK_RSS_BOUND_BYTES, f"gateway peak RSS {peak / 2**20:.0f} MiB over the bound"


def record_failure(method: str, what: str, payload: bytes) -> Path:
    """Keep the smallest request per (method, what went wrong: a status code name or MEMORY) that broke the
    property, for a regression case."""
    FAILURES.mkdir(parents=True, exist_ok=True)
    path = FAILURES / f"{method}.{what}.bin"
    if not path.exists() or len(payload) <= path.stat().st_size:
        path.write_bytes(payload)
    return path


def saved_requests(folder: Path) -> list[Path]:
    """``<Method>.[<CODE>.]<name>.bin`` files of a corpus or regression folder, sorted."""
    return sorted(folder.glob("*.bin"))
