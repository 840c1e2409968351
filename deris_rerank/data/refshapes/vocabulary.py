"""RefShapes vocabulary: the attribute values objects take, and the words and templates that name them."""
from __future__ import annotations

from typing import Dict, Tuple

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

ATTRIBUTE_FIELDS = ("size", "colour", "style", "shape")
FIELD_VALUES = {"size": SIZES, "colour": tuple(COLOURS), "style": STYLES, "shape": SHAPES}

SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium sized"), "large": ("large", "big")}
STYLE_WORDS = {
    "solid": ("solid", "filled"), "outlined": ("outlined",), "striped": ("striped",), "dotted": ("dotted", "spotted"),
}
PLURAL = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
ORDINAL_WORDS = {1: "first", 2: "second", 3: "third"}
SIDES = ("left", "right", "top", "bottom")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("left", "right", "above", "below")
POSITION_TEMPLATES = {
    "left": ("the {np} on the left", "the left {np}", "the leftmost {np}"),
    "right": ("the {np} on the right", "the right {np}", "the rightmost {np}"),
    "top": ("the {np} at the top", "the top {np}", "the topmost {np}", "the highest {np}"),
    "bottom": ("the {np} at the bottom", "the bottom {np}", "the lowest {np}"),
    "middle": (
        "the {np} in the center", "the {np} in the middle of the image", "the {np} in the center of the picture",
    ),
    **{
        corner: (f"the {corner} {{np}}", f"the {{np}} in the {corner} corner", f"the {{np}} at the {corner}")
        for corner in CORNERS
    },
}
RELATION_TEMPLATES = {
    "left": ("{np} left of the {anchor}", "{np} to the left of the {anchor}"),
    "right": ("{np} right of the {anchor}", "{np} to the right of the {anchor}"),
    "above": ("{np} above the {anchor}", "{np} over the {anchor}"),
    "below": ("{np} below the {anchor}", "{np} under the {anchor}", "{np} beneath the {anchor}"),
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Every direction word reversed (a query "turned around"): sides, relations, diagonal corners, comparisons.
TURNED_AROUND = {
    **OPPOSITE, "top": "bottom", "bottom": "top", "top left": "bottom right", "bottom right": "top left",
    "top right": "bottom left", "bottom left": "top right", "biggest": "smallest", "smallest": "biggest",
}
SUPERLATIVE_WORDS = {"biggest": ("biggest", "largest"), "smallest": ("smallest",)}
