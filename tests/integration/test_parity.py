"""Parity: the same seeded weights through the official ``SamPredictor`` and through the service as it runs: a real
``samserve gateway`` process (with the session's Redis) called over gRPC with
:class:`samserve.client.typed_client.SamServeClient`.
Each image's PNG bytes are sent once with Embed (decode, resize, Triton encoder, the cache's fp16 round trip, tier 1
and Redis), then every prompt is a Segment by ``image_id`` (Triton decoder, post-processing, RLE over the wire);
the refinement round feeds back the low-res logits that the gateway returned. Binarized masks IoU >=
:data:`MASK_IOU_MIN` for every mask; predicted IoU within :data:`SCORE_DIFF_MAX` (measured worst case over the
whole matrix, tiny and vit_b: see the README's Tests section).

The tiny configuration runs everywhere; vit_b (the released architecture at 1024 px) is marked slow and runs in
``make test`` too. One gateway per model for the module (its Triton is the session's).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import redis
import torch
from segment_anything import SamPredictor

from samserve.cache.codec import EmbeddingCodec
from samserve.client.typed_client import Masks, PromptSpec, SamServeClient
from samserve.launch.redis_server import RedisServer
from samserve.triton.models import TritonSam
from samserve.vision import processing, segmentation
from samserve_build import architectures
from samserve_build.evaluation import iou
from samserve_dev.images import png_bytes, synthetic_image
from samserve_dev.local_stack import GatewayProcess
from samserve_dev.prompts import prompt_for, prompt_spec
from samserve_dev.served_models import ServedModel

MASK_IOU_MIN = 0.99
SCORE_DIFF_MAX = 1e-3
IMAGE_SHAPES = {"landscape": (480, 640), "portrait": (600, 338), "tiny": (37, 53)}
MODELS = ["tiny", pytest.param("vit_b", marks=pytest.mark.slow)]


@dataclasses.dataclass
class Side:
    """One image set on both implementations."""

    official: SamPredictor
    image_id: str
    """What the gateway's Embed answered for the image's PNG bytes."""
    image: np.ndarray
    """uint8 H x W x 3 RGB."""


class Harness:
    """The official predictor and a gateway on one served model."""

    def __init__(self, served: ServedModel, gateway: GatewayProcess, redis_url: str) -> None:
        self.served = served
        self.gateway = gateway
        self.redis_url = redis_url
        torch.set_num_threads(2)
        self.sam = architectures.load_sam(served.model.variant, served.model.checkpoint)
        self.meta = served.model.metadata
        self.client = SamServeClient(gateway.target)
        self.sides: dict[str, Side] = {}

    def side(self, shape_name: str) -> Side:
        if shape_name not in self.sides:
            height, width = IMAGE_SHAPES[shape_name]
            image = synthetic_image(height, width, seed=height * 7 + width)
            official = SamPredictor(self.sam)
            with torch.no_grad():
                official.set_image(image)
            embedded = self.client.embed(png_bytes(image))
            assert (embedded.height, embedded.width) == (height, width)
            assert embedded.model_id == self.meta.model_id
            self.sides[shape_name] = Side(official, embedded.image_id, image)
        return self.sides[shape_name]

    def segment(self, side: Side, prompts: list[PromptSpec]) -> list[Masks]:
        """Segment by ``image_id`` over gRPC, with the low-res logits."""
        return self.client.segment(side.image_id, prompts, return_low_res_logits=True)

    def ours(self, side: Side, kwargs: dict) -> Masks:
        """The gateway's answer to one prompt given as official-predictor keyword arguments."""
        (answer,) = self.segment(side, [prompt_spec(kwargs)])
        return answer

    def stored_embedding(self, side: Side) -> np.ndarray:
        """The embedding the gateway stored in Redis for the image (float32 C x h x w from the fp16 record)."""
        store = redis.Redis.from_url(self.redis_url)
        try:
            record = store.get(f"samserve:emb:{self.meta.cache_namespace}:{side.image_id}")
        finally:
            store.close()
        assert record is not None, "the gateway stored no embedding in Redis"
        return EmbeddingCodec.decode(record).array.astype(np.float32)


@pytest.fixture(scope="module")
def harnesses(request: pytest.FixtureRequest, module_gateway_factory, redis_server: RedisServer):
    built: dict[str, Harness] = {}

    def get(model: str) -> Harness:
        if model not in built:
            served: ServedModel = request.getfixturevalue(f"{model}_triton")
            gateway = module_gateway_factory(served.url, redis_server.url)
            built[model] = Harness(served, gateway, redis_server.url)
        return built[model]

    yield get
    for harness in built.values():
        harness.client.close()


def assert_same(expected: tuple, got: Masks) -> None:
    masks, scores, low_res = expected
    assert got.masks.shape == masks.shape
    assert got.low_res_logits is not None and got.low_res_logits.shape == low_res.shape
    # Two empty masks score IoU 1.0: a case whose reference masks are all empty would pass on nothing.
    assert masks.any(axis=(-2, -1)).any(), "the official masks are all empty: this case compares nothing"
    ious = [iou(masks[k], got.masks[k]) for k in range(len(masks))]
    assert min(ious) >= MASK_IOU_MIN, f"mask IoU {ious}"
    diff = np.abs(scores - got.predicted_iou)
    assert diff.max() <= SCORE_DIFF_MAX, f"predicted IoU official {scores} vs ours {got.predicted_iou}"


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("case", ["point", "fg_bg", "box", "box_points", "refine"])
@pytest.mark.parametrize("shape_name", list(IMAGE_SHAPES))
@pytest.mark.parametrize("model", MODELS)
def test_masks_match_official_predictor(harnesses, model, shape_name, case, multimask):
    harness = harnesses(model)
    side = harness.side(shape_name)
    height, width = IMAGE_SHAPES[shape_name]
    if case == "refine":
        # Round 1: one point; round 2: a second point plus the round-1 low-res logits of the best mask
        # (each implementation refines with its own logits, as a client would).
        first = prompt_for("point", height, width, multimask)
        with torch.no_grad():
            _, scores, low_res = side.official.predict(**first)
        ours_first = harness.ours(side, first)
        assert ours_first.low_res_logits is not None
        best = int(np.argmax(scores))
        second = dict(
            point_coords=np.array([[0.5 * width, 0.4 * height], [0.2 * width, 0.8 * height]]),
            point_labels=np.array([1, 0]),
            multimask_output=multimask,
        )
        with torch.no_grad():
            expected = side.official.predict(**second, mask_input=low_res[best][None])
        got = harness.ours(side, dict(second, mask_input=ours_first.low_res_logits[best]))
    else:
        kwargs = prompt_for(case, height, width, multimask)
        with torch.no_grad():
            expected = side.official.predict(**kwargs)
        got = harness.ours(side, kwargs)
    assert_same(expected, got)
    assert got.token_index == ([1, 2, 3] if multimask else [0])


@pytest.mark.parametrize("model", MODELS)
def test_embedding_matches_official(harnesses, event_loop_runner, model):
    """The encoder itself (called on Triton directly) matches PyTorch to 1e-4; what the gateway serves is exactly its
    fp16 round trip: the record it stored in Redis (what every replica serves) equals it, and its Segment answers
    equal the decoder's on it (as they do not on the float32 embedding)."""
    harness = harnesses(model)
    side = harness.side("landscape")
    official = side.official.features[0].numpy()
    prepared = processing.prepare_image(side.image, harness.meta.image_size)
    height, width = IMAGE_SHAPES["landscape"]
    prompt = prompt_for("point", height, width, True)  # integer pixel coordinates: exact in the API's float32

    async def direct(array: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(encoder output, the decoder's low-res logits for ``prompt`` on ``array``, default that output)."""
        triton = TritonSam(harness.served.url, "grpc")
        try:
            await triton.metadata()
            encoded = await triton.encode(prepared)
            chosen = encoded.array if array is None else array
            embedded = await triton.stage(dataclasses.replace(encoded, array=chosen))
            (answer,) = await segmentation.segment(triton, harness.meta, embedded, [processing.Prompt(
                points=prompt["point_coords"], labels=prompt["point_labels"], multimask_output=True)])
            return encoded.array, answer.low_res_logits
        finally:
            await triton.close()

    encoded, from_fp32 = event_loop_runner.run(direct(None))
    assert encoded.shape == official.shape == harness.meta.embedding_shape
    assert np.abs(encoded - official).max() / np.abs(official).max() < 1e-4
    fp16 = encoded.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(harness.stored_embedding(side), fp16)
    _, from_fp16 = event_loop_runner.run(direct(fp16))
    served = harness.ours(side, prompt).low_res_logits
    np.testing.assert_array_equal(served, from_fp16)
    assert not np.array_equal(served, from_fp32)  # the comparison tells the two embeddings apart


def test_many_prompts_in_one_request_equal_one_at_a_time(harnesses):
    """Prompts of different token counts in one Segment are grouped, never padded: each equals its solo answer."""
    harness = harnesses("tiny")
    side = harness.side("landscape")
    height, width = IMAGE_SHAPES["landscape"]
    prompts = [prompt_spec(prompt_for(case, height, width, True)) for case in ("point", "fg_bg", "box", "box_points")]
    together = harness.segment(side, prompts)
    for prompt, joint in zip(prompts, together, strict=True):
        (alone,) = harness.segment(side, [prompt])
        np.testing.assert_allclose(joint.predicted_iou, alone.predicted_iou, atol=1e-5)
        assert iou(joint.masks, alone.masks) >= 0.999


def test_an_interact_session_refines_as_sampredictor_calls_made_by_hand(harnesses):
    """Each decode of a session feeds the shown mask's low-res logits back as mask_input: the session's answers
    equal the official predictor driven by hand that way (a click: multimask, the best shown; later clicks and the
    box: single mask with the previous logits; a chosen mask's logits after a choice)."""
    harness = harnesses("tiny")
    side = harness.side("landscape")
    height, width = IMAGE_SHAPES["landscape"]
    clicks = [((0.5 * width, 0.4 * height), 1), ((0.2 * width, 0.8 * height), 0), ((0.7 * width, 0.3 * height), 1)]
    box = (0.1 * width, 0.1 * height, 0.9 * width, 0.85 * height)

    def official(points: list, mask_input: np.ndarray | None, multimask: bool, with_box: bool = False) -> tuple:
        with torch.no_grad():
            return side.official.predict(
                point_coords=np.array([p for p, _ in points]), point_labels=np.array([label for _, label in points]),
                box=np.array(box) if with_box else None,
                mask_input=None if mask_input is None else mask_input[None], multimask_output=multimask)

    def check(expected: tuple, answer) -> None:
        masks, scores, _ = expected
        assert masks.any(axis=(-2, -1)).any(), "the official masks are all empty: this step compares nothing"
        assert answer.masks.masks.shape == masks.shape and answer.decoded
        ious = [iou(masks[k], answer.masks.masks[k]) for k in range(len(masks))]
        assert min(ious) >= MASK_IOU_MIN, f"mask IoU {ious}"
        assert np.abs(scores - answer.masks.predicted_iou).max() <= SCORE_DIFF_MAX

    with harness.client.interact(side.image_id, timeout_s=120) as session:
        session.add_point(*clicks[0][0], foreground=bool(clicks[0][1]))
        first = official(clicks[:1], None, True)
        answer = session.answer()
        check(first, answer)
        best = int(np.argmax(first[1]))
        assert answer.chosen == best
        feedback = first[2][best]
        for k in (2, 3):  # each later click: single mask, the previous answer's logits fed back
            session.add_point(*clicks[k - 1][0], foreground=bool(clicks[k - 1][1]))
            expected = official(clicks[:k], feedback, False)
            check(expected, session.answer())
            feedback = expected[2][0]
        for _ in range(2):  # back to the first click's state, answered from the history
            session.undo()
            assert not session.answer().decoded
        other = next(k for k in range(3) if k != best)
        session.choose_mask(other + 1)  # multimask token = index + 1
        assert session.answer().chosen == other
        session.add_point(*clicks[1][0], foreground=bool(clicks[1][1]))
        chosen_then = official(clicks[:2], first[2][other], False)
        check(chosen_then, session.answer())
        session.set_box(*box)
        check(official(clicks[:2], chosen_then[2][0], False, with_box=True), session.answer())
        assert not session.superseded  # each event was answered before the next was sent
