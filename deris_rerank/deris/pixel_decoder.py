"""DeRIS's pixel decoder: Mask2Former's `MSDeformAttnPixelDecoder` with one FPN level.

res5, res4 and res3 of the Swin go through a deformable-attention encoder over the three
levels together; the encoder's res3-sized map is then upsampled and added to the projected
res2 (a one-level FPN), which gives the stride-4 mask features.

Attribute names follow upstream, so `PixelDecoder.state_dict()` has exactly the keys that
the checkpoints store under `perception_branch.pixel_decoder.`.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import DerisConfig
from .deform_attn import MSDeformAttn, SpatialShapes
from .position import sine_position_embedding_2d


def reference_points(spatial_shapes: SpatialShapes, device: torch.device) -> torch.Tensor:
    """Pixel centres ((j+0.5)/W, (i+0.5)/H) of every level, row-major, level after level.

    Returns float32 [1, S, 1, 2] (x, y): upstream builds them in float32 in every dtype, and
    with no padding (valid ratios 1) they are the same for every level they sample.
    """
    centres = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        centres.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2))
    return torch.cat(centres)[None, :, None, :]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, ref_points: torch.Tensor, spatial_shapes: SpatialShapes
    ) -> torch.Tensor:
        """src: [B, S, C]; pos: [B or 1, S, C]; ref_points: [1, S, 1, 2]. Returns [B, S, C]."""
        src = self.norm1(src + self.self_attn(src + pos, ref_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """The stack of encoder layers (upstream `MSDeformAttnTransformerEncoder`)."""

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, d_ffn, n_levels, n_heads, n_points) for _ in range(num_layers)
        )

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes) -> torch.Tensor:
        """src: [B, S, C] and pos: [B or 1, S, C], the levels flattened row-major in
        `spatial_shapes` order. Returns [B, S, C]."""
        ref_points = reference_points(spatial_shapes, src.device)
        for layer in self.layers:
            src = layer(src, pos, ref_points, spatial_shapes)
        return src


class MultiScaleEncoder(nn.Module):
    """Flattens the levels, adds the level embeddings to the positions, runs the encoder
    (upstream `MSDeformAttnTransformerEncoderOnly`)."""

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.encoder = DeformableEncoder(num_layers, d_model, d_ffn, n_levels, n_heads, n_points)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """srcs: the L maps [B, C, h_l, w_l]; pos_embeds: their positions, [B or 1, C, h_l, w_l].

        Returns the encoded maps [B, C, h_l, w_l], in the same order.
        """
        spatial_shapes = [tuple(src.shape[-2:]) for src in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[level] for level, p in enumerate(pos_embeds)], dim=1
        )
        memory = self.encoder(src, pos, spatial_shapes)
        maps = memory.split([h * w for h, w in spatial_shapes], dim=1)
        return [m.transpose(1, 2).reshape(src.shape[0], -1, h, w) for m, (h, w) in zip(maps, spatial_shapes)]


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, groups: int, relu: bool) -> nn.Sequential:
    """Conv2d ('same' padding) + GroupNorm(groups), optionally + ReLU."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.GroupNorm(groups, out_channels),
    ]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """Swin features [res2, res3, res4, res5] -> (mask features, 3 encoder maps).

    Widths come from `config`: input channels `config.swin.stage_dims`, conv/mask dim
    C = `config.hidden_dim`, `config.pixel_decoder_layers` encoder layers with FFN
    `config.pixel_decoder_ffn`, `config.num_heads` heads, `config.num_points` points,
    GroupNorm with `config.group_norm_groups` groups.
    """

    def __init__(self, config: DerisConfig):
        super().__init__()
        dim = config.hidden_dim
        groups = config.group_norm_groups
        res2_dim, *encoder_dims = config.swin.stage_dims
        if len(encoder_dims) != config.num_feature_levels:
            raise ValueError(
                f"the pixel decoder encodes res3..res5: {config.num_feature_levels} levels need "
                f"{config.num_feature_levels + 1} Swin stages, got {len(config.swin.stage_dims)}"
            )
        # index 0 projects the coarsest level (res5), the last one res3
        self.input_proj = nn.ModuleList(
            _conv_norm(channels, dim, 1, groups, relu=False) for channels in reversed(encoder_dims)
        )
        self.transformer = MultiScaleEncoder(
            config.pixel_decoder_layers,
            dim,
            config.pixel_decoder_ffn,
            config.num_feature_levels,
            config.num_heads,
            config.num_points,
        )
        self.mask_features = nn.Conv2d(dim, dim, kernel_size=1)
        self.adapter_1 = _conv_norm(res2_dim, dim, 1, groups, relu=True)
        self.layer_1 = _conv_norm(dim, dim, 3, groups, relu=True)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """features: [res2, res3, res4, res5], NCHW at strides 4, 8, 16, 32.

        Returns (mask_features [B, C, H/4, W/4], multi_scale_features): the encoder maps at
        strides 32, 16, 8 ([B, C, 12, 12], [B, C, 24, 24], [B, C, 48, 48] for a 384 input),
        low to high resolution. Everything is in the dtype of the features.
        """
        if len(features) != len(self.input_proj) + 1:
            raise InputError(f"the pixel decoder takes [res2, res3, res4, res5], got {len(features)} maps")
        res2, *encoder_inputs = features
        coarse_to_fine = encoder_inputs[::-1]
        srcs = [proj(x) for proj, x in zip(self.input_proj, coarse_to_fine)]
        pos = [sine_position_embedding_2d(*x.shape[-2:], x.shape[1] // 2, x.device) for x in srcs]
        # positions are built in float32, then cast to the features' dtype (upstream)
        pos = [p.to(x.dtype) for p, x in zip(pos, coarse_to_fine)]
        multi_scale_features = self.transformer(srcs, pos)

        lateral = self.adapter_1(res2)
        # upstream upsamples in float32 even in a float64 run
        upsampled = F.interpolate(
            multi_scale_features[-1].float(), size=lateral.shape[-2:], mode="bilinear", align_corners=False
        )
        fpn = self.layer_1(lateral + upsampled.to(res2.dtype))
        return self.mask_features(fpn), multi_scale_features
