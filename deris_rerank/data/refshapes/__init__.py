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

Modules: vocabulary (attribute values and words), scene (types), grammar (meaning, wording and
generation of expressions), render (drawing), dataset (RefShapes and its writer).

Everything is a pure function of (seed, split, image index): each image has its own
numpy Generators, so samples can be read in any order and give the same data.
"""
from .dataset import RefShapes, write_refshapes
from .grammar import corpus, referents, render_text, turned_around
from .render import MIN_VISIBLE_FRACTION
from .scene import Descriptor, Expression, Query, Scene, SceneObject
from .vocabulary import COLOURS, FAMILIES, MODES, SHAPES, SIZES, STYLES

__all__ = [
    "COLOURS", "FAMILIES", "MIN_VISIBLE_FRACTION", "MODES", "SHAPES", "SIZES", "STYLES", "Descriptor", "Expression",
    "Query", "RefShapes", "Scene", "SceneObject", "corpus", "referents", "render_text", "turned_around",
    "write_refshapes",
]
