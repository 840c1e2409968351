"""Bit-packed binary masks: 8 pixels per byte, row-major, most significant bit first (NumPy's
`packbits` order), so feature caches can carry every candidate's mask at a reduced size.

A mask of S x S pixels packs into ceil(S * S / 8) bytes (96 x 96: 1,152 bytes).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .errors import InputError


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """bool [..., H, W] -> uint8 [..., ceil(H * W / 8)] (on the CPU)."""
    if not torch.is_tensor(masks) or masks.dtype != torch.bool or masks.dim() < 2:
        raise InputError("masks: expected a bool tensor of shape [..., H, W]")
    flat = masks.detach().cpu().numpy().reshape(*masks.shape[:-2], -1)
    return torch.from_numpy(np.packbits(flat, axis=-1))


def unpack_masks(packed: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """uint8 [..., ceil(H * W / 8)] -> bool [..., H, W] for size = (H, W)."""
    height, width = size
    if packed.shape[-1] != -(-height * width // 8):
        raise InputError(f"packed masks of {packed.shape[-1]} bytes are not {height} x {width} masks")
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=height * width)
    return bits.astype(bool).reshape(*packed.shape[:-1], height, width)
