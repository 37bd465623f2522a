"""The ML backend's work, apart from HTTP: a labeling config checked at ``/setup``; per task at ``/predict``, the
image read, embedded once, and segmented from the person's prompt (interactive) or everything in it
(pre-annotation, when Label Studio sends no context).

Each task is answered on its own: one whose image cannot be read, whose prompt is malformed or that the gateway
refuses gets ``{"task": id, "error": "..."}`` in its place (Label Studio logs it and stores nothing for that task)
while the others get their predictions.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from samserve.client.typed_client import EmbedResult, SamServeClient
from samserve.core.api import pb
from samserve.labelstudio import config as labeling
from samserve.labelstudio.images import ImageSource, ImageUnavailable
from samserve.labelstudio.prompts import BadContext, prompt_from_context
from samserve.labelstudio.regions import brush_region, polygon_regions, prediction
from samserve.labelstudio.settings import LabelStudioSettings
from samserve.vision import polygons

LOG = logging.getLogger(__name__)
T = TypeVar("T")
KNOWN_IMAGES = 256
"""Task images remembered by their reference (path or URL) -> the gateway's image id: a person's next click on
the same task reads nothing from Label Studio and sends no bytes to the gateway."""


class BadRequest(ValueError):
    """The request body is not what Label Studio sends; the message says which part."""


class SamBackend:
    def __init__(self, settings: LabelStudioSettings, client: SamServeClient, images: ImageSource) -> None:
        self.settings, self.client, self.images = settings, client, images
        self.known: collections.OrderedDict[str, EmbedResult] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- the routes' work ------------------------------------------------------------------------------------
    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/setup``: the config must be one the backend answers (:class:`labeling.UnsupportedConfig` if not)."""
        labeling.parse(_field(body, "schema", str))
        return {"model_version": self.settings.model_version}

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/predict``: one answer per task, in order."""
        tasks = _field(body, "tasks", list)
        config = labeling.parse(_field(body, "label_config", str))
        params = body.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        return {"results": [self._answer(task, config, context) for task in tasks]}

    # -- one task --------------------------------------------------------------------------------------------
    def _answer(self, task: Any, config: labeling.LabelingConfig, context: Any) -> dict[str, Any]:
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict) or config.image_key not in data:
                raise BadRequest(f"task has no data.{config.image_key} (the image of the labeling config)")
            reference = data[config.image_key]
            if context:
                return prediction(self._interactive(reference, config, context), self.settings.model_version)
            return prediction(self._everything(reference, config), self.settings.model_version)
        except (ImageUnavailable, BadContext, BadRequest) as error:
            message = str(error)
        except grpc.RpcError as error:
            message = f"gateway: {error.code().name}: {error.details()}"
        LOG.warning("task %s: %s", task_id, message)
        return {"task": task_id, "error": message}

    def _interactive(self, reference: str, config: labeling.LabelingConfig, context: Any) -> list[dict[str, Any]]:
        """The person's prompt: the best of SAM's answers (multimask for a single click)."""
        if not isinstance(context, dict):
            raise BadContext("context: an object with a result list")
        embedded = self._embedded(reference)
        asked = prompt_from_context(context, config, embedded.width, embedded.height)
        polygon = config.answer_type == "polygonlabels"
        answer = self._on_image(reference, lambda image_id: self.client.segment(
            image_id, [asked.prompt], pb.MASK_ENCODING_POLYGON if polygon else pb.MASK_ENCODING_RLE,
            polygon_tolerance_px=self.settings.polygon_tolerance_px))[0]
        best = int(np.argmax(answer.predicted_iou))
        label, score = config.label_for(asked.label), float(answer.predicted_iou[best])
        if polygon:
            assert answer.polygons is not None
            exteriors = polygons.coco_segmentation(answer.polygons[best])
            return polygon_regions(config, exteriors, embedded.width, embedded.height, label, score)
        return [brush_region(config, answer.masks[best], label, score)]

    def _everything(self, reference: str, config: labeling.LabelingConfig) -> list[dict[str, Any]]:
        """No prompt: GenerateMasks (``SAMSERVE_LABELSTUDIO_GENERATE_PARAMS``), each mask a region with the first
        label of the answering control."""
        params: dict[str, Any] = dict(self.settings.generate_params)
        polygon = config.answer_type == "polygonlabels"
        if polygon:
            params["mask_encoding"] = pb.MASK_ENCODING_POLYGON
            if self.settings.polygon_tolerance_px is not None:
                params["polygon_tolerance_px"] = self.settings.polygon_tolerance_px
        generated = self._on_image(reference, lambda image_id: self.client.generate_masks(image_id, **params))
        label = config.answer.labels[0]
        if polygon:
            return [region for a in generated.annotations for region in polygon_regions(
                config, a["segmentation"], generated.width, generated.height, label, a["predicted_iou"])]
        return [brush_region(config, mask, label, a["predicted_iou"])
                for a, mask in zip(generated.annotations, generated.masks(), strict=True)]

    # -- images ----------------------------------------------------------------------------------------------
    def _embedded(self, reference: str, again: bool = False) -> EmbedResult:
        """The gateway's id and size of the task image (read and embedded on first use, or ``again``)."""
        with self._lock:
            known = None if again else self.known.get(reference)
            if known is not None:
                self.known.move_to_end(reference)
                return known
        embedded = self.client.embed(self.images.read(reference))
        with self._lock:
            self.known[reference] = embedded
            while len(self.known) > KNOWN_IMAGES:
                self.known.popitem(last=False)
        return embedded

    def _on_image(self, reference: str, call: Callable[[str], T]) -> T:
        """``call(image_id)``; once more after embedding again when the gateway no longer knows the id."""
        try:
            return call(self._embedded(reference).image_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return call(self._embedded(reference, again=True).image_id)


def _field(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise BadRequest(f"{name}: expected a JSON {kind.__name__}")
    return value
