"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

Each query looks at `n_points` sampled locations per head and per feature level, placed
around its reference point by learned offsets, and averages the bilinearly sampled values
with learned weights (softmax over all levels x points of a head). The sampling is
`grid_sample` (bilinear, zeros outside the map, align_corners=False), the same as upstream's
CPU fallback `ms_deform_attn_core_pytorch`; upstream's CUDA kernel computes the same sums.

Locations are normalised: (0, 0) is the top-left corner of a map and (1, 1) its bottom-right
corner, x first, so pixel (i, j) of an H x W map has its centre at ((j+0.5)/W, (i+0.5)/H).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Sequence[Tuple[int, int]]


def sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype deformable sampling and its softmax run in: float32/float64 as is, else float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def ms_deform_attn_sample(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values, per query and head.

    value: [N, S, M, D], the M heads' values of all levels flattened row-major, level after level
        (S = sum of H_l * W_l).
    spatial_shapes: the (H_l, W_l) of the L levels, in the order they appear in `value`.
    sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y), in [0, 1] inside the maps; pixels
        outside a map count as zeros (a point near the border gets part of a value).
    attention_weights: [N, Lq, M, L, P], the weight of each sampled point.

    Returns [N, Lq, M*D] in value's dtype, channels head-major. The sampling and the sum run in
    value's dtype for float32/float64 and in float32 for float16/bfloat16.
    """
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    work = sampling_dtype(value.dtype)
    levels = value.to(work).split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations.to(work) - 1  # grid_sample wants [-1, 1]
    weights = attention_weights.to(work)

    # Each level's points are sampled as a [P, Lq] "image" per head (not [Lq, P]): grid_sample's CPU
    # kernel vectorises along the output's last axis, and the weighted sum over points then adds
    # whole [D, Lq] rows. In float32 the result is bit for bit that of sampling [Lq, P] and summing
    # the last axis (the points are added in the same order), and about 2x faster on an AVX2 CPU
    # (docs/speed.md, "pixel decoder").
    output = value.new_zeros((batch * heads, head_dim, num_queries), dtype=work)
    for level, (h, w) in enumerate(spatial_shapes):
        level_value = levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        level_grid = grids[:, :, :, level].permute(0, 2, 3, 1, 4).flatten(0, 1)  # [N*M, P, Lq, 2]
        sampled = F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [N*M, D, P, Lq]
        level_weights = weights[:, :, :, level].permute(0, 2, 3, 1).flatten(0, 1)  # [N*M, P, Lq]
        level_sum = sampled[:, :, 0] * level_weights[:, None, 0]
        for point in range(1, sampled.shape[2]):  # P (4) row additions: 3x faster than mul + sum(2)
            level_sum += sampled[:, :, point] * level_weights[:, None, point]
        output += level_sum
    output = output.view(batch, heads * head_dim, num_queries).transpose(1, 2)
    return output.to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with upstream's parameter names.

    d_model: channels C of queries and values; n_heads: M (C must divide by M);
    n_levels: L feature levels; n_points: P sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: point k of head h starts k+1 pixels out along direction h."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().amax(-1, keepdim=True)  # onto the unit square
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        offsets = direction[:, None, None, :] * distance[None, None, :, None]  # [M, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """query: [N, Lq, C]; reference_points: [N or 1, Lq, L or 1, 2] normalised (x, y);
        input_flatten: [N, S, C] the levels flattened row-major, in `spatial_shapes` order.

        Returns [N, Lq, C] in the query's dtype.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        work = sampling_dtype(query.dtype)

        value = self.value_proj(input_flatten).view(batch, input_flatten.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2).to(work)
        logits = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = logits.softmax(-1, dtype=work).view(batch, num_queries, heads, levels, points)

        # offsets are in pixels of their level: divide x by W_l and y by H_l
        size_xy = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=work, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / size_xy[:, None, :]
        return self.output_proj(ms_deform_attn_sample(value, spatial_shapes, locations, weights))
