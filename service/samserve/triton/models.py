"""Async client of the ``sam_encoder`` and ``sam_decoder`` Triton models (tensor contract: :mod:`model_spec`).

Nothing here is fixed to one serving target: the request layout (a leading batch axis or not, each tensor's
rank) and dtypes come from the served models' configs (:class:`ModelLayout`), the sizes from their metadata, and
the way tensors travel from a :mod:`samserve.triton.transports` object. Triton's failures leave this module as
:mod:`samserve.core.errors` (:data:`TRITON_STATUS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from samserve.core import metrics, model_spec, service_config
from samserve.core.embedding import EmbeddedImage, Embedding
from samserve.core.errors import DeadlineExceeded, Internal, ResourceExhausted, SamServeError, Unavailable
from samserve.core.settings import TransportName
from samserve.triton.transports import OutputSpec, create_transport, infer_inline
from samserve.vision.processing import DecoderBatch, PreparedImage


class ModelMismatchError(RuntimeError):
    """What Triton serves is not something this gateway can serve: encoder and decoder exported from different
    models, metadata of an unknown precision, or TensorRT engines that disagree."""


TENSORRT_PLATFORM = "tensorrt_plan"


def engine_records(config: Mapping[str, Any]) -> tuple[model_spec.EngineRecord, ...]:
    """The TensorRT engines recorded in one model config (``samserve_engine_cc*`` parameters), by parameter name."""
    parameters = config.get("parameters", {})
    return tuple(
        model_spec.EngineRecord.from_json(parameters[name]["string_value"])
        for name in sorted(parameters) if name.startswith(model_spec.ENGINE_PARAMETER_PREFIX)
    )


def check_engines(configs: Mapping[str, Mapping[str, Any]]) -> tuple[model_spec.EngineRecord, ...]:
    """The engines of the served models (model name -> config JSON); ModelMismatchError when a TensorRT model has
    none recorded, or when encoder and decoder plans for one GPU architecture come from different TensorRT
    versions (the engine build ran twice, half-way)."""
    engines: dict[str, tuple[model_spec.EngineRecord, ...]] = {}
    for model, config in configs.items():
        engines[model] = engine_records(config)
        if config.get("platform") == TENSORRT_PLATFORM and not engines[model]:
            raise ModelMismatchError(
                f"{model} is a TensorRT plan but its config records no engine: build the engines "
                "(`samserve-build tensorrt`, or the chart's tensorrtEngines Job) before starting Triton")
    versions: dict[str, set[str]] = {}
    for record in (record for records in engines.values() for record in records):
        versions.setdefault(record.compute_capability, set()).add(record.tensorrt_version)
    for capability, found in versions.items():
        if len(found) > 1:
            raise ModelMismatchError(f"the plans for compute capability {capability} were built with different "
                                     f"TensorRT versions {sorted(found)}: rebuild both engines")
    return tuple(record for records in engines.values() for record in records)


TRITON_STATUS: dict[str, type[SamServeError]] = {
    "StatusCode.UNAVAILABLE": Unavailable,  # unreachable, or the model is not ready
    "StatusCode.NOT_FOUND": Unavailable,  # the model is not loaded
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.RESOURCE_EXHAUSTED": ResourceExhausted,
}
"""Triton's gRPC status -> domain error; any other status is Internal (the gateway validates every request, so a
request Triton rejects is the service's fault)."""


@contextlib.contextmanager
def triton_errors() -> Iterator[None]:
    """Turn a Triton client failure into the matching :mod:`samserve.core.errors` error."""
    try:
        yield
    except InferenceServerException as error:
        kind = TRITON_STATUS.get(str(error.status()), Internal)
        raise kind(f"Triton: {error.message() or error}") from error


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """How one served model takes its tensors, read from its Triton model config."""

    batched: bool
    """``max_batch_size`` > 0: every tensor carries a leading batch axis (one item per image here)."""
    ranks: Mapping[str, int]
    """Rank of each tensor per batch item (``dims`` in the config)."""
    dtypes: Mapping[str, np.dtype]
    """Declared dtype of each input and output."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelLayout:
        """From Triton's model config as JSON (``get_model_config(..., as_json=True)["config"]``)."""
        tensors = [*config.get("input", []), *config.get("output", [])]
        return cls(
            batched=int(config.get("max_batch_size", 0)) > 0,
            ranks={t["name"]: len(t.get("dims", [])) for t in tensors},
            dtypes={t["name"]: np.dtype(triton_to_np_dtype(t["data_type"].removeprefix("TYPE_"))) for t in tensors},
        )

    def wire_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The request shape of one item given its array shape: leading unit axes up to the declared rank, then
        the batch axis when the model batches."""
        item = (1,) * max(self.ranks[name] - len(shape), 0) + tuple(shape)
        return (1, *item) if self.batched else item

    def declare(self, name: str, array: np.ndarray) -> tuple[grpcclient.InferInput, np.ndarray]:
        """(request tensor without data, ``array`` in the declared dtype and the wire shape, C-contiguous)."""
        data = np.ascontiguousarray(array, dtype=self.dtypes[name]).reshape(self.wire_shape(name, array.shape))
        return grpcclient.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype)), data

    def tensor(self, name: str, array: np.ndarray) -> grpcclient.InferInput:
        """A request tensor holding ``array`` inline."""
        tensor, data = self.declare(name, array)
        tensor.set_data_from_numpy(data)
        return tensor

    def output(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype]:
        return self.wire_shape(name, shape), self.dtypes[name]

    def unwrap(self, array: np.ndarray) -> np.ndarray:
        """One item's output as float32 without the batch axis."""
        return (array[0] if self.batched else array).astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class ServedModels:
    """What the gateway knows of the two served models: the shared metadata and each model's layout."""

    meta: model_spec.ModelMetadata
    encoder: ModelLayout
    decoder: ModelLayout
    engines: tuple[model_spec.EngineRecord, ...] = ()
    """TensorRT plans behind the two models (gpu-tensorrt target); empty for the other targets."""


RECONNECT_BACKOFF_MS = (250, 1000)
"""(initial, max) wait between reconnection attempts to Triton. gRPC's defaults (1 s growing 1.6x up to 120 s) left
a restarted Triton unused for seconds after it was ready, and for longer after a longer outage (the chaos soak saw
the gateways come back 2.5 s after Triton; the waits grow with the outage); a loopback or in-cluster connection
attempt per second costs nothing."""


def channel_args() -> list[tuple[str, int | str]]:
    """tritonclient's own channel options (message sizes, keepalive) plus :data:`RECONNECT_BACKOFF_MS` and round
    robin (:func:`samserve.core.service_config.round_robin_options`): a ``dns:///`` name of a headless Service of Triton
    pods spreads the calls over the pods; one address (Triton in the gateway's pod) works as with gRPC's default."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        *service_config.round_robin_options(),
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


class RenewingClient(grpcclient.InferenceServerClient):
    """tritonclient's asyncio client on a :class:`samserve.core.service_config.AgingChannel`: once the channel is
    ``max_age_s`` old (0 = never), the next call gets a new one, which resolves the target again.

    Why from this side: Triton pods added by a scale-up behind a ``dns:///`` name make no connection fail, and
    Triton has no setting that sends GOAWAY on old connections (the gateway's own ``max_connection_age_s`` does that
    for its clients), so gRPC would never resolve the name again and the new pods would get no calls. Calls in
    flight on the old channel finish (for up to ``drain_s``).

    Works on two attributes of tritonclient's client: every call reads ``_client_stub`` (here a property that
    renews first), built on ``_channel``; tests/integration/test_multihost.py fails if a new Triton gets no calls."""

    _channel: grpc.aio.Channel
    _stub: service_pb2_grpc.GRPCInferenceServiceStub

    def __init__(self, url: str, channel_args: list[tuple[str, int | str]], max_age_s: float, drain_s: float) -> None:
        super().__init__(url, channel_args=channel_args)
        self._channels = service_config.AgingChannel(
            lambda: grpc.aio.insecure_channel(url, options=channel_args), max_age_s, drain_s, first=self._channel)

    @property
    def renewals(self) -> int:
        return self._channels.renewals

    @property
    def _client_stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        channel = self._channels.get()
        if channel is not self._channel:
            self._channel = channel
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return self._stub

    @_client_stub.setter
    def _client_stub(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub  # tritonclient's __init__ sets it

    async def close(self) -> None:
        """Close the channel (:meth:`samserve.core.service_config.AgingChannel.close`)."""
        await self._channels.close()
        await super().close()


class TritonSam:
    """Encoder and decoder calls on Triton (gRPC): one server, or several behind one ``dns:///`` name (round robin,
    :class:`RenewingClient`; shared-memory transports need one server on this host). Also the cache's
    :class:`samserve.cache.embedding_cache.Stager`."""

    def __init__(self, url: str, embedding_transport: TransportName | str = TransportName.SHM,
                 channel_max_age_s: float = 0.0, channel_drain_s: float = 600.0) -> None:
        self.url = url
        self.client = RenewingClient(url, channel_args(), channel_max_age_s, channel_drain_s)
        self.transport = create_transport(embedding_transport, self.client)
        self._served: ServedModels | None = None

    @property
    def served(self) -> ServedModels:
        if self._served is None:
            raise Unavailable("the served models' configs have not been read yet")
        return self._served

    async def metadata(self) -> model_spec.ModelMetadata:
        """Read both model configs (metadata, layout, engines); their metadata must agree and be servable
        (ModelMismatchError says why not). Call after every (re)load."""
        configs = {}
        with triton_errors():
            for model in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL):
                configs[model] = (await self.client.get_model_config(model, as_json=True))["config"]
        metas = [model_spec.ModelMetadata.from_json(config["parameters"][model_spec.METADATA_PARAMETER]["string_value"])
                 for config in configs.values()]
        if metas[0] != metas[1]:
            raise ModelMismatchError(f"encoder {metas[0].model_id} and decoder {metas[1].model_id} differ")
        reason = metas[0].unservable_reason()
        if reason is not None:
            raise ModelMismatchError(reason)
        engines = check_engines(configs)
        self._served = ServedModels(metas[0], ModelLayout.from_config(configs[model_spec.ENCODER_MODEL]),
                                    ModelLayout.from_config(configs[model_spec.DECODER_MODEL]), engines)
        return metas[0]

    async def encode(self, image: PreparedImage, timeout_s: float | None = None) -> Embedding:
        """The embedding of one prepared image (float32 C x h x w). ``timeout_s`` bounds the call."""
        layout = self.served.encoder
        inputs = [
            layout.tensor(model_spec.ENC_IMAGE, image.padded),
            layout.tensor(model_spec.ENC_INPUT_SIZE, np.asarray(image.input_size, dtype=np.int64)),
        ]
        with metrics.TRITON_CALL.labels(model_spec.ENCODER_MODEL).time(), triton_errors():
            result = await infer_inline(self.client, model_spec.ENCODER_MODEL, inputs, model_spec.ENCODER_OUTPUTS,
                                        timeout_s)
        return Embedding(layout.unwrap(result[model_spec.ENC_EMBEDDING]), image.original_size, image.input_size)

    # -- the cache's Stager ------------------------------------------------------------------------------------
    async def stage(self, embedding: Embedding) -> EmbeddedImage:
        """``embedding`` in the decoder's input dtype, staged by the transport; undo with :meth:`release`."""
        dtype = self.served.decoder.dtypes[model_spec.DEC_EMBEDDING]
        value = dataclasses.replace(embedding, array=np.ascontiguousarray(embedding.array, dtype=dtype))
        with triton_errors():
            return EmbeddedImage(value, await self.transport.stage(value.array))

    async def release(self, image: EmbeddedImage) -> None:
        await self.transport.release(image.staged)

    # -- decoder ---------------------------------------------------------------------------------------------
    async def decode(
        self, image: EmbeddedImage, batch: DecoderBatch, timeout_s: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode N prompts of one image: (low-res logits float32 N x M x 4h x 4w, predicted IoU float32 N x M)."""
        served = self.served
        layout = served.decoder
        embedding, data = layout.declare(model_spec.DEC_EMBEDDING, image.embedding.array)
        self.transport.attach(embedding, data, image.staged)
        inputs = [
            embedding,
            layout.tensor(model_spec.DEC_POINT_COORDS, batch.point_coords),
            layout.tensor(model_spec.DEC_POINT_LABELS, batch.point_labels),
            layout.tensor(model_spec.DEC_MASK_INPUT, batch.mask_input),
            layout.tensor(model_spec.DEC_HAS_MASK_INPUT, batch.has_mask_input),
        ]
        n, m = len(batch.prompt_indices), served.meta.num_mask_tokens
        outputs: OutputSpec = {
            model_spec.DEC_LOW_RES_MASKS: layout.output(model_spec.DEC_LOW_RES_MASKS,
                                                        (n, m, *served.meta.low_res_mask_size)),
            model_spec.DEC_IOU_PREDICTIONS: layout.output(model_spec.DEC_IOU_PREDICTIONS, (n, m)),
        }
        metrics.DECODER_BATCH_PROMPTS.observe(n)
        with metrics.TRITON_CALL.labels(model_spec.DECODER_MODEL).time(), triton_errors():
            result = await self.transport.infer(model_spec.DECODER_MODEL, inputs, outputs, timeout_s)
        return (layout.unwrap(result[model_spec.DEC_LOW_RES_MASKS]),
                layout.unwrap(result[model_spec.DEC_IOU_PREDICTIONS]))

    async def forget_regions(self) -> None:
        """After a Triton restart (it forgets registered regions): idle output regions are not reused."""
        await self.transport.forget()

    async def models_ready(self) -> bool:
        """Whether Triton is reachable and both SAM models are ready."""
        try:
            return bool(
                await self.client.is_server_ready()
                and await self.client.is_model_ready(model_spec.ENCODER_MODEL)
                and await self.client.is_model_ready(model_spec.DECODER_MODEL)
            )
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    async def unready_reasons(self) -> dict[str, str]:
        """Why the SAM models are not ready, as Triton's repository index says (model -> state and reason, e.g. a
        plan built for another GPU or TensorRT); empty when Triton is unreachable or says nothing."""
        try:
            index = await self.client.get_model_repository_index(as_json=True)
        except Exception:  # noqa: BLE001 - unreachable: nothing to say beyond "not ready"
            return {}
        return {
            entry["name"]: f"{entry.get('state', 'UNKNOWN')}: {entry.get('reason') or 'no reason given'}"
            for entry in index.get("models", [])
            if entry.get("name") in (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)
            and entry.get("state") != "READY"
        }

    async def inference_count(self, model: str) -> int:
        """How many inferences Triton has run for ``model`` (its own statistics)."""
        with triton_errors():
            stats = await self.client.get_inference_statistics(model, as_json=True)
        return sum(int(entry.get("inference_count", 0)) for entry in stats.get("model_stats", []))

    async def close(self) -> None:
        """Release every staged embedding and region, then close the channel."""
        await self.transport.close()
        await self.client.close()
