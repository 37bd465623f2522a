"""``samserve.v1.SegmentAnything``: the RPC methods, and nothing else.

Each method validates its request (:mod:`samserve.transport.convert`), takes the image's embedding from the served
model's
embedder (:mod:`samserve.cache.embedder`), runs the decoder path (:mod:`samserve.vision.segmentation`,
:mod:`samserve.vision.amg`) and
answers. Errors are raised as :mod:`samserve.core.errors`; status codes, metrics and request ids are the interceptors'
(:mod:`samserve.transport.interceptors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2

from samserve.cache.embedder import ImageRef
from samserve.core import metrics, model_spec
from samserve.core.api import pb, pb_grpc
from samserve.core.embedding import CropBox, EmbeddedImage
from samserve.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from samserve.core.settings import CacheScope, GatewaySettings
from samserve.security import quotas
from samserve.transport import call_context, convert, interact
from samserve.transport.model_watcher import ModelWatcher
from samserve.triton.models import TritonSam
from samserve.vision import amg, client_decoder, interaction, processing, segmentation


class SegmentAnythingServicer(pb_grpc.SegmentAnythingServicer):
    def __init__(self, settings: GatewaySettings, triton: TritonSam, watcher: ModelWatcher) -> None:
        self.settings = settings
        self.triton = triton
        self.watcher = watcher
        self.cache_scope = settings.effective_cache_scope
        self.decoders = client_decoder.DecoderFiles(settings.client_decoder_dir)
        self.sessions = interact.SessionSlots(settings)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The call's remaining time, bounded by ``triton_timeout_s``: every Triton call of the RPC gets it."""
        remaining = context.time_remaining()
        return self.settings.triton_timeout_s if remaining is None else min(remaining, self.settings.triton_timeout_s)

    def _scope(self) -> str:
        """The cache scope of the call: "" (shared) or its tenant's."""
        return "" if self.cache_scope is CacheScope.SHARED else f"tenant={call_context.tenant.get()}"

    def _image(self, request: Any) -> ImageRef:
        """The image of a request with ``oneof image {image_bytes, image_id}``."""
        which = request.WhichOneof("image")
        if which == "image_bytes":
            return ImageRef.from_bytes(request.image_bytes, self.settings.max_image_pixels, field="image_bytes",
                                       scope=self._scope())
        if which == "image_id":
            return ImageRef.from_id(request.image_id, self.settings.max_image_pixels, scope=self._scope())
        raise InvalidArgument("set image_bytes or image_id", field="image")

    def _check_mask_pixels(self, prompts: Any, original_hw: tuple[int, int], num_mask_tokens: int) -> None:
        """ResourceExhausted when making the answer's full-size masks is more work than ``max_segment_mask_pixels``
        (a 1 KB JPEG may declare 64 M pixels, times 3 masks times 256 prompts: many minutes of CPU)."""
        masks = sum(processing.masks_returned(p.multimask_output, num_mask_tokens) for p in prompts)
        pixels = masks * original_hw[0] * original_hw[1]
        if pixels > self.settings.max_segment_mask_pixels:
            raise ResourceExhausted(
                f"{masks} masks of {original_hw[1]}x{original_hw[0]} pixels are {pixels} mask pixels, over the limit "
                f"of {self.settings.max_segment_mask_pixels} per request (SAMSERVE_MAX_SEGMENT_MASK_PIXELS): send "
                "fewer prompts per request, or single-mask prompts", quota="max_segment_mask_pixels")

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        model = self.watcher.current()
        image = ImageRef.from_bytes(request.image, self.settings.max_image_pixels, scope=self._scope())
        async with model.embedder.embedded(image, timeout_s=self._timeout(context)) as (embedded, cached):
            height, width = embedded.original_size
        return pb.EmbedResponse(image_id=image.image_id, width=width, height=height, cached=cached,
                                model_id=model.meta.model_id)

    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        model = self.watcher.current()
        if not request.prompts:
            raise InvalidArgument("a Segment request needs at least one prompt", field="prompts")
        if len(request.prompts) > self.settings.max_prompts:
            raise InvalidArgument(f"{len(request.prompts)} prompts; the limit is {self.settings.max_prompts}",
                                  field="prompts")
        encoding = convert.MaskEncoding.of(request)
        quotas.charge(quotas.Limit.DECODER_PROMPTS, len(request.prompts))
        budget = convert.ResponseBudget(self.settings.max_response_bytes)
        if request.return_low_res_logits:  # known before any work: 4 bytes per logit of each mask returned
            masks = sum(processing.masks_returned(p.multimask_output, model.meta.num_mask_tokens)
                        for p in request.prompts)
            budget.spend(masks * 4 * math.prod(model.meta.low_res_mask_size))
        image = self._image(request)
        timeout = self._timeout(context)
        async with model.embedder.embedded(image, timeout_s=timeout) as (embedded, cached):
            original = embedded.original_size
            self._check_mask_pixels(request.prompts, original, model.meta.num_mask_tokens)
            prompts = [
                convert.prompt_from_proto(p, i, original, model.meta, self.settings.max_points_per_prompt)
                for i, p in enumerate(request.prompts)
            ]
            answers = await segmentation.segment_each(
                self.triton, model.meta, embedded, prompts, convert.mask_encoder(encoding, budget),
                timeout, keep_logits=request.return_low_res_logits)
        return pb.SegmentResponse(
            image_id=image.image_id, width=original[1], height=original[0], cached=cached,
            model_id=model.meta.model_id, results=convert.results_to_proto(answers),
        )

    async def GenerateMasks(
        self, request: pb.GenerateMasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateMasksResponse:
        model = self.watcher.current()
        params = convert.amg_params_from_proto(request)
        params.validate(self.settings.max_generate_points, self.settings.max_generate_points_per_batch)
        encoding = convert.MaskEncoding.of(request)
        planned = params.decoder_prompts()
        if planned > self.settings.max_generate_decoder_prompts:
            raise ResourceExhausted(
                f"these parameters make {planned} decoder prompts (grid points x crops); the limit per request is "
                f"{self.settings.max_generate_decoder_prompts} (SAMSERVE_MAX_GENERATE_DECODER_PROMPTS): lower "
                "points_per_side or crop_n_layers", quota="max_generate_decoder_prompts")
        quotas.charge(quotas.Limit.DECODER_PROMPTS, planned)
        image = self._image(request)
        image.keep_pixels = params.crop_n_layers > 0  # crops are encoded from them (sent, or kept for the id)
        timeout = self._timeout(context)
        encoded_any = False

        async with model.embedder.embedded(image, timeout_s=timeout) as (whole, cached):
            original = whole.original_size
            encoded_any |= not cached

            @contextlib.asynccontextmanager
            async def crop_embedding(crop: CropBox) -> AsyncIterator[EmbeddedImage]:
                nonlocal encoded_any
                if crop == (0, 0, original[1], original[0]):  # the whole image: already held for this request
                    yield whole
                    return
                async with model.embedder.embedded(image, crop, timeout) as (embedded, hit):
                    encoded_any |= not hit
                    yield embedded

            async def decode(
                embedded: EmbeddedImage, batch: processing.DecoderBatch
            ) -> tuple[np.ndarray, np.ndarray]:
                return await self.triton.decode(embedded, batch, timeout)

            generator = amg.MaskGenerator(params, model.meta, decode, crop_embedding,
                                          self.settings.generate_decoder_calls_in_flight)
            masks = await generator.generate(original)
        metrics.GENERATED_MASKS.observe(len(masks))
        metrics.GENERATE_POINTS.inc(generator.progress.points)
        records = await asyncio.get_running_loop().run_in_executor(
            segmentation.POSTPROCESS_POOL, convert.generated_masks_to_proto, masks, original, encoding
        )
        return pb.GenerateMasksResponse(
            image_id=image.image_id, width=original[1], height=original[0], cached=not encoded_any,
            model_id=model.meta.model_id, masks=records, crops=generator.progress.crops,
            points=generator.progress.points,
        )

    async def Interact(
        self, requests: AsyncIterator[pb.InteractRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InteractResponse]:
        idle_s = self.settings.interact_idle_timeout_s
        opening = interact.check_open(await interact.next_message(requests, idle_s))
        model = self.watcher.current()
        encoding = convert.MaskEncoding.of(opening)
        image = self._image(opening)
        with self.sessions.slot(call_context.tenant.get()):
            async with model.embedder.embedded(image, timeout_s=self._timeout(context)) as (embedded, cached):
                original = embedded.original_size
            yield pb.InteractResponse(opened=pb.InteractOpened(
                image_id=image.image_id, width=original[1], height=original[0], cached=cached,
                model_id=model.meta.model_id))
            # Later decodes find the embedding by id (the image store keeps the bytes): the session holds neither.
            image = ImageRef.from_id(image.image_id, self.settings.max_image_pixels, scope=self._scope())

            async def decode(prompt: processing.Prompt) -> interaction.Decoded[pb.Mask]:
                if self.watcher.current().meta.model_id != model.meta.model_id:
                    raise Unavailable(f"the served model changed from {model.meta.model_id}: the session's masks "
                                      "belong to the old one; open a new session")
                quotas.charge(quotas.Limit.DECODER_PROMPTS, 1)
                self._check_mask_pixels([prompt], original, model.meta.num_mask_tokens)
                timeout = self._timeout(context)
                finish = convert.mask_encoder(encoding, convert.ResponseBudget(self.settings.max_response_bytes))
                async with model.embedder.embedded(image, timeout_s=timeout) as (embedded, _):
                    [answer] = await segmentation.segment_each(self.triton, model.meta, embedded, [prompt], finish,
                                                               timeout)
                return convert.decoded_from_answer(answer)

            session: interaction.Session[pb.Mask] = interaction.Session(
                self.settings.max_points_per_prompt, self.settings.interact_max_history, model.meta.num_mask_tokens)
            responses = interact.run_session(
                session, requests, lambda message: convert.event_from_proto(message, original), decode,
                convert.interact_answer, convert.interact_superseded, idle_s)
            async for response in responses:
                yield response

    async def GetEmbedding(
        self, request: pb.GetEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEmbeddingResponse:
        model = self.watcher.current()
        image = self._image(request)
        async with model.embedder.embedded(image, timeout_s=self._timeout(context)) as (embedded, cached):
            shape, data = client_decoder.embedding_bytes(embedded.embedding)
            (height, width), (input_height, input_width) = embedded.original_size, embedded.input_size
        return pb.GetEmbeddingResponse(
            image_id=image.image_id, width=width, height=height, cached=cached, model_id=model.meta.model_id,
            weights_sha256=model.meta.weights_sha256, image_size=model.meta.image_size, input_width=input_width,
            input_height=input_height,
            embedding=pb.Embedding(layout_version=client_decoder.EMBEDDING_LAYOUT_VERSION,
                                   dtype=client_decoder.EMBEDDING_DTYPE, shape=shape, data=data),
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        meta = self.watcher.current().meta
        info = pb.ModelInfo(
            model_id=meta.model_id, variant=meta.variant, weights_sha256=meta.weights_sha256,
            image_size=meta.image_size, embedding_shape=meta.embedding_shape,
            low_res_mask_size=meta.low_res_mask_size, num_mask_tokens=meta.num_mask_tokens,
            mask_threshold=meta.mask_threshold, embedding_layout_version=client_decoder.EMBEDDING_LAYOUT_VERSION,
            preprocessing_version=meta.preprocessing_version,
        )
        decoder = await asyncio.to_thread(self.decoders.for_model, meta)
        if decoder is not None:
            info.decoder.CopyFrom(pb.DecoderInfo(
                url=f"/v1/models/{meta.weights_sha256}/{model_spec.DECODER_FILE}", sha256=decoder.sha256,
                size_bytes=len(decoder.data), input_names=model_spec.DECODER_INPUTS,
                output_names=model_spec.DECODER_OUTPUTS,
            ))
        return info

    async def GetDecoder(
        self, request: pb.GetDecoderRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        meta = self.watcher.current().meta
        if request.weights_sha256 != meta.weights_sha256:
            raise NotFound(f"weights {request.weights_sha256!r} are not the served model's ({meta.weights_sha256}): "
                           "call GetModel again")
        decoder = await asyncio.to_thread(self.decoders.for_model, meta)
        if decoder is None:
            raise NotFound("this gateway gives no decoder to clients (SAMSERVE_CLIENT_DECODER_DIR is not set, or "
                           "does not hold the served model)")
        return httpbody_pb2.HttpBody(content_type="application/octet-stream", data=decoder.data)
