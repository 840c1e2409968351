"""Model-input transforms: an RGB image -> DeRIS's two normalised inputs; masks back to image size.

Upstream's val pipeline: resize the ORIGINAL image twice with cv2 bilinear on uint8 (to the
perception size for Swin and the cognition size for BEiT-3, both from the model's config;
aspect ratio not kept), then normalise with the ImageNet mean/std in RGB order. The result is
float32 CHW, bit-identical to upstream's `HierResize` + `Normalize`. Masks go back to the
image's size with cv2 INTER_NEAREST semantics.
"""
from __future__ import annotations

import operator
from typing import Sequence, Tuple

import cv2
import numpy as np
import torch

from .errors import InputError
from .images import checked_rgb_array

IMAGE_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGE_STD_RGB = (58.395, 57.12, 57.375)
# mmcv.imnormalize: the float32 constants, the mean subtracted in float32 and 1/std (from the
# float32 std, in float64) multiplied in float64, as OpenCV 4.x applied its float64 scalars. The
# arithmetic is spelled out with numpy: OpenCV 5.1's cv2.multiply rounds a float64 scalar to
# float32 first, which changes a third of the pixels' last bit [measured on the parity fixture].
_MEAN_F32 = np.asarray(IMAGE_MEAN_RGB, dtype=np.float32)
_INV_STD_F64 = 1.0 / np.asarray(IMAGE_STD_RGB, dtype=np.float32).astype(np.float64)


def prepare_images(rgb: np.ndarray, image_size: int, image_size_lo: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two normalised model inputs of one image, exactly as upstream's pipeline.

    rgb: uint8 [H, W, 3] RGB; image_size, image_size_lo: the model's perception and cognition
    input sizes (`DerisConfig.image_size`, `.image_size_lo`: 384 and 224 for the official models).
    Returns (img [3, image_size, image_size] for Swin,
    img_mini [3, image_size_lo, image_size_lo] for BEiT-3), float32 CPU tensors, both
    resized from `rgb` itself.
    """
    rgb = checked_rgb_array(rgb, "prepare_images")
    image_size = _positive_int(image_size, "image_size")
    image_size_lo = _positive_int(image_size_lo, "image_size_lo")
    return _resize_and_normalise(rgb, image_size), _resize_and_normalise(rgb, image_size_lo)


def _resize_and_normalise(rgb: np.ndarray, size: int) -> torch.Tensor:
    """cv2 bilinear resize on uint8 to size x size, then (x - mean) / std -> float32 [3, size, size].

    Upstream normalises BGR after converting it to RGB; every step is per channel, so
    working on RGB from the start gives the same bits.
    """
    resized = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    image = ((resized.astype(np.float32) - _MEAN_F32) * _INV_STD_F64).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def resize_mask_nearest(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize [..., h, w] masks to [..., H, W] exactly as cv2.resize(..., INTER_NEAREST).

    size: (H, W). Values are copied, so the dtype is kept (bool in, bool out). OpenCV picks
    source index floor(i * (1 / (out / in))) in float64; torch's mode='nearest' uses a
    float32 scale and picks a different row or column for some sizes (e.g. 384 -> 34).
    """
    if not torch.is_tensor(mask) or mask.dim() < 2 or 0 in mask.shape[-2:]:
        raise InputError("mask: expected a tensor of shape [..., h, w] with h, w > 0")
    if not isinstance(size, Sequence) or len(size) != 2:
        raise InputError(f"size: expected (H, W), got {size!r}")
    height, width = _positive_int(size[0], "size[0] (H)"), _positive_int(size[1], "size[1] (W)")
    rows = _nearest_source_index(mask.shape[-2], height).to(mask.device)
    cols = _nearest_source_index(mask.shape[-1], width).to(mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


def _nearest_source_index(source_len: int, target_len: int) -> torch.Tensor:
    """int64 [target_len] source indices of OpenCV's nearest-neighbour resize along one axis."""
    step = 1.0 / (target_len / source_len)
    return (torch.arange(target_len, dtype=torch.float64) * step).floor().long().clamp_(max=source_len - 1)


def _positive_int(value: object, name: str) -> int:
    """`value` as an int if it is a positive integer (Python or NumPy), else raise InputError."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise InputError(f"{name}: expected a positive int, got {value!r}")
    return number
