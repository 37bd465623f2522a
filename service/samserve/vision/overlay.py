"""Draw a mask and its prompt on the image, so a person can see the answer."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

MASK_COLOR = (30, 144, 255)  # RGB
FOREGROUND_COLOR = (0, 200, 0)
BACKGROUND_COLOR = (220, 0, 0)
BOX_COLOR = (255, 200, 0)


def draw_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    points: Sequence[tuple[float, float]] = (),
    foreground: Sequence[bool] = (),
    box: Sequence[float] | None = None,
) -> bytes:
    """PNG bytes: ``image`` (H x W x 3 uint8 RGB) with ``mask`` (H x W bool) tinted and outlined, the prompt
    points (green foreground, red background) and box drawn on top."""
    canvas = image.astype(np.float32)
    canvas[mask] = 0.55 * canvas[mask] + 0.45 * np.array(MASK_COLOR, np.float32)
    canvas = canvas.astype(np.uint8)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, MASK_COLOR, thickness)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), BOX_COLOR, thickness)
    for (x, y), is_foreground in zip(points, foreground, strict=True):
        color = FOREGROUND_COLOR if is_foreground else BACKGROUND_COLOR
        cv2.circle(canvas, (int(round(x)), int(round(y))), 3 * thickness + 2, color, -1)
        cv2.circle(canvas, (int(round(x)), int(round(y))), 3 * thickness + 2, (255, 255, 255), thickness)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
