"""RefShapes: a synthetic referring-segmentation dataset of coloured shapes, generated on demand.

Each image shows 3-8 shapes (8 kinds, 8 named colours with jitter, 3 discrete sizes, 4 fill
styles) over a noisy gradient background with clutter lines. Later shapes are drawn over
earlier ones; instance masks are the exact visible pixels, and every shape keeps at least
MIN_VISIBLE_FRACTION of its area visible. An outlined shape has a coloured rim and a pale
interior; its mask is its whole silhouette (the interior hides what is behind it). Each image carries 2-4 expressions from a small
grammar (families: attribute, position, relation, ordinal, comparison). An expression is
kept only if `referents` (the grammar's semantics, with margins on every spatial term so a
person would not hesitate) finds exactly the intended objects: one in "ris" mode; in "gres"
mode also several ("all red shapes", "the two squares") or none ("the purple star" when
there is no purple star).

Everything is a pure function of (seed, split, image index): each image has its own
numpy Generators, so samples can be read in any order and give the same data.
"""
from __future__ import annotations

import functools
import itertools
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, Union, overload

import cv2
import numpy as np

from ..errors import InputError, OutputError
from ..fileio import atomic_write
from ..rle import encode_mask
from .refcoco import write_seqtr
from .sample import ReferringSample

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (235, 205, 35),
    "green": (45, 160, 60),
    "cyan": (40, 190, 200),
    "blue": (40, 75, 210),
    "purple": (135, 55, 180),
    "pink": (240, 110, 180),
}
SIZES = ("small", "medium", "large")
STYLES = ("solid", "outlined", "striped", "dotted")
FAMILIES = ("attribute", "position", "relation", "ordinal", "comparison")
MODES = ("ris", "gres")

MIN_OBJECTS, MAX_OBJECTS = 3, 8
MIN_EXPRESSIONS, MAX_EXPRESSIONS = 2, 4
MIN_VISIBLE_FRACTION = 0.5

# Equal-area radius of each size class (the radius of a circle of the same area), as a
# fraction of min(H, W), before a +-6% jitter: the classes never overlap (ratio ~1.6).
_SIZE_RADIUS = {"small": 0.047, "medium": 0.075, "large": 0.118}
_SIZE_JITTER = 0.06
_COLOUR_JITTER = 12.0
# Margins of the spatial terms, as fractions of min(H, W).
_EXTREME_MARGIN = 0.08  # leftmost / topmost / nearest the centre: runner-up at least this much behind
_ORDINAL_GAP = 0.08  # consecutive ranks at least this far apart along the axis
_RELATION_GAP = 0.02  # "left of": bounding boxes separated by at least this much
_CENTRE_RADIUS = 0.2  # "in the center": within this distance of the image centre
_SIDE_LIMIT = 0.4  # a lone object "on the left" lies in the left 40% of the image

_FAMILY_WEIGHTS = {"attribute": 0.25, "position": 0.2, "relation": 0.2, "ordinal": 0.15, "comparison": 0.2}
_GRES_TARGET_WEIGHTS = {"single": 0.55, "multi": 0.25, "none": 0.2}
_ATTEMPTS = 40
_ATTRIBUTE_FIELDS = ("size", "colour", "style", "shape")
_FIELD_VALUES = {"size": SIZES, "colour": tuple(COLOURS), "style": STYLES, "shape": SHAPES}
# Chance that a field of the target enters a random descriptor (spatial families).
_FIELD_CHANCE = {"size": 0.15, "colour": 0.4, "style": 0.15, "shape": 0.7}

_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium sized"), "large": ("large", "big")}
_STYLE_WORDS = {
    "solid": ("solid", "filled"), "outlined": ("outlined",), "striped": ("striped",), "dotted": ("dotted", "spotted"),
}
_PLURAL = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
_ORDINAL_WORDS = {1: "first", 2: "second", 3: "third"}
_SIDES = ("left", "right", "top", "bottom")
_CORNERS = ("top left", "top right", "bottom left", "bottom right")
_RELATIONS = ("left", "right", "above", "below")
_POSITION_TEMPLATES = {
    "left": ("the {np} on the left", "the left {np}", "the leftmost {np}"),
    "right": ("the {np} on the right", "the right {np}", "the rightmost {np}"),
    "top": ("the {np} at the top", "the top {np}", "the topmost {np}", "the highest {np}"),
    "bottom": ("the {np} at the bottom", "the bottom {np}", "the lowest {np}"),
    "middle": (
        "the {np} in the center", "the {np} in the middle of the image", "the {np} in the center of the picture",
    ),
    **{
        corner: (f"the {corner} {{np}}", f"the {{np}} in the {corner} corner", f"the {{np}} at the {corner}")
        for corner in _CORNERS
    },
}
_RELATION_TEMPLATES = {
    "left": ("{np} left of the {anchor}", "{np} to the left of the {anchor}"),
    "right": ("{np} right of the {anchor}", "{np} to the right of the {anchor}"),
    "above": ("{np} above the {anchor}", "{np} over the {anchor}"),
    "below": ("{np} below the {anchor}", "{np} under the {anchor}", "{np} beneath the {anchor}"),
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_SUPERLATIVE_WORDS = {"biggest": ("biggest", "largest"), "smallest": ("smallest",)}


# ---------------------------------------------------------------------------------------------
# Scene and expression types


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
        return tuple((name, getattr(self, name)) for name in _ATTRIBUTE_FIELDS if getattr(self, name) is not None)


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


# ---------------------------------------------------------------------------------------------
# Semantics


def referents(query: Query, objects: Sequence[SceneObject], image_size: Tuple[int, int]) -> Optional[FrozenSet[int]]:
    """The indices of the objects `query` refers to, or None if it is ill-posed in this scene.

    Ill-posed: a spatial term within its margin (two objects nearly tied for leftmost, an
    object neither clearly left of the anchor nor clearly not), an anchor that does not match
    exactly one object, an ordinal rank without a next object, a superlative over fewer than
    two objects or that names a size, a stated count that differs from the referents', or a
    lone object said to be "on the left" that is not in the left part of the image.
    image_size: (H, W) in pixels.
    """
    height, width = image_size
    unit = min(height, width)
    members = [index for index, obj in enumerate(objects) if query.descriptor.matches(obj)]
    if query.kind == "attribute":
        found: Optional[FrozenSet[int]] = frozenset(members)
    elif query.kind == "position":
        found = _position_referents(query.direction, members, objects, height, width)
    elif query.kind == "relation":
        found = _relation_referents(query, members, objects, unit)
    elif query.kind == "ordinal":
        found = _ordinal_referents(query.direction, query.rank, members, objects, unit)
    elif query.kind == "comparison":
        found = _comparison_referents(query, members, objects)
    else:
        raise ValueError(f"unknown query kind {query.kind!r}")
    if found is not None and query.count is not None and len(found) != query.count:
        return None
    return found


def _side_key(side: str, obj: SceneObject) -> float:
    """A coordinate that is smallest for the object farthest toward `side` (left/right/top/bottom)."""
    x, y = obj.centre
    return {"left": x, "right": -x, "top": y, "bottom": -y}[side]


def _position_referents(
    direction: str, members: List[int], objects: Sequence[SceneObject], height: int, width: int
) -> Optional[FrozenSet[int]]:
    """Objects of `members` at `direction` (a side, a corner or "middle"); see `referents`."""
    if not members:
        return frozenset()
    margin = _EXTREME_MARGIN * min(height, width)
    if direction == "middle":
        distance = {i: math.hypot(objects[i].centre[0] - width / 2, objects[i].centre[1] - height / 2) for i in members}
        nearest = min(distance.values())
        if nearest > _CENTRE_RADIUS * min(height, width):
            return None
        return frozenset(i for i in members if distance[i] < nearest + margin)
    winners = set()
    for side in direction.split():
        key = {i: _side_key(side, objects[i]) for i in members}
        best = min(key.values())
        winners.update(i for i in members if key[i] < best + margin)
        if len(members) == 1:
            x, y = objects[members[0]].centre
            from_side = {"left": x, "right": width - x, "top": y, "bottom": height - y}[side]
            if from_side > _SIDE_LIMIT * (width if side in ("left", "right") else height):
                return None
    return frozenset(winners)


def _relation_verdict(direction: str, obj: SceneObject, anchor: SceneObject, gap: float) -> Optional[bool]:
    """Whether `obj` is `direction` of `anchor`: True (clearly), False (clearly not) or None (unclear).

    Clearly: the boxes are at least `gap` apart along the direction's axis and the centres'
    offset is within 45 degrees of the direction. Clearly not: the offset points the other
    way or is more than ~63 degrees off (across >= 2 * along).
    """
    (ox, oy), (ax, ay) = obj.centre, anchor.centre
    if direction in ("left", "right"):
        along, across = (ax - ox, abs(ay - oy)) if direction == "left" else (ox - ax, abs(ay - oy))
        box_gap = anchor.bbox[0] - obj.bbox[2] if direction == "left" else obj.bbox[0] - anchor.bbox[2]
    else:
        along, across = (ay - oy, abs(ax - ox)) if direction == "above" else (oy - ay, abs(ax - ox))
        box_gap = anchor.bbox[1] - obj.bbox[3] if direction == "above" else obj.bbox[1] - anchor.bbox[3]
    if box_gap >= gap and across <= along:
        return True
    if along <= 0 or across >= 2 * along:
        return False
    return None


def _relation_referents(
    query: Query, members: List[int], objects: Sequence[SceneObject], unit: int
) -> Optional[FrozenSet[int]]:
    """Objects of `members` clearly `query.direction` of the anchor; None if any is unclear."""
    anchors = [i for i, obj in enumerate(objects) if query.anchor is not None and query.anchor.matches(obj)]
    if len(anchors) != 1:
        return None
    anchor = objects[anchors[0]]
    found = set()
    for index in members:
        if index == anchors[0]:
            continue
        verdict = _relation_verdict(query.direction, objects[index], anchor, _RELATION_GAP * unit)
        if verdict is None:
            return None
        if verdict:
            found.add(index)
    return frozenset(found)


def _ordinal_referents(
    side: str, rank: int, members: List[int], objects: Sequence[SceneObject], unit: int
) -> Optional[FrozenSet[int]]:
    """The rank-th object of `members` counted from `side`; None without a next object or with close ranks."""
    if rank < 1 or len(members) < rank + 1:
        return None
    ordered = sorted(members, key=lambda i: _side_key(side, objects[i]))
    keys = [_side_key(side, objects[i]) for i in ordered[: rank + 1]]
    if any(after - before < _ORDINAL_GAP * unit for before, after in zip(keys, keys[1:])):
        return None
    return frozenset({ordered[rank - 1]})


def _comparison_referents(query: Query, members: List[int], objects: Sequence[SceneObject]) -> Optional[FrozenSet[int]]:
    """Objects of `members` of the largest (or smallest) size class; None over < 2 objects or a named size."""
    if query.descriptor.size is not None or len(members) < 2:
        return None
    classes = {i: SIZES.index(objects[i].size) for i in members}
    extreme = max(classes.values()) if query.direction == "biggest" else min(classes.values())
    return frozenset(i for i in members if classes[i] == extreme)


# ---------------------------------------------------------------------------------------------
# Text


def render_text(query: Query, rng: np.random.Generator) -> str:
    """A text for `query`: lower-case words separated by single spaces (synonyms drawn from `rng`)."""
    if query.kind == "attribute":
        if query.plural:
            np_plural = _noun_phrase(query.descriptor, rng, plural=True)
            if query.count is None:
                return _pick(rng, ("all {np}", "all the {np}")).format(np=np_plural)
            both = ("both {np}",) if query.count == 2 else ()
            return _pick(rng, ("the {count} {np}",) + both).format(count=_COUNT_WORDS[query.count], np=np_plural)
        article = "the " if rng.random() < 0.85 else ""
        return article + _noun_phrase(query.descriptor, rng)
    if query.kind == "position":
        return _pick(rng, _POSITION_TEMPLATES[query.direction]).format(np=_noun_phrase(query.descriptor, rng))
    if query.kind == "relation":
        assert query.anchor is not None
        template = _pick(rng, _RELATION_TEMPLATES[query.direction])
        noun_phrase = _noun_phrase(query.descriptor, rng, plural=query.plural)
        text = template.format(np=noun_phrase, anchor=_noun_phrase(query.anchor, rng))
        return ("all the " if query.plural and rng.random() < 0.5 else "the ") + text
    if query.kind == "ordinal":
        return f"the {_ORDINAL_WORDS[query.rank]} {_noun_phrase(query.descriptor, rng)} from the {query.direction}"
    if query.kind == "comparison":
        return f"the {_pick(rng, _SUPERLATIVE_WORDS[query.direction])} {_noun_phrase(query.descriptor, rng)}"
    raise ValueError(f"unknown query kind {query.kind!r}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _noun_phrase(descriptor: Descriptor, rng: np.random.Generator, plural: bool = False) -> str:
    """"[size] [colour] [style] noun" of a descriptor, without article; noun "shape"/"object" when no shape is named."""
    words = []
    if descriptor.size is not None:
        words.append(_pick(rng, _SIZE_WORDS[descriptor.size]))
    if descriptor.colour is not None:
        words.append(descriptor.colour)
    if descriptor.style is not None:
        words.append(_pick(rng, _STYLE_WORDS[descriptor.style]))
    if descriptor.shape is not None:
        noun = _PLURAL[descriptor.shape] if plural else descriptor.shape
    elif plural:
        noun = _pick(rng, ("shapes", "objects"))
    else:
        noun = _pick(rng, ("shape", "object", "one") if words else ("shape", "object"))
    return " ".join(words + [noun])


def corpus(num_samples: int, seed: int = 0) -> List[str]:
    """`num_samples` texts from every family and form of the grammar (single, plural, counted),
    with random attribute values: a text corpus to train a tokenizer on. Deterministic in `seed`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"corpus")]))
    texts = []
    for _ in range(num_samples):
        descriptor = _random_full_descriptor(rng)
        kind = _pick(rng, FAMILIES)
        plural = kind in ("attribute", "relation") and rng.random() < 0.3
        query = Query(kind, descriptor, plural=plural)
        if kind == "attribute" and plural and rng.random() < 0.5:
            query = replace(query, count=int(rng.integers(2, 6)))
        elif kind == "position":
            query = replace(query, direction=_pick(rng, tuple(_POSITION_TEMPLATES)))
        elif kind == "relation":
            query = replace(query, direction=_pick(rng, _RELATIONS), anchor=_random_full_descriptor(rng))
        elif kind == "ordinal":
            query = replace(query, direction=_pick(rng, _SIDES), rank=int(rng.integers(1, 4)))
        elif kind == "comparison":
            direction = _pick(rng, tuple(_SUPERLATIVE_WORDS))
            query = replace(query, descriptor=replace(descriptor, size=None), direction=direction)
        texts.append(render_text(query, rng))
    return texts


def _random_full_descriptor(rng: np.random.Generator) -> Descriptor:
    """A descriptor naming each field with probability 1/2 (at least one), values uniform."""
    named = {name: _pick(rng, _FIELD_VALUES[name]) for name in _ATTRIBUTE_FIELDS if rng.random() < 0.5}
    if not named:
        named["shape"] = _pick(rng, SHAPES)
    return Descriptor(**named)


# ---------------------------------------------------------------------------------------------
# Expression generation


class _ExpressionMaker:
    """Draws valid expressions for one scene (objects in drawing order, image size (H, W))."""

    def __init__(self, objects: Sequence[SceneObject], image_size: Tuple[int, int], rng: np.random.Generator) -> None:
        self.objects = objects
        self.image_size = image_size
        self.rng = rng

    def members(self, descriptor: Descriptor) -> List[int]:
        """Indices of the objects `descriptor` matches."""
        return [i for i, obj in enumerate(self.objects) if descriptor.matches(obj)]

    def unique_descriptors(self, index: int) -> List[Descriptor]:
        """Every non-empty descriptor built from object `index`'s attributes that matches it alone."""
        obj = self.objects[index]
        found = []
        for count in range(1, len(_ATTRIBUTE_FIELDS) + 1):
            for names in itertools.combinations(_ATTRIBUTE_FIELDS, count):
                descriptor = Descriptor(**{name: getattr(obj, name) for name in names})
                if self.members(descriptor) == [index]:
                    found.append(descriptor)
        return found

    def random_descriptor(self, index: int, with_size: bool = True) -> Descriptor:
        """A descriptor naming each of object `index`'s attributes with chance _FIELD_CHANCE (maybe none)."""
        obj = self.objects[index]
        draws = self.rng.random(len(_ATTRIBUTE_FIELDS))
        named = {
            name: getattr(obj, name)
            for name, draw in zip(_ATTRIBUTE_FIELDS, draws)
            if draw < _FIELD_CHANCE[name] and (with_size or name != "size")
        }
        return Descriptor(**named)

    def short_unique_descriptor(self, index: int) -> Descriptor:
        """A descriptor of object `index` alone: a shortest one (70%) or any one."""
        unique = self.unique_descriptors(index)
        if self.rng.random() < 0.7:
            shortest = len(unique[0].named())
            unique = [d for d in unique if len(d.named()) == shortest]
        return unique[int(self.rng.integers(len(unique)))]

    def referents(self, query: Query) -> Optional[FrozenSet[int]]:
        """`referents` of `query` in this scene."""
        return referents(query, self.objects, self.image_size)

    def single(self, kind: str) -> Optional[Tuple[Query, int]]:
        """A query of family `kind` with exactly one referent, and that referent; None if none found.

        Spatial families prefer descriptors that match several objects (so the spatial term
        is needed): a descriptor matching the target alone is accepted 1 time in 4.
        """
        for _ in range(_ATTEMPTS):
            target = int(self.rng.integers(len(self.objects)))
            query = self._single_candidate(kind, target)
            if query is None or self.referents(query) != frozenset({target}):
                continue
            if kind != "attribute" and len(self.members(query.descriptor)) == 1 and self.rng.random() >= 0.25:
                continue
            return query, target
        return None

    def _single_candidate(self, kind: str, target: int) -> Optional[Query]:
        """A query of family `kind` meant to refer to `target` alone (checked by the caller)."""
        rng = self.rng
        if kind == "attribute":
            unique = self.unique_descriptors(target)
            if rng.random() < 0.6:
                shortest = len(unique[0].named())
                unique = [d for d in unique if len(d.named()) == shortest]
            return Query("attribute", unique[int(rng.integers(len(unique)))])
        if kind == "position":
            group = rng.random()
            options = _SIDES if group < 0.6 else (_CORNERS if group < 0.85 else ("middle",))
            return Query("position", self.random_descriptor(target), _pick(rng, options))
        if kind == "relation":
            others = [i for i in range(len(self.objects)) if i != target]
            anchor = others[int(rng.integers(len(others)))]
            (tx, ty), (ax, ay) = self.objects[target].centre, self.objects[anchor].centre
            offsets = {"left": ax - tx, "right": tx - ax, "above": ay - ty, "below": ty - ay}
            direction = max(offsets, key=offsets.get)
            anchor_descriptor = self.short_unique_descriptor(anchor)
            return Query("relation", self.random_descriptor(target), direction, anchor=anchor_descriptor)
        if kind == "ordinal":
            side = _pick(rng, _SIDES)
            descriptor = self.random_descriptor(target)
            ordered = sorted(self.members(descriptor), key=lambda i: _side_key(side, self.objects[i]))
            rank = ordered.index(target) + 1
            return Query("ordinal", descriptor, side, rank=rank) if rank <= 3 else None
        if kind == "comparison":
            descriptor = self.random_descriptor(target, with_size=False)
            classes = [SIZES.index(self.objects[i].size) for i in self.members(descriptor)]
            own = SIZES.index(self.objects[target].size)
            if own == max(classes):
                return Query("comparison", descriptor, "biggest")
            if own == min(classes):
                return Query("comparison", descriptor, "smallest")
            return None
        raise ValueError(f"unknown family {kind!r}")

    def multi(self) -> Optional[Tuple[Query, FrozenSet[int]]]:
        """A plural query with 2 or more referents ("all red shapes", "the two squares",
        "the circles above the blue star"); None if none found."""
        for _ in range(_ATTEMPTS):
            target = int(self.rng.integers(len(self.objects)))
            if self.rng.random() < 0.75:
                descriptor = self.random_descriptor(target)
                size = len(self.members(descriptor))
                count = size if size in _COUNT_WORDS and self.rng.random() < 0.4 else None
                query = Query("attribute", descriptor, plural=True, count=count)
                if not descriptor.named():
                    continue
            else:
                single = self._single_candidate("relation", target)
                if single is None:
                    continue
                query = replace(single, plural=True)
            found = self.referents(query)
            if found is not None and len(found) >= 2:
                return query, found
        return None

    def none(self) -> Optional[Query]:
        """A singular query with no referent: a near miss of an object's description
        ("the purple star" beside a red star), or a relation that none of the objects its
        descriptor matches satisfies."""
        for _ in range(_ATTEMPTS):
            target = int(self.rng.integers(len(self.objects)))
            if self.rng.random() < 0.75:
                descriptor = self.random_descriptor(target)
                name = _pick(self.rng, ("colour", "style", "shape"))
                values = [value for value in _FIELD_VALUES[name] if value != getattr(self.objects[target], name)]
                query: Optional[Query] = Query("attribute", replace(descriptor, **{name: _pick(self.rng, values)}))
            else:
                query = self._single_candidate("relation", target)
                if query is not None:
                    query = replace(query, direction=_OPPOSITE[query.direction])
            if query is not None and self.referents(query) == frozenset():
                return query
        return None

    def fallback(self, taken: set) -> Expression:
        """An attribute expression whose text is not in `taken`: every object's full description
        is unique in a scene, and each has at least two wordings, so one always exists."""
        for index in range(len(self.objects)):
            for descriptor in self.unique_descriptors(index):
                for _ in range(8):
                    text = render_text(Query("attribute", descriptor), self.rng)
                    if text not in taken:
                        return Expression(text, Query("attribute", descriptor), (index,))
        raise RuntimeError("no unused attribute expression left in the scene")

    def expressions(self, count: int, mode: str) -> Tuple[Expression, ...]:
        """`count` expressions with distinct texts: "ris" single-target only, "gres" mixed."""
        made: List[Expression] = []
        taken: set = set()
        kinds, weights = list(_FAMILY_WEIGHTS), np.array(list(_FAMILY_WEIGHTS.values()))
        gres_kinds, gres_weights = list(_GRES_TARGET_WEIGHTS), np.array(list(_GRES_TARGET_WEIGHTS.values()))
        while len(made) < count:
            expression = None
            target_kind = "single"
            if mode == "gres":
                target_kind = gres_kinds[int(self.rng.choice(len(gres_kinds), p=gres_weights))]
            if target_kind == "multi":
                found_multi = self.multi()
                if found_multi is not None:
                    query, targets = found_multi
                    expression = Expression(render_text(query, self.rng), query, tuple(sorted(targets)))
            elif target_kind == "none":
                query = self.none()
                if query is not None:
                    expression = Expression(render_text(query, self.rng), query, ())
            if expression is None:
                first = int(self.rng.choice(len(kinds), p=weights))
                for kind in kinds[first:] + kinds[:first]:
                    found_single = self.single(kind)
                    if found_single is not None:
                        query, target = found_single
                        expression = Expression(render_text(query, self.rng), query, (target,))
                        break
            if expression is None or expression.text in taken:
                expression = self.fallback(taken)
            made.append(expression)
            taken.add(expression.text)
        return tuple(made)


# ---------------------------------------------------------------------------------------------
# Drawing


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


def _render_scene(
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


# ---------------------------------------------------------------------------------------------
# Dataset


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic): a well-spread hash."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class RefShapes(Sequence[ReferringSample]):
    """The pairs of `num_images` generated images, 2-4 per image, as ReferringSamples.

    split: any name (it seeds the data: "train" and "val" give different scenes); seed: a
    non-negative int; image_size: (H, W) in pixels; mode: "ris" (one target per expression)
    or "gres" (also multi-target and no-target expressions). Sample ids are
    f"{split}_{image:06d}_{k}" and image ids f"{split}_{image:06d}". Scenes are generated on
    demand; the last `cache_size` are cached, so the samples of one image share one generation.
    `scene(image)` gives the whole scene (all instance masks and attributes).
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 1000,
        seed: int = 0,
        image_size: Tuple[int, int] = (256, 256),
        mode: str = "ris",
        cache_size: int = 4,
    ) -> None:
        if not isinstance(split, str) or not split:
            raise InputError(f"split: expected a non-empty str, got {split!r}")
        if not isinstance(num_images, int) or num_images < 0:
            raise InputError(f"num_images: expected an int >= 0, got {num_images!r}")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed: expected an int >= 0, got {seed!r}")
        if len(image_size) != 2 or min(image_size) < 64:
            raise InputError(f"image_size: expected (H, W) with both sides >= 64 pixels, got {image_size!r}")
        if mode not in MODES:
            raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
        self.split = split
        self.num_images = num_images
        self.seed = seed
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mode = mode
        self.cache_size = cache_size
        self._split_key = zlib.crc32(split.encode("utf-8"))
        key = ((seed * 0x100000001B3) ^ (self._split_key << 32)) & 0xFFFFFFFFFFFFFFFF
        hashes = _mix64(np.arange(num_images, dtype=np.uint64) ^ np.uint64(key))
        self._counts = (MIN_EXPRESSIONS + hashes % np.uint64(MAX_EXPRESSIONS - MIN_EXPRESSIONS + 1)).astype(np.int64)
        self._starts = np.concatenate(([0], np.cumsum(self._counts)))
        self._cached_scene = functools.lru_cache(maxsize=cache_size)(self._generate_scene)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_cached_scene"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cached_scene = functools.lru_cache(maxsize=self.cache_size)(self._generate_scene)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @overload
    def __getitem__(self, index: int) -> ReferringSample: ...

    @overload
    def __getitem__(self, index: slice) -> List[ReferringSample]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[ReferringSample, List[ReferringSample]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"RefShapes indices must be int or slice, not {type(index).__name__}")
        position = int(index) + len(self) if index < 0 else int(index)
        if not 0 <= position < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        image = int(np.searchsorted(self._starts, position, side="right")) - 1
        k = position - int(self._starts[image])
        expression = self.scene(image).expressions[k]
        return ReferringSample(
            id=f"{self.split}_{image:06d}_{k}",
            split=self.split,
            image=functools.partial(self._image_copy, image),
            text=expression.text,
            target_mask=functools.partial(self._target_mask, image, k),
            image_id=f"{self.split}_{image:06d}",
            num_targets=len(expression.targets),
        )

    def expressions_per_image(self, image: int) -> int:
        """How many samples image `image` has (2-4), known without generating it."""
        return int(self._counts[image])

    def scene(self, image: int) -> Scene:
        """The generated scene of image `image` (0 <= image < num_images), from the cache if recent."""
        if not 0 <= image < self.num_images:
            raise IndexError(f"image index {image} out of range for {self.num_images} images")
        return self._cached_scene(int(image))

    def _generator(self, image: int, stream: int) -> np.random.Generator:
        """The Generator of one image's stream (0: drawing, 1: expressions of this mode)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self._split_key, image, stream]))

    def _generate_scene(self, image: int) -> Scene:
        """Generate image `image`: the drawing does not depend on the mode, the expressions do."""
        pixels, masks, objects = _render_scene(self._generator(image, 0), *self.image_size)
        maker = _ExpressionMaker(objects, self.image_size, self._generator(image, 1 + MODES.index(self.mode)))
        expressions = maker.expressions(self.expressions_per_image(image), self.mode)
        pixels.flags.writeable = False
        masks.flags.writeable = False
        return Scene(pixels, masks, objects, expressions)

    def _image_copy(self, image: int) -> np.ndarray:
        return self.scene(image).image.copy()

    def _target_mask(self, image: int, k: int) -> np.ndarray:
        return self.scene(image).target_mask(k)


def write_refshapes(out_dir: Path, datasets: Sequence[RefShapes]) -> Path:
    """Write `datasets` to disk in the SeqTR layout that `refcoco.read_seqtr` reads.

    Images go to `out_dir/images/<image_id>.png` (lossless, so they read back identical);
    the annotations of all datasets go to ONE file, `out_dir/refshapes.json`, a
    {split: [entry, ...]} object with one entry per sample, in dataset order: image_id
    (the str f"{split}_{image:06d}"), file_name, expressions [text], mask (COCO RLE of the
    target mask), num_targets. Each dataset needs its own split name. Returns the file's path.
    """
    out_dir = Path(out_dir).expanduser()
    images_dir = out_dir / "images"
    splits: Dict[str, List[Dict[str, object]]] = {}
    for dataset in datasets:
        if dataset.split in splits:
            raise InputError(
                f"write_refshapes: two datasets have split {dataset.split!r}; give each its own split name"
            )
        entries = splits[dataset.split] = []
        for image in range(dataset.num_images):
            scene = dataset.scene(image)
            image_id = f"{dataset.split}_{image:06d}"
            file_name = f"{image_id}.png"
            _write_png(images_dir / file_name, scene.image)
            for k, expression in enumerate(scene.expressions):
                entries.append({
                    "image_id": image_id,
                    "file_name": file_name,
                    "expressions": [expression.text],
                    "mask": encode_mask(scene.target_mask(k)),
                    "num_targets": len(expression.targets),
                })
    return write_seqtr(splits, out_dir / "refshapes.json")


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Write uint8 [H, W, 3] RGB as a PNG file (atomically), creating its folder."""
    encoded, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not encoded:
        raise OutputError(f"cannot encode image {path} as PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data.tobytes()))
    except OSError as exc:
        raise OutputError(f"cannot write image {path}: {exc.strerror or exc}; choose a writable folder") from None
