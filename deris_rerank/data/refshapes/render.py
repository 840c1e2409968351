"""Drawing RefShapes scenes: shape outlines, placement with occlusion limits, background, fills."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np

from .scene import SceneObject
from .vocabulary import COLOURS, SHAPES, SIZES, STYLES

MIN_OBJECTS, MAX_OBJECTS = 3, 8
MIN_VISIBLE_FRACTION = 0.5

# Equal-area radius of each size class (the radius of a circle of the same area), as a
# fraction of min(H, W), before a +-6% jitter: the classes never overlap (ratio ~1.6).
_SIZE_RADIUS = {"small": 0.047, "medium": 0.075, "large": 0.118}
_SIZE_JITTER = 0.06
_COLOUR_JITTER = 12.0


def _unit_outline(shape: str) -> np.ndarray:
    """float64 [P, 2] (x, y) outline of `shape` centred on its bounding box, y down, scaled to area pi."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape in ("square", "hexagon", "triangle"):
        corners = {"square": 4, "hexagon": 6, "triangle": 3}[shape]
        angles = -np.pi / 2 + np.pi / corners * (shape == "square") + 2 * np.pi * np.arange(corners) / corners
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "star":
        angles = -np.pi / 2 + np.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif shape == "diamond":
        points = np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]])
    elif shape == "cross":
        a = 0.34
        points = np.array([
            [-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a],
        ])
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        rise = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        points = np.stack([16 * np.sin(t) ** 3, -rise], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = points - (points.min(axis=0) + points.max(axis=0)) / 2
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return points * math.sqrt(math.pi / area)


_UNIT_OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}
# Rotation jitter in degrees (the hexagon's orientation is free).
_ROTATION_JITTER = {
    "circle": 0.0, "square": 10.0, "triangle": 12.0, "star": 15.0,
    "hexagon": 30.0, "diamond": 8.0, "cross": 10.0, "heart": 12.0,
}


# Chance that a shape is placed against an earlier one (so that one partly covers the other).
_NEAR_CHANCE = 0.35
# Shapes of one colour stay at least 2 px apart.
_TOUCH_KERNEL = np.ones((5, 5), dtype=np.uint8)


@dataclass
class _Placed:
    """A shape being placed: attributes, its whole-shape mask and its still-visible mask (bool [H, W])."""

    attributes: Tuple[str, str, str, str]  # shape, colour, size, style
    centre: np.ndarray  # (x, y) where the outline's centre was placed, px
    radius: float  # equal-area radius, px
    full: np.ndarray
    visible: np.ndarray


def _shape_points(rng: np.random.Generator, shape: str, radius: float) -> np.ndarray:
    """The outline of `shape` with equal-area radius `radius` px, randomly rotated, centred at 0."""
    angle = math.radians(rng.uniform(-1, 1) * _ROTATION_JITTER[shape])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return _UNIT_OUTLINES[shape] @ rotation.T * radius


def _place_objects(rng: np.random.Generator, height: int, width: int) -> List[_Placed]:
    """3-8 shapes with distinct attribute tuples, each at least MIN_VISIBLE_FRACTION visible.

    Shapes are placed uniformly inside the image, or (with chance _NEAR_CHANCE) against an
    earlier shape, so partial occlusion is common. Shapes of the same colour neither overlap
    nor touch (they would merge into one blob). A scene draws its shapes and colours from
    small pools (2-4 of each), so same-shape and same-colour distractors are common. A shape
    that cannot be placed in 20 tries is skipped; a scene with fewer than MIN_OBJECTS shapes
    is drawn again.
    """
    unit = min(height, width)
    while True:
        wanted = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        shape_pool = rng.choice(len(SHAPES), size=int(rng.integers(2, 5)), replace=False)
        colour_pool = rng.choice(len(COLOURS), size=int(rng.integers(2, 5)), replace=False)
        placed: List[_Placed] = []
        for _ in range(wanted):
            for _ in range(20):
                attributes = (
                    SHAPES[int(rng.choice(shape_pool))],
                    tuple(COLOURS)[int(rng.choice(colour_pool))],
                    SIZES[int(rng.integers(len(SIZES)))],
                    STYLES[int(rng.choice(len(STYLES), p=[0.4, 0.2, 0.2, 0.2]))],
                )
                if any(other.attributes == attributes for other in placed):
                    continue
                radius = _SIZE_RADIUS[attributes[2]] * unit * (1 + _SIZE_JITTER * rng.uniform(-1, 1))
                points = _shape_points(rng, attributes[0], radius)
                low, high = 2 - points.min(axis=0), np.array([width, height]) - 3 - points.max(axis=0)
                centre = rng.uniform(low, high)
                if placed and rng.random() < _NEAR_CHANCE:
                    other = placed[int(rng.integers(len(placed)))]
                    angle, reach = rng.uniform(0, 2 * np.pi), (other.radius + radius) * rng.uniform(0.55, 1.0)
                    centre = np.clip(other.centre + reach * np.array([math.cos(angle), math.sin(angle)]), low, high)
                points = points + centre
                full = np.zeros((height, width), dtype=np.uint8)
                cv2.fillPoly(full, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
                full = full.view(bool)
                same_colour = [other.visible for other in placed if other.attributes[1] == attributes[1]]
                if same_colour:
                    near = cv2.dilate(full.view(np.uint8), _TOUCH_KERNEL).view(bool)
                    if (near & np.any(same_colour, axis=0)).any():
                        continue
                covered = [other.visible & ~full for other in placed]
                if any(still.sum() < MIN_VISIBLE_FRACTION * other.full.sum() for still, other in zip(covered, placed)):
                    continue
                for other, still in zip(placed, covered):
                    other.visible = still
                placed.append(_Placed(attributes, centre, radius, full, full.copy()))
                break
        if len(placed) >= MIN_OBJECTS:
            return placed


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3]: a linear gradient between two muted colours, smooth blotches and clutter lines."""
    ends = rng.uniform(70, 190, size=(2, 1)) + rng.uniform(-25, 25, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    xs, ys = np.arange(width, dtype=np.float32)[None, :], np.arange(height, dtype=np.float32)[:, None]
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    canvas = ends[0].astype(np.float32) + ramp[..., None] * (ends[1] - ends[0]).astype(np.float32)
    blotches = rng.normal(0, 12, size=(4, 4, 3)).astype(np.float32)
    canvas += cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    mean = ends.mean(axis=0)
    for _ in range(int(rng.integers(2, 9))):
        start = rng.uniform(-0.2, 1.2, size=2) * (width, height)
        end = rng.uniform(-0.2, 1.2, size=2) * (width, height)
        colour = tuple(float(v) for v in 0.5 * rng.uniform(30, 230, size=3) + 0.5 * mean)
        cv2.line(canvas, tuple(int(v) for v in start), tuple(int(v) for v in end), colour, int(rng.integers(1, 3)))
    return canvas


def _paint(canvas: np.ndarray, obj: _Placed, rng: np.random.Generator) -> None:
    """Draw `obj` (its whole shape) onto `canvas` in place, with its colour (jittered) and style."""
    shape, colour, _, style = obj.attributes
    rows, cols = np.nonzero(obj.full.any(axis=1))[0], np.nonzero(obj.full.any(axis=0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    inside = obj.full[y0:y1, x0:x1]
    jitter = rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3)
    base = (np.array(COLOURS[colour], dtype=np.float32) + jitter).astype(np.float32)
    light = (0.3 * base + 0.7 * 245).astype(np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    if style == "solid":
        second = np.zeros(inside.shape, dtype=bool)
    elif style == "outlined":
        thickness = max(2, int(round(0.25 * obj.radius)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * thickness + 1, 2 * thickness + 1))
        second = cv2.erode(inside.view(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
        light = (0.15 * base + 0.85 * 240).astype(np.float32)
    elif style == "striped":
        period = float(np.clip(0.45 * obj.radius, 5, 12))
        angle = rng.uniform(0, np.pi)
        second = ((xs * math.cos(angle) + ys * math.sin(angle)) / period) % 1.0 < 0.5
    else:
        spacing = float(np.clip(0.5 * obj.radius, 5, 12))
        offset = rng.uniform(0, spacing, size=2)
        dx = (xs + offset[0]) % spacing - spacing / 2
        dy = (ys + offset[1]) % spacing - spacing / 2
        second = dx * dx + dy * dy < (0.28 * spacing) ** 2
    texture = np.where(second[..., None], light, base)
    region = canvas[y0:y1, x0:x1]
    region[inside] = texture[inside]


def render_scene(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray, Tuple[SceneObject, ...]]:
    """(image uint8 [H, W, 3], visible masks bool [N, H, W], objects) of one random layout."""
    placed = _place_objects(rng, height, width)
    canvas = _background(rng, height, width)
    for obj in placed:
        _paint(canvas, obj, rng)
    canvas += rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(rng.uniform(2, 10))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    masks = np.stack([obj.visible for obj in placed])
    objects = []
    for obj in placed:
        ys, xs = np.nonzero(obj.full)
        shape, colour, size, style = obj.attributes
        objects.append(SceneObject(
            shape=shape, colour=colour, size=size, style=style,
            centre=(float(xs.mean()), float(ys.mean())),
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
            visible_fraction=float(obj.visible.sum() / xs.size),
        ))
    return image, masks, tuple(objects)
