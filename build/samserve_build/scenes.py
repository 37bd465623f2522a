"""Seeded procedural scenes with exact instance masks: the training and evaluation data of the shipped model.

A scene is a textured background with 2-7 objects drawn one after another: filled polygons, ellipses, stars,
rings and thin bars, each flat, gradient, striped or noise textured. Later objects occlude earlier ones, and some
objects are placed inside an earlier one (a part inside a whole), so one point can mean the part or the whole:
the ambiguity SAM's multimask output exists for. Most objects are medium to large (up to two thirds of the
image across); one in six is small (from about 12 pixels across), and
images are not square.

Every array is NumPy: images H x W x 3 uint8 RGB, masks H x W bool. A scene is a pure function of its seed, so
held-out evaluation scenes come from seeds training never draws (:data:`EVAL_SEED_OFFSET`).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

SHAPES = ("polygon", "ellipse", "star", "ring", "bar")
TEXTURES = ("flat", "gradient", "stripes", "noise")
EVAL_SEED_OFFSET = 1_000_000_000
"""Evaluation scene ``i`` has seed ``EVAL_SEED_OFFSET + i``; training draws seeds below it."""
MIN_VISIBLE_AREA = 64
"""An object whose visible part is smaller than this many pixels is not an instance."""
MIN_VISIBLE_FRACTION = 0.4
"""Nor is an object of which less than this fraction is visible (a scrap of an occluded object)."""
_MIN_COLOR_DISTANCE = 80.0


@dataclasses.dataclass
class Instance:
    """One object as it is seen: ``mask`` H x W bool (visible pixels), ``whole`` H x W bool (the object together
    with the objects nested inside it; equals ``mask`` when nothing is nested or occluding)."""

    shape: str
    mask: np.ndarray
    whole: np.ndarray
    parent: int | None
    """Index of the instance this one is nested in (the part-of relation), or None."""

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclasses.dataclass
class Scene:
    image: np.ndarray
    """H x W x 3 uint8 RGB."""
    instances: list[Instance]
    seed: int


def scene_size(rng: np.random.Generator, min_side: int = 256, max_side: int = 384) -> tuple[int, int]:
    """(height, width): longest side in [min_side, max_side], aspect ratio in [0.6, 1], either orientation."""
    long_side = int(rng.integers(min_side, max_side + 1))
    short_side = int(round(long_side * rng.uniform(0.6, 1.0)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _color(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    for _ in range(50):
        color = rng.uniform(0, 255, size=3)
        if all(np.linalg.norm(color - other) >= _MIN_COLOR_DISTANCE for other in avoid):
            return color
    return color


def _texture(rng: np.random.Generator, kind: str, height: int, width: int, base: np.ndarray) -> np.ndarray:
    """H x W x 3 float32 around ``base`` (its mean stays near ``base``, so contrast rules hold)."""
    if kind == "flat":
        return np.broadcast_to(base.astype(np.float32), (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = (np.cos(angle) * xx + np.sin(angle) * yy)
    if kind == "gradient":
        ramp = (along - along.mean()) / max(float(np.ptp(along)), 1.0)
        shift = rng.uniform(-60, 60, size=3).astype(np.float32)
        return base.astype(np.float32) + ramp[..., None] * shift
    if kind == "stripes":
        period = rng.uniform(4, 16)
        wave = np.sign(np.sin(2 * np.pi * along / period))
        return base.astype(np.float32) + wave[..., None] * rng.uniform(10, 25)
    coarse = rng.normal(0, 1, size=(max(height // 4, 1), max(width // 4, 1), 3)).astype(np.float32)
    noise = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return base.astype(np.float32) + noise * rng.uniform(8, 20)


def _polygon_points(rng: np.random.Generator, shape: str, cx: float, cy: float, radius: float) -> list[np.ndarray]:
    """Outline(s) of one shape as N x 2 (x, y) float arrays; a ring returns (outer, inner)."""
    rotation = rng.uniform(0, 2 * np.pi)
    if shape == "polygon":
        count = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=count))
        radii = radius * rng.uniform(0.6, 1.0, size=count)
    elif shape == "star":
        count = int(rng.integers(4, 8))
        angles = np.arange(2 * count) * np.pi / count + rotation
        radii = np.where(np.arange(2 * count) % 2 == 0, radius, radius * rng.uniform(0.35, 0.6))
    elif shape in ("ellipse", "ring"):
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        aspect = rng.uniform(0.5, 1.0)
        local = np.stack([radius * np.cos(angles), radius * aspect * np.sin(angles)], axis=1)
        outer = _rotate(local, rotation) + (cx, cy)
        if shape == "ellipse":
            return [outer]
        return [outer, _rotate(local * rng.uniform(0.45, 0.7), rotation) + (cx, cy)]
    else:  # bar: a thin rotated rectangle
        half_width = rng.uniform(2.5, 6.0)
        local = np.array([[-radius, -half_width], [radius, -half_width], [radius, half_width], [-radius, half_width]])
        return [_rotate(local, rotation) + (cx, cy)]
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return [points + (cx, cy)]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _raster(outlines: list[np.ndarray], height: int, width: int) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    scaled = [np.round(outline * 16).astype(np.int32) for outline in outlines]   # 4 bits of sub-pixel precision
    cv2.fillPoly(canvas, scaled[:1], (1,), lineType=cv2.LINE_8, shift=4)
    if len(scaled) > 1:
        cv2.fillPoly(canvas, scaled[1:], (0,), lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def generate_scene(seed: int, size: tuple[int, int] | None = None, max_objects: int = 7) -> Scene:
    """The scene of ``seed`` (H x W from ``size`` or drawn by :func:`scene_size`)."""
    rng = np.random.default_rng(seed)
    height, width = size if size is not None else scene_size(rng)
    short_side = min(height, width)
    background_color = rng.uniform(0, 255, size=3)
    image = _texture(rng, str(rng.choice(TEXTURES)), height, width, background_color)
    drawn: list[tuple[str, np.ndarray, int | None]] = []   # (shape, full mask, parent index)
    colors: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        shape = str(rng.choice(SHAPES, p=(0.3, 0.25, 0.2, 0.12, 0.13)))
        parent = None
        if drawn and rng.random() < 0.35:
            parent = _nest_site(rng, drawn)
        if parent is not None:
            parent_index, cx, cy, room = parent
            radius = room * rng.uniform(0.45, 0.85)
            avoid = [colors[parent_index]]
        else:
            parent_index = None
            # mostly medium and large objects, one in six small
            low, high = (0.03, 0.09) if rng.random() < 1 / 6 else (0.09, 0.35)
            radius = short_side * float(np.exp(rng.uniform(np.log(low), np.log(high))))
            if shape == "bar":
                radius = short_side * rng.uniform(0.12, 0.35)
            cx, cy = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
            avoid = [background_color]
        mask = _raster(_polygon_points(rng, shape, cx, cy, radius), height, width)
        if mask.sum() < MIN_VISIBLE_AREA:
            continue
        color = _color(rng, avoid)
        texture = _texture(rng, str(rng.choice(TEXTURES, p=(0.4, 0.25, 0.15, 0.2))), height, width, color)
        image[mask] = texture[mask]
        drawn.append((shape, mask, parent_index))
        colors.append(color)
    image += rng.normal(0, rng.uniform(0, 6), size=image.shape).astype(np.float32)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), _instances(drawn), seed)


def _nest_site(rng: np.random.Generator, drawn: list[tuple[str, np.ndarray, int | None]]
               ) -> tuple[int, float, float, float] | None:
    """A place deep inside an earlier object: (its index, x, y, free radius), or None if none is roomy."""
    index = int(rng.integers(len(drawn)))
    shape, mask, _ = drawn[index]
    if shape in ("bar", "ring"):
        return None
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    room = float(distance.max())
    if room < 8:
        return None
    ys, xs = np.nonzero(distance >= 0.6 * room)
    pick = int(rng.integers(len(ys)))
    return index, float(xs[pick]), float(ys[pick]), float(distance[ys[pick], xs[pick]])


def _instances(drawn: list[tuple[str, np.ndarray, int | None]]) -> list[Instance]:
    """Visible masks (each object minus everything drawn after it) and wholes (object plus nested descendants)."""
    if not drawn:
        return []
    count = len(drawn)
    visible = []
    covered = np.zeros_like(drawn[0][1])
    for _, mask, _ in reversed(drawn):
        visible.append(mask & ~covered)
        covered = covered | mask
    visible.reverse()
    wholes = [visible[i].copy() for i in range(count)]
    for i in range(count - 1, -1, -1):     # children come after parents: fold each into its ancestors
        parent = drawn[i][2]
        while parent is not None:
            wholes[parent] |= visible[i]
            parent = drawn[parent][2]
    kept: dict[int, int] = {}
    instances: list[Instance] = []
    for i, (shape, _, parent) in enumerate(drawn):
        area = visible[i].sum()
        if area < MIN_VISIBLE_AREA or area < MIN_VISIBLE_FRACTION * drawn[i][1].sum():
            continue
        kept[i] = len(instances)
        instances.append(Instance(shape, visible[i], wholes[i], kept.get(parent) if parent is not None else None))
    return instances


def farthest_interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from the mask's boundary (the first one in row-major order on ties)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the mask's pixels, inclusive pixel indices (SAM's box convention)."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
