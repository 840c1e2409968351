"""The perception backbone: an mmseg-style Swin Transformer (upstream `hier_vision_encoder`).

Feature maps travel between blocks channels-last, [B, H, W, C]. Upstream behaviour kept on purpose:
- odd blocks shift by -(window // 2) and mask cross-region attention with -100 even when the map
  is a single window (timm's Swin drops the shift there);
- a map that is not a multiple of the window is zero-padded at the bottom/right AFTER norm1, the
  padded tokens take part in attention as keys/values (no padding mask) and are cropped afterwards.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SwinConfig

_SHIFT_MASK_VALUE = -100.0


def relative_position_index(window_size: int, device: Optional[torch.device] = None) -> Tensor:
    """Index into the (2w-1)^2 bias table for every (query, key) pair of a w x w window.

    Returns int64 [w*w, w*w]: (dy + w - 1) * (2w - 1) + (dx + w - 1), with d = query - key coordinates
    and tokens numbered row-major inside the window.
    """
    coords = torch.arange(window_size, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    delta_rows = rows[:, None] - rows[None, :] + (window_size - 1)
    delta_cols = cols[:, None] - cols[None, :] + (window_size - 1)
    return delta_rows * (2 * window_size - 1) + delta_cols


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B * nW, w*w, C], windows row-major per image."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def shifted_window_mask(
    padded_height: int, padded_width: int, window_size: int, shift_size: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Additive attention mask of the shifted windows: [nW, w*w, w*w], 0 within a region, -100 across.

    Each axis of the padded (and rolled) map splits into [0, L-w), [L-w, L-shift), [L-shift, L);
    two tokens of one window may attend to each other only if they lie in the same 2-D region.
    """

    def axis_region(length: int) -> Tensor:
        position = torch.arange(length, device=device)
        return (position >= length - window_size).long() + (position >= length - shift_size).long()

    region = axis_region(padded_height)[:, None] * 3 + axis_region(padded_width)[None, :]
    region_windows = window_partition(region[None, :, :, None], window_size).squeeze(-1)  # [nW, w*w]
    crosses_regions = region_windows[:, None, :] != region_windows[:, :, None]
    return torch.zeros(crosses_regions.shape, device=device, dtype=dtype).masked_fill_(
        crosses_regions, _SHIFT_MASK_VALUE
    )


class WindowLayout:
    """How an H x W map is cut into w x w windows, for the plain and the shifted blocks of a stage.

    The map is zero-padded at the bottom/right to Hp x Wp (multiples of w). For shift s, the padded
    map is rolled by (-s, -s) and partitioned into windows (row-major, tokens row-major inside):
    `token_order[s]` [Hp*Wp] gives, for each window token, its flat index in the padded map, and
    `map_order[s]` [H*W] gives, for each pixel of the unpadded map, its position in the windows.
    `shift_mask` [nW, w*w, w*w] is the additive mask of the shifted windows.
    """

    def __init__(self, height: int, width: int, window_size: int, shift_size: int, device, dtype):
        self.height, self.width = height, width
        # rounded up with non-negative operands only: an ONNX trace divides negative sizes truncating
        self.padded_height = (height + window_size - 1) // window_size * window_size
        self.padded_width = (width + window_size - 1) // window_size * window_size
        self.window_size = window_size
        self.num_windows = (self.padded_height // window_size) * (self.padded_width // window_size)
        self.token_order = {}
        self.map_order = {}
        for shift in {0, shift_size}:
            self.token_order[shift], self.map_order[shift] = self._orders(shift, device)
        self.shift_mask = shifted_window_mask(
            self.padded_height, self.padded_width, window_size, shift_size, device, dtype
        )

    def _orders(self, shift: int, device):
        rows = (torch.arange(self.padded_height, device=device) + shift) % self.padded_height
        cols = (torch.arange(self.padded_width, device=device) + shift) % self.padded_width
        rolled_source = rows[:, None] * self.padded_width + cols[None, :]  # [Hp, Wp] flat source index
        token_order = window_partition(rolled_source[None, :, :, None], self.window_size).flatten()
        window_position = torch.empty_like(token_order)
        window_position[token_order] = torch.arange(token_order.numel(), device=device)
        map_order = window_position.view(self.padded_height, self.padded_width)[: self.height, : self.width]
        return token_order, map_order.flatten()

    @property
    def needs_padding(self) -> bool:
        return (self.padded_height, self.padded_width) != (self.height, self.width)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv with stride patch, then LayerNorm.

    [B, in_chans, H, W] -> [B, ceil(H/patch), ceil(W/patch), embed_dim]; the image is zero-padded at
    the bottom/right to a multiple of the patch size first.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        patch = self.patch_size
        pad_bottom, pad_right = (patch - height % patch) % patch, (patch - width % patch) % patch  # see WindowLayout
        if pad_bottom or pad_right:
            image = F.pad(image, (0, pad_right, 0, pad_bottom))
        return self.norm(self.proj(image).permute(0, 2, 3, 1))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative-position bias.

    softmax(q @ k^T * head_dim^-0.5 + bias[relative_position_index] (+ shift mask)) @ v through
    scaled_dot_product_attention: its fused kernels keep the softmax in float32 for float16/bfloat16
    inputs, and in float64 it matches upstream's explicit (q * scale) @ k^T + bias + mask to ~1e-15.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def derived_buffers(self) -> Dict[str, Tensor]:
        """Buffers that are pure functions of the window size, freshly computed on the CPU (real values
        even when the module was built on the meta device); the checkpoint loader checks and sets them."""
        return {"relative_position_index": relative_position_index(self.window_size, device=torch.device("cpu"))}

    def relative_position_bias(self) -> Tensor:
        """[num_heads, w*w, w*w] bias added to the attention logits."""
        return self.relative_position_bias_table.t()[:, self.relative_position_index]

    def forward(self, windows: Tensor, shift_mask: Optional[Tensor] = None) -> Tensor:
        """windows: [B * nW, N, C]; shift_mask: [nW, N, N] additive or None. Returns [B * nW, N, C]."""
        num_windows_total, tokens, channels = windows.shape
        qkv = self.qkv(windows).view(num_windows_total, tokens, 3, self.num_heads, channels // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B * nW, heads, N, head_dim]

        bias = self.relative_position_bias().unsqueeze(0)  # [1, heads, N, N]
        if shift_mask is not None:
            num_windows = shift_mask.shape[0]
            bias = (bias + shift_mask.unsqueeze(1)).expand(num_windows_total // num_windows, -1, -1, -1, -1)
            bias = bias.reshape(num_windows_total, self.num_heads, tokens, tokens)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scale)
        return self.proj(attended.transpose(1, 2).reshape(num_windows_total, tokens, channels))


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2 on the last dimension."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """x + WMSA(pad(norm1(x))) cropped, then x + MLP(norm2(x)); [B, H, W, C] -> [B, H, W, C].

    shift_size > 0 rolls the padded map by -shift before partitioning (and back afterwards) and
    applies the shift mask; both are done through the gathers of the stage's `WindowLayout`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float):
        super().__init__()
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, layout: WindowLayout) -> Tensor:
        batch, height, width, channels = x.shape
        y = self.norm1(x)
        if layout.needs_padding:
            y = F.pad(y, (0, 0, 0, layout.padded_width - width, 0, layout.padded_height - height))
        windows = y.view(batch, -1, channels).index_select(1, layout.token_order[self.shift_size])
        windows = windows.view(batch * layout.num_windows, -1, channels)
        attended = self.attn(windows, layout.shift_mask if self.shift_size else None)
        attended = attended.view(batch, -1, channels).index_select(1, layout.map_order[self.shift_size])
        x = x + attended.view(batch, height, width, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 space-to-depth, LayerNorm(4C), Linear 4C -> 2C without bias: [B, H, W, C] -> [B, H', W', 2C].

    Odd sides are zero-padded first (H' = ceil(H/2)). The 4C channels are ordered
    [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)] (row offset varies fastest).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        half_height, half_width = (height + 1) // 2, (width + 1) // 2
        x = x.view(batch, half_height, 2, half_width, 2, channels)
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(batch, half_height, half_width, 4 * channels)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating shift 0 / window // 2, then an optional PatchMerging.

    forward returns (stage output [B, H, W, C], input of the next stage or None).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if index % 2 == 0 else self.shift_size, mlp_ratio)
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        height, width = x.shape[1:3]
        layout = WindowLayout(height, width, self.window_size, self.shift_size, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, layout)
        return x, (self.downsample(x) if self.downsample is not None else None)


class SwinBackbone(nn.Module):
    """mmseg-style Swin: image [B, 3, H, W] -> [res2, res3, res4, res5].

    res{i+2} is norm{i}(stage i output) in NCHW, [B, stage_dims[i], H / 2^(i+2), W / 2^(i+2)]
    (strides 4, 8, 16, 32, rounded up), in the dtype of the parameters and input.
    """

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        dims = config.stage_dims
        num_stages = len(config.depths)
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(dims[i], config.depths[i], config.num_heads[i], config.window_size, config.mlp_ratio,
                      downsample=i < num_stages - 1)
            for i in range(num_stages)
        )
        for i in range(num_stages):
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))

    def forward(self, image: Tensor) -> List[Tensor]:
        x = self.patch_embed(image)
        features = []
        for i, stage in enumerate(self.layers):
            stage_output, x = stage(x)
            out_norm = getattr(self, f"norm{i}")
            features.append(out_norm(stage_output).permute(0, 3, 1, 2).contiguous())
        return features
