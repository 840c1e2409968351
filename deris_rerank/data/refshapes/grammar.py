"""The RefShapes grammar: what each expression means (`referents`, with margins on every spatial term
so a person would not hesitate), how a query is said (`render_text`), and how valid expressions are
drawn for a scene (`ExpressionMaker`)."""
from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import replace
from typing import FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from .scene import Descriptor, Expression, Query, SceneObject
from .vocabulary import (
    ATTRIBUTE_FIELDS, CORNERS, COUNT_WORDS, FAMILIES, FIELD_VALUES, OPPOSITE, ORDINAL_WORDS, PLURAL, POSITION_TEMPLATES,
    RELATION_TEMPLATES, RELATIONS, SHAPES, SIDES, SIZE_WORDS, SIZES, STYLE_WORDS, SUPERLATIVE_WORDS, TURNED_AROUND,
)

_EXTREME_MARGIN = 0.08  # leftmost / topmost / nearest the centre: runner-up at least this much behind
_ORDINAL_GAP = 0.08  # consecutive ranks at least this far apart along the axis
_RELATION_GAP = 0.02  # "left of": bounding boxes separated by at least this much
_CENTRE_RADIUS = 0.2  # "in the center": within this distance of the image centre
_SIDE_LIMIT = 0.4  # a lone object "on the left" lies in the left 40% of the image

_FAMILY_WEIGHTS = {"attribute": 0.25, "position": 0.2, "relation": 0.2, "ordinal": 0.15, "comparison": 0.2}
_GRES_TARGET_WEIGHTS = {"single": 0.55, "multi": 0.25, "none": 0.2}
_ATTEMPTS = 40
# Chance that a field of the target enters a random descriptor (spatial families).
_FIELD_CHANCE = {"size": 0.15, "colour": 0.4, "style": 0.15, "shape": 0.7}


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


def turned_around(query: Query) -> Optional[Query]:
    """`query` with its direction reversed ("the circle left of the star" -> "... right of the
    star", "the second square from the left" -> "... from the right", the top left corner -> the
    bottom right one, biggest <-> smallest); None for a query without a direction (attributes,
    "in the middle"). Its referents must be found again with `referents`: often none."""
    if query.direction not in TURNED_AROUND:
        return None
    return replace(query, direction=TURNED_AROUND[query.direction])


def render_text(query: Query, rng: np.random.Generator) -> str:
    """A text for `query`: lower-case words separated by single spaces (synonyms drawn from `rng`)."""
    if query.kind == "attribute":
        if query.plural:
            np_plural = _noun_phrase(query.descriptor, rng, plural=True)
            if query.count is None:
                return _pick(rng, ("all {np}", "all the {np}")).format(np=np_plural)
            both = ("both {np}",) if query.count == 2 else ()
            return _pick(rng, ("the {count} {np}",) + both).format(count=COUNT_WORDS[query.count], np=np_plural)
        article = "the " if rng.random() < 0.85 else ""
        return article + _noun_phrase(query.descriptor, rng)
    if query.kind == "position":
        return _pick(rng, POSITION_TEMPLATES[query.direction]).format(np=_noun_phrase(query.descriptor, rng))
    if query.kind == "relation":
        assert query.anchor is not None
        template = _pick(rng, RELATION_TEMPLATES[query.direction])
        noun_phrase = _noun_phrase(query.descriptor, rng, plural=query.plural)
        text = template.format(np=noun_phrase, anchor=_noun_phrase(query.anchor, rng))
        return ("all the " if query.plural and rng.random() < 0.5 else "the ") + text
    if query.kind == "ordinal":
        return f"the {ORDINAL_WORDS[query.rank]} {_noun_phrase(query.descriptor, rng)} from the {query.direction}"
    if query.kind == "comparison":
        return f"the {_pick(rng, SUPERLATIVE_WORDS[query.direction])} {_noun_phrase(query.descriptor, rng)}"
    raise ValueError(f"unknown query kind {query.kind!r}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _noun_phrase(descriptor: Descriptor, rng: np.random.Generator, plural: bool = False) -> str:
    """"[size] [colour] [style] noun" of a descriptor, without article; noun "shape"/"object" when no shape is named."""
    words = []
    if descriptor.size is not None:
        words.append(_pick(rng, SIZE_WORDS[descriptor.size]))
    if descriptor.colour is not None:
        words.append(descriptor.colour)
    if descriptor.style is not None:
        words.append(_pick(rng, STYLE_WORDS[descriptor.style]))
    if descriptor.shape is not None:
        noun = PLURAL[descriptor.shape] if plural else descriptor.shape
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
            query = replace(query, direction=_pick(rng, tuple(POSITION_TEMPLATES)))
        elif kind == "relation":
            query = replace(query, direction=_pick(rng, RELATIONS), anchor=_random_full_descriptor(rng))
        elif kind == "ordinal":
            query = replace(query, direction=_pick(rng, SIDES), rank=int(rng.integers(1, 4)))
        elif kind == "comparison":
            direction = _pick(rng, tuple(SUPERLATIVE_WORDS))
            query = replace(query, descriptor=replace(descriptor, size=None), direction=direction)
        texts.append(render_text(query, rng))
    return texts


def _random_full_descriptor(rng: np.random.Generator) -> Descriptor:
    """A descriptor naming each field with probability 1/2 (at least one), values uniform."""
    named = {name: _pick(rng, FIELD_VALUES[name]) for name in ATTRIBUTE_FIELDS if rng.random() < 0.5}
    if not named:
        named["shape"] = _pick(rng, SHAPES)
    return Descriptor(**named)


class ExpressionMaker:
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
        for count in range(1, len(ATTRIBUTE_FIELDS) + 1):
            for names in itertools.combinations(ATTRIBUTE_FIELDS, count):
                descriptor = Descriptor(**{name: getattr(obj, name) for name in names})
                if self.members(descriptor) == [index]:
                    found.append(descriptor)
        return found

    def random_descriptor(self, index: int, with_size: bool = True) -> Descriptor:
        """A descriptor naming each of object `index`'s attributes with chance _FIELD_CHANCE (maybe none)."""
        obj = self.objects[index]
        draws = self.rng.random(len(ATTRIBUTE_FIELDS))
        named = {
            name: getattr(obj, name)
            for name, draw in zip(ATTRIBUTE_FIELDS, draws)
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
            options = SIDES if group < 0.6 else (CORNERS if group < 0.85 else ("middle",))
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
            side = _pick(rng, SIDES)
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
                count = size if size in COUNT_WORDS and self.rng.random() < 0.4 else None
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
                values = [value for value in FIELD_VALUES[name] if value != getattr(self.objects[target], name)]
                query: Optional[Query] = Query("attribute", replace(descriptor, **{name: _pick(self.rng, values)}))
            else:
                query = self._single_candidate("relation", target)
                if query is not None:
                    query = replace(query, direction=OPPOSITE[query.direction])
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
