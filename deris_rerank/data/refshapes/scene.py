"""RefShapes scene types: objects, descriptors, queries, expressions and whole scenes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .vocabulary import ATTRIBUTE_FIELDS

@dataclass(frozen=True)
class SceneObject:
    """One shape. centre: (x, y) centroid of the whole (unoccluded) shape in pixels;
    bbox: (x0, y0, x1, y1) inclusive pixel extent of the whole shape; visible_fraction:
    visible pixels / shape pixels, in [MIN_VISIBLE_FRACTION, 1]."""

    shape: str
    colour: str
    size: str
    style: str
    centre: Tuple[float, float]
    bbox: Tuple[int, int, int, int]
    visible_fraction: float


@dataclass(frozen=True)
class Descriptor:
    """A noun phrase: the attribute values it names (None = not named). Matches the objects that
    have every named value."""

    size: Optional[str] = None
    colour: Optional[str] = None
    style: Optional[str] = None
    shape: Optional[str] = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether `obj` has every attribute value this descriptor names."""
        return all(value is None or getattr(obj, name) == value for name, value in self.named())

    def named(self) -> Tuple[Tuple[str, str], ...]:
        """The (field, value) pairs this descriptor names, in word order."""
        return tuple((name, getattr(self, name)) for name in ATTRIBUTE_FIELDS if getattr(self, name) is not None)


@dataclass(frozen=True)
class Query:
    """The meaning of an expression.

    kind: one of FAMILIES. descriptor: the objects considered. direction: position: a side
    ("left", "right", "top", "bottom"), a corner ("top left", ...) or "middle"; relation:
    "left", "right", "above", "below" (the referent relative to the anchor); ordinal: the
    side counted from; comparison: "biggest" or "smallest". rank: ordinal's 1, 2 or 3.
    anchor: relation's reference object (must match exactly one object). plural: the
    expression speaks of several objects; count: the number it states, if any.
    """

    kind: str
    descriptor: Descriptor
    direction: str = ""
    rank: int = 0
    anchor: Optional[Descriptor] = None
    plural: bool = False
    count: Optional[int] = None


@dataclass(frozen=True)
class Expression:
    """A referring expression of a scene: its text, its meaning and the indices of the objects it refers to."""

    text: str
    query: Query
    targets: Tuple[int, ...]

    @property
    def family(self) -> str:
        """The grammar family (the query's kind)."""
        return self.query.kind


@dataclass(frozen=True)
class Scene:
    """One generated image. image: uint8 [H, W, 3] RGB; masks: bool [N, H, W] visible pixels of
    each object, in drawing order (later objects cover earlier ones), disjoint; objects: their
    attributes; expressions: the image's 2-4 expressions. The arrays are read-only."""

    image: np.ndarray
    masks: np.ndarray
    objects: Tuple[SceneObject, ...]
    expressions: Tuple[Expression, ...]

    def target_mask(self, expression: int) -> np.ndarray:
        """bool [H, W]: union of the visible masks of expression `expression`'s targets (all False for none)."""
        targets = list(self.expressions[expression].targets)
        return self.masks[targets].any(axis=0) if targets else np.zeros(self.masks.shape[1:], dtype=bool)
