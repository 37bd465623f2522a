"""Label Studio's labeling config (its XML ``<View>``), read for what the backend needs: the image, the control
that asks (KeyPointLabels, RectangleLabels) and the control that answers (BrushLabels or PolygonLabels).

Anything else that labels the image, or another object to label, makes the config unsupported, and the error
names that tag: the backend cannot answer it, and saying so at ``/setup`` beats an empty answer later.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ElementTree
from typing import Literal

MAX_CONFIG_BYTES = 1 << 20

PROMPT_TAGS = {"KeyPointLabels": "keypointlabels", "RectangleLabels": "rectanglelabels"}
"""The controls whose regions become prompts: tag -> the result ``type`` Label Studio sends."""
ANSWER_TAGS: dict[str, Literal["brushlabels", "polygonlabels"]] = {
    "BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
"""The controls the backend answers with: tag -> the result ``type`` it writes."""
OBJECT_TAGS = {"Image", "Text", "HyperText", "Audio", "AudioPlus", "Video", "TimeSeries", "Paragraphs", "Table",
               "Pdf", "List", "Ranker", "ParagraphLabels"}
"""Tags that hold the task's data (Label Studio's object tags)."""


class UnsupportedConfig(ValueError):
    """The labeling config asks for something the backend cannot answer; the message names the tag."""


@dataclasses.dataclass(frozen=True)
class Control:
    tag: str
    """The XML tag, e.g. ``BrushLabels``."""
    name: str
    labels: tuple[str, ...]
    """Its ``<Label value>`` children, in order."""

    def describe(self) -> str:
        return f'<{self.tag} name="{self.name}">'


@dataclasses.dataclass(frozen=True)
class LabelingConfig:
    image_name: str
    """The ``<Image name>``: the ``to_name`` of every region."""
    image_key: str
    """The task data key of the image (``value="$image"`` -> ``image``)."""
    answer: Control
    """The first BrushLabels or PolygonLabels on the image: what the backend answers with."""
    prompts: dict[str, Control]
    """KeyPointLabels and RectangleLabels on the image, by name."""

    @property
    def answer_type(self) -> Literal["brushlabels", "polygonlabels"]:
        return ANSWER_TAGS[self.answer.tag]

    def label_for(self, asked: str | None) -> str:
        """The label of an answer: the prompt's own when the answering control has it, else its first."""
        return asked if asked in self.answer.labels else self.answer.labels[0]


def _describe(element: ElementTree.Element) -> str:
    name = element.get("name")
    return f'<{element.tag} name="{name}">' if name else f"<{element.tag}>"


def parse(schema: str) -> LabelingConfig:
    """The parts of ``schema`` the backend uses; :class:`UnsupportedConfig` naming the tag when it cannot
    answer it."""
    if len(schema.encode()) > MAX_CONFIG_BYTES:
        raise UnsupportedConfig(f"labeling config of more than {MAX_CONFIG_BYTES} bytes")
    try:
        root = ElementTree.fromstring(schema)
    except ElementTree.ParseError as error:
        raise UnsupportedConfig(f"labeling config is not XML: {error}") from None
    elements = list(root.iter())
    objects = [e for e in elements if e.tag in OBJECT_TAGS]
    images = [e for e in objects if e.tag == "Image"]
    if not images:
        raise UnsupportedConfig("labeling config has no <Image>: samserve segments images")
    for element in objects:
        if element is not images[0]:
            raise UnsupportedConfig(f"{_describe(element)}: samserve answers one <Image> per task")
    image = images[0]
    image_name, value = image.get("name", ""), image.get("value", "")
    if not image_name or not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfig(f'{_describe(image)} needs a name and value="$<task data key>"')
    answers: list[Control] = []
    prompts: dict[str, Control] = {}
    for element in elements:
        if element.get("toName") is None:
            continue  # layout and labels: View, Header, Label, Choice, ...
        if element.tag not in PROMPT_TAGS and element.tag not in ANSWER_TAGS:
            raise UnsupportedConfig(
                f"{_describe(element)} is not supported: samserve answers <BrushLabels> or <PolygonLabels> from "
                "<KeyPointLabels> and <RectangleLabels> prompts")
        if element.get("toName") != image_name:
            raise UnsupportedConfig(f'{_describe(element)}: toName must be the image, "{image_name}"')
        labels = tuple(label.get("value", "") for label in element.iter("Label"))
        control = Control(element.tag, element.get("name", ""), labels)
        if not control.name:
            raise UnsupportedConfig(f"<{element.tag}> needs a name")
        if element.tag in ANSWER_TAGS:
            if not labels:
                raise UnsupportedConfig(f"{control.describe()} needs at least one <Label>")
            answers.append(control)
        else:
            prompts[control.name] = control
    if not answers:
        raise UnsupportedConfig(f'no <BrushLabels> or <PolygonLabels> on <Image name="{image_name}">: samserve '
                                "answers with one of them")
    return LabelingConfig(image_name, value[1:], answers[0], prompts)
