"""Label Studio's interactive context (the regions a person just drew with a smart control) as one Segment
prompt.

Each region of ``context.result`` is in percent of the image (0-100). A ``keypointlabels`` region is a point,
foreground unless its top-level ``is_positive`` is false (the editor sends false for a click with Alt held); a
``rectanglelabels`` region is the box (x, y, width, height in percent; the last one drawn wins, SAM takes one box).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from samserve.client.typed_client import BACKGROUND, FOREGROUND, PromptSpec
from samserve.labelstudio.config import PROMPT_TAGS, LabelingConfig


class BadContext(ValueError):
    """The context holds a region the backend cannot turn into a prompt; the message says which."""


@dataclasses.dataclass(frozen=True)
class ContextPrompt:
    prompt: PromptSpec
    """In image pixels. Multimask for a single click (SAM's advice for an ambiguous prompt), one mask otherwise."""
    label: str | None
    """The label the person drew the last region with, if any."""


def _percent(value: dict[str, Any], key: str, region: int) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise BadContext(f"context.result[{region}].value.{key}: a finite number in percent, got {number!r}")
    return float(number)


def prompt_from_context(context: dict[str, Any], config: LabelingConfig, width: int, height: int) -> ContextPrompt:
    """The prompt of ``context`` (Label Studio's ``params.context``) on a ``width`` x ``height`` image."""
    regions = context.get("result")
    if not isinstance(regions, list) or not regions:
        raise BadContext("context.result: a non-empty list of regions")
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box: tuple[float, float, float, float] | None = None
    label: str | None = None
    for index, region in enumerate(regions):
        kind, value = region.get("type"), region.get("value")
        if kind not in PROMPT_TAGS.values() or not isinstance(value, dict):
            raise BadContext(f"context.result[{index}]: type {kind!r} is not a prompt (keypointlabels or "
                             "rectanglelabels with a value)")
        if region.get("from_name") not in config.prompts:
            raise BadContext(f"context.result[{index}]: from_name {region.get('from_name')!r} is no KeyPointLabels "
                             "or RectangleLabels of the labeling config")
        x = _percent(value, "x", index) * width / 100
        y = _percent(value, "y", index) * height / 100
        if kind == "keypointlabels":
            points.append((x, y))
            labels.append(FOREGROUND if region.get("is_positive", True) is not False else BACKGROUND)
        else:
            box = (x, y, x + _percent(value, "width", index) * width / 100,
                   y + _percent(value, "height", index) * height / 100)
        names = value.get(kind)
        if isinstance(names, list) and names and isinstance(names[0], str):
            label = names[0]
    single_click = len(points) == 1 and box is None
    return ContextPrompt(PromptSpec(points=points, labels=labels, box=box, multimask_output=single_click), label)
