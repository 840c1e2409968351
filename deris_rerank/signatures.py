"""Old import path of the Venice-H1 candidate descriptors (kept for existing code): now
`deris_rerank.venice.signatures`."""
from .venice.signatures import (
    GRID_FIELDS, GRID_SIGNATURE_DIM, GRID_SIZES, MASK_STAT_NAMES, grid_scale_mask, grid_signatures, mask_probabilities,
    mask_statistics, split_grid_signature,
)

__all__ = [
    "GRID_FIELDS", "GRID_SIGNATURE_DIM", "GRID_SIZES", "MASK_STAT_NAMES", "grid_scale_mask", "grid_signatures",
    "mask_probabilities", "mask_statistics", "split_grid_signature",
]
