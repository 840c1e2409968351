"""ReferringSample: one image-expression pair with its ground truth, as every reader yields it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..images import load_image


@dataclass(frozen=True)
class ReferringSample:
    """One pair. The image and the mask are produced on demand, so a split of 100k pairs is cheap.

    id: unique within its split, file-name safe. split: e.g. "val_refcoco_unc".
    image: a path, or a function returning uint8 [H, W, 3] RGB (generated data).
    text: the referring expression. target_mask: function returning bool [H, W] at the
    original image size, the union of all referred objects (all False when nothing is referred).
    image_id: the image this pair belongs to (pairs sharing it can share image work).
    num_targets: how many objects the expression refers to (0 = none), when the data says.
    instance_masks: function returning bool [K, H, W], the K = num_targets referred objects one
    by one (their union is the target mask), when the data has instance masks; else None.
    """

    id: str
    split: str
    image: Union[Path, Callable[[], np.ndarray]]
    text: str
    target_mask: Callable[[], np.ndarray] = field(repr=False, compare=False)
    image_id: str = ""
    num_targets: Optional[int] = None
    instance_masks: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False, compare=False)

    def load_image(self) -> np.ndarray:
        """uint8 [H, W, 3] RGB, decoded as the pipeline decodes files."""
        return load_image(self.image) if isinstance(self.image, (str, Path)) else self.image()
