"""Venice-H1 candidate descriptors: 4 mask statistics and the 675-dim multi-scale grid signature.

Both are computed from `p = sigmoid(mask_logits)` at the mask's own resolution (384 x 384
for DeRIS's `pred_masks`). The grid signature concatenates, for G = 4, 8, 16:

    grid_mean_G (G*G)  adaptive average pooling of p to G x G, row-major
    grid_max_G  (G*G)  adaptive max pooling of p to G x G, row-major
    boundary_G  (1)    0.5 * (mean |horizontal differences of grid_mean_G|
                              + mean |vertical differences of grid_mean_G|)

which is 33 + 129 + 513 = 675 values. Pooling bins follow PyTorch's adaptive pooling, so
they overlap when a side is not a multiple of G.

Inputs may have any leading batch dims and live on any device. float64 logits are
processed in float64; every other floating dtype (float32, bfloat16, float16) in float32.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..settings import GRID_SIZES

MASK_STAT_NAMES: Tuple[str, ...] = ("mask_mean", "mask_max", "mask_area", "mask_std")
GRID_FIELDS: Tuple[Tuple[str, int], ...] = tuple(
    (f"{kind}_{g}", size)
    for g in GRID_SIZES
    for kind, size in (("grid_mean", g * g), ("grid_max", g * g), ("boundary", 1))
)
GRID_SIGNATURE_DIM = sum(size for _, size in GRID_FIELDS)  # 675


def mask_probabilities(mask_logits: torch.Tensor) -> torch.Tensor:
    """`sigmoid(mask_logits)` in the working dtype (float64 stays float64, else float32).

    mask_logits: [..., N, h, w] logits. Returns a tensor of the same shape.
    """
    if not torch.is_tensor(mask_logits) or not mask_logits.is_floating_point():
        raise InputError("mask_logits must be a floating-point tensor of shape [..., N, h, w]")
    if mask_logits.dim() < 3:
        raise InputError(f"mask_logits must have shape [..., N, h, w], got {tuple(mask_logits.shape)}")
    work_dtype = torch.float64 if mask_logits.dtype == torch.float64 else torch.float32
    return mask_logits.to(work_dtype).sigmoid()


def mask_statistics(mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-candidate [mean, max, area, std] of the mask probabilities.

    mask_logits: [..., N, h, w]. Returns [..., N, 4]: mean and max of p, area = fraction
    of pixels with p > 0.5 (a value in [0, 1], not a pixel count), std = unbiased
    standard deviation of p.
    """
    p = mask_probabilities(mask_logits).flatten(-2)
    return torch.stack(
        [p.mean(-1), p.amax(-1), (p > 0.5).to(p.dtype).mean(-1), p.std(-1, unbiased=True)], dim=-1
    )


def grid_signatures(mask_logits: torch.Tensor) -> torch.Tensor:
    """The 675-dim multi-scale grid signature of every candidate.

    mask_logits: [..., N, h, w]. Returns [..., N, 675] in the field order of `GRID_FIELDS`.
    """
    p = mask_probabilities(mask_logits)
    lead, (h, w) = p.shape[:-2], p.shape[-2:]
    planes = p.reshape(-1, 1, h, w)  # one channel per candidate mask
    parts = []
    for g in GRID_SIZES:
        grid_mean = F.adaptive_avg_pool2d(planes, g)
        grid_max = F.adaptive_max_pool2d(planes, g)
        horizontal = (grid_mean[..., :, 1:] - grid_mean[..., :, :-1]).abs().mean(dim=(-2, -1))
        vertical = (grid_mean[..., 1:, :] - grid_mean[..., :-1, :]).abs().mean(dim=(-2, -1))
        parts += [grid_mean.flatten(1), grid_max.flatten(1), 0.5 * (horizontal + vertical)]
    return torch.cat(parts, dim=-1).reshape(*lead, GRID_SIGNATURE_DIM)


def grid_scale_mask(scales: Sequence[int]) -> torch.Tensor:
    """float [675]: 1 on the fields of the grid sizes in `scales`, 0 elsewhere (for ablations)."""
    keep = [float(int(name.rsplit("_", 1)[1]) in scales) for name, size in GRID_FIELDS for _ in range(size)]
    return torch.tensor(keep)


def split_grid_signature(signature: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Split [..., 675] signatures into the named Venice-H1 cache fields.

    Returns e.g. `grid_mean_4` [..., 16] and `boundary_4` [...] (boundaries lose their last dim).
    """
    fields = {}
    for (name, size), chunk in zip(GRID_FIELDS, signature.split([s for _, s in GRID_FIELDS], dim=-1)):
        fields[name] = chunk.squeeze(-1) if size == 1 else chunk
    return fields
