"""COCO run-length encoding of binary masks, byte-for-byte compatible with pycocotools.

A mask [H, W] is read in column-major (Fortran) order and stored as the lengths of its
alternating runs, starting with a run of zeros (of length 0 when the first pixel is set).
The compressed string form, as `pycocotools.mask.encode` writes it, stores each count as
5-bit groups, least significant first, one ASCII character (48 + value) per group; bit 5
(0x20) of a character says another group follows, and bit 4 of the last group is the sign.
From the fourth count on (index > 2) the stored value is the difference to the count two
positions before, which is a run of the same pixel value.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import numpy as np
import torch

from .errors import InputError

RLE = Dict[str, object]

_CHAR_OFFSET = 48
_GROUP_BITS = 5
_GROUP_MASK = 0x1F
_SIGN_BIT = 0x10
_MORE_BIT = 0x20


def _run_lengths(flat: np.ndarray) -> np.ndarray:
    """Lengths of the alternating runs of a 1-D bool array, the first one a run of zeros (int64)."""
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], starts, [flat.size]))
    runs = np.diff(edges)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs


def _counts_to_string(counts: Sequence[int]) -> str:
    """The compressed COCO string of a list of run lengths (pycocotools' `rleToString`)."""
    chars: List[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & _GROUP_MASK
            value >>= _GROUP_BITS
            more = value != (-1 if group & _SIGN_BIT else 0)
            chars.append(chr(_CHAR_OFFSET + (group | (_MORE_BIT if more else 0))))
    return "".join(chars)


def _string_to_counts(text: str) -> List[int]:
    """The run lengths stored in a compressed COCO string (pycocotools' `rleFrString`)."""
    counts: List[int] = []
    value, shift = 0, 0
    for char in text:
        code = ord(char) - _CHAR_OFFSET
        if not 0 <= code < 2 * _MORE_BIT:
            raise InputError(f"invalid character {char!r} in COCO RLE counts; expected ASCII 48-111")
        value |= (code & _GROUP_MASK) << shift
        shift += _GROUP_BITS
        if code & _MORE_BIT:
            continue
        if code & _SIGN_BIT:
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value, shift = 0, 0
    if shift:
        raise InputError("truncated COCO RLE counts: the last count has no final character")
    return counts


def encode_mask(mask: Union[np.ndarray, torch.Tensor]) -> RLE:
    """Compressed COCO RLE of a binary mask.

    mask: [H, W] bool or integer array or tensor (any device); nonzero pixels are foreground.
    Returns {"size": [H, W], "counts": str}, the same as
    `pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))` with counts decoded.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask must have shape [H, W], got {list(mask.shape)}")
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise InputError(f"mask must be bool or integer, got {mask.dtype}; threshold it first")
    runs = _run_lengths(mask.ravel(order="F") != 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_string(runs.tolist())}


def decode_mask(rle: RLE) -> np.ndarray:
    """The bool mask [H, W] of a COCO RLE.

    rle: {"size": [H, W], "counts": ...} with counts a compressed string (str or bytes,
    as pycocotools writes it) or an uncompressed list of run lengths.
    """
    try:
        height, width = (int(side) for side in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise InputError('RLE must be a dict with "size": [H, W] and "counts"') from None
    if height < 0 or width < 0:
        raise InputError(f"RLE size must be non-negative, got [{height}, {width}]")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    runs = np.asarray(_string_to_counts(counts) if isinstance(counts, str) else counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any():
        raise InputError("RLE counts must be a flat list of non-negative run lengths")
    if runs.sum() != height * width:
        raise InputError(f"RLE counts sum to {int(runs.sum())} pixels, but size {height}x{width} has {height * width}")
    values = np.arange(runs.size) % 2 == 1
    return np.repeat(values, runs).reshape((height, width), order="F")
