"""2-D sine position embedding of a feature map (DETR / Mask2Former `PositionEmbeddingSine`).

Upstream builds it in float32 whatever the model dtype and casts the result afterwards. The
float32 arithmetic below is upstream's, op for op, so the values are the same bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _axis_embedding(
    length: int, num_pos_feats: int, device: Optional[torch.device], temperature: float, scale: float, eps: float
) -> torch.Tensor:
    """float32 [length, num_pos_feats]: the sin/cos features of positions 1..length along one axis."""
    coord = torch.arange(1, length + 1, dtype=torch.float32, device=device)
    coord = coord / (coord[-1:] + eps) * scale
    channel = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    wavelength = temperature ** (2 * torch.div(channel, 2, rounding_mode="floor") / num_pos_feats)
    angle = coord[:, None] / wavelength
    return torch.stack((angle[:, 0::2].sin(), angle[:, 1::2].cos()), dim=2).flatten(1)


def sine_position_embedding_2d(
    height: int,
    width: int,
    num_pos_feats: int,
    device: Optional[torch.device] = None,
    temperature: float = 10000,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalised sine/cosine embedding of every pixel of a `height` x `width` map.

    Row i (0-based) has the angle y = (i+1) / (height + eps) * scale, column j has
    x = (j+1) / (width + eps) * scale. Channel k of each half holds sin (k even) or cos (k odd)
    of angle / temperature^(2*floor(k/2) / num_pos_feats).

    Returns float32 [1, 2*num_pos_feats, height, width], the y half first, then the x half.
    The embedding is the same for every batch item: it broadcasts over the batch.
    """
    pos_y = _axis_embedding(height, num_pos_feats, device, temperature, scale, eps).T  # [F, H]
    pos_x = _axis_embedding(width, num_pos_feats, device, temperature, scale, eps).T  # [F, W]
    grid = (num_pos_feats, height, width)
    return torch.cat((pos_y[:, :, None].expand(grid), pos_x[:, None, :].expand(grid)), dim=0)[None]
