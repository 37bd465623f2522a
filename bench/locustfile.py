"""Locust load test of the samserve gateway over gRPC (headless: `make load`, see README).

Scenarios (pick by user class on the command line):
  InteractiveUser  clicks on images that are already embedded (the common case: hot Segment by image_id)
  UploadUser       new images every time (cold: Segment with image bytes, the encoder runs)
  MixedUser        95 % clicks on cached images, 5 % new uploads
  EverythingUser   "segment everything" (GenerateMasks) on cached images, as annotation tools and dataset jobs do
                   (points_per_side from SAMSERVE_LOAD_POINTS_PER_SIDE, default 16; the official defaults otherwise)
Images and prompts are generated and seeded (SAMSERVE_LOAD_SEED), nothing is downloaded. Every call is reported
to Locust's request events: name per RPC and scenario, response size, failures with their gRPC status code.
TLS, mutual TLS and the API key come from the client settings, SAMSERVE_CLIENT_* (docs/security.md), e.g.
SAMSERVE_CLIENT_CA_FILE=ca.pem SAMSERVE_CLIENT_TOKEN=sk-... locust -f bench/locustfile.py ...
"""

from __future__ import annotations

import io
import itertools
import os
import random
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc's sync stubs must cooperate with Locust's gevent loop

import grpc  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from PIL import Image  # noqa: E402

from samserve.core.api import pb, pb_grpc  # noqa: E402
from samserve.core.settings import ClientSettings  # noqa: E402
from samserve.security.tls import client_channel  # noqa: E402
from samserve_dev.images import synthetic_image  # noqa: E402

SEED = int(os.environ.get("SAMSERVE_LOAD_SEED", "0"))
HEIGHT = int(os.environ.get("SAMSERVE_LOAD_HEIGHT", "480"))
WIDTH = int(os.environ.get("SAMSERVE_LOAD_WIDTH", "640"))
CACHED_IMAGES = int(os.environ.get("SAMSERVE_LOAD_CACHED_IMAGES", "4"))
POINTS_PER_SIDE = int(os.environ.get("SAMSERVE_LOAD_POINTS_PER_SIDE", "16"))
CLIENT = ClientSettings()
_new_image_seeds = itertools.count(SEED * 1_000_000 + 500_000)


class RpcFailure(Exception):
    """A failed RPC as Locust reports it: '<STATUS_CODE>: <details>'."""


def encoded_image(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(HEIGHT, WIDTH, seed=seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class SamUser(User):
    abstract = True
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        target = self.host or "127.0.0.1:50051"
        self.channel = client_channel(target, **CLIENT.model_dump())
        self.stub = pb_grpc.SegmentAnythingStub(self.channel)
        self.random = random.Random(SEED + id(self))
        self.image_ids: list[str] = []

    def on_stop(self) -> None:
        self.channel.close()

    def call(self, name: str, method, request):
        started = time.perf_counter()
        response, error = None, None
        try:
            response = method(request, timeout=600)
        except grpc.RpcError as rpc_error:
            error = RpcFailure(f"{rpc_error.code().name}: {rpc_error.details()}")
        events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=response.ByteSize() if response is not None else 0, exception=error, context={},
        )
        return response

    def click(self) -> pb.Prompt:
        x, y = self.random.uniform(0, WIDTH - 1), self.random.uniform(0, HEIGHT - 1)
        return pb.Prompt(points=[pb.Point(x=x, y=y, label=pb.POINT_LABEL_FOREGROUND)], multimask_output=True)

    def cached_image_id(self) -> str | None:
        """One of a few images embedded once per user (the same seeds for every user, so they are shared)."""
        if len(self.image_ids) < CACHED_IMAGES:
            seed = SEED * 1_000_000 + len(self.image_ids)
            response = self.call("Embed (warm-up)", self.stub.Embed, pb.EmbedRequest(image=encoded_image(seed)))
            if response is None:
                return None
            self.image_ids.append(response.image_id)
        return self.random.choice(self.image_ids)

    def hot_segment(self) -> None:
        image_id = self.cached_image_id()
        if image_id is not None:
            self.call("Segment hot (image_id)", self.stub.Segment,
                      pb.SegmentRequest(image_id=image_id, prompts=[self.click()]))

    def segment_everything(self) -> None:
        image_id = self.cached_image_id()
        if image_id is not None:
            self.call("GenerateMasks (image_id)", self.stub.GenerateMasks,
                      pb.GenerateMasksRequest(image_id=image_id, points_per_side=POINTS_PER_SIDE))

    def cold_segment(self) -> None:
        self.call("Segment cold (new image bytes)", self.stub.Segment,
                  pb.SegmentRequest(image_bytes=encoded_image(next(_new_image_seeds)), prompts=[self.click()]))


class InteractiveUser(SamUser):
    @task
    def click_on_cached_image(self) -> None:
        self.hot_segment()


class UploadUser(SamUser):
    @task
    def upload_new_image(self) -> None:
        self.cold_segment()


class MixedUser(SamUser):
    @task(95)
    def click_on_cached_image(self) -> None:
        self.hot_segment()

    @task(5)
    def upload_new_image(self) -> None:
        self.cold_segment()


class EverythingUser(SamUser):
    @task
    def segment_everything_on_cached_image(self) -> None:
        self.segment_everything()
