"""BEiT-3 multiway encoder: DeRIS's cognition encoder (torchscale `Encoder` as DeRIS builds it).

One joint pre-LN transformer over `[vision (1 + num_patches), text (T)]` tokens. Every
LayerNorm and Linear inside it is "multiway": expert `A` (vision) handles the first
`1 + num_patches` tokens and expert `B` (language) the rest; attention is joint over all
tokens. Layers use torchscale's sub-LN (`inner_attn_ln` before `out_proj`, `ffn_layernorm`
before `fc2`).

Numerics follow upstream, including its deliberate float32 casts: the attention softmax
runs in float32 and the FFN GELU on `x.float()`, both cast back to the model dtype (so a
float64 run rounds them to float32, and float16/bfloat16 runs compute them in float32).

State-dict keys equal upstream's under `understanding_branch.vis_enc.beit3.` with that
prefix stripped, except `vision_embed.mask_token` (unused at inference), which is not created.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import Beit3Config

# torchscale (fairseq convention) starts positions at 2: rows 0 and 1 of both tables are unused.
POSITION_OFFSET = 2


class Beit3Tokens(NamedTuple):
    """The encoder output split by role (views into the `[B, 1 + P + T, D]` output)."""

    cls: torch.Tensor  # [B, D] vision cls token (unused by DeRIS)
    image_tokens: torch.Tensor  # [B, P, D] patch tokens, row-major patch order
    text_tokens: torch.Tensor  # [B, T, D] text tokens, padded positions included


class Multiway(nn.Module):
    """Two experts made by the same factory: `A` on tokens `[:split]`, `B` on tokens `[split:]`.

    forward(x [B, L, ...], split) -> cat([A(x[:, :split]), B(x[:, split:])], dim=1).
    """

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.A = make_expert()
        self.B = make_expert()

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class VisionEmbedding(nn.Module):
    """Patch embedding with a prepended cls token.

    forward(image [B, 3, S, S]) -> [B, 1 + (S / patch)^2, D]: cls, then patches row-major.
    """

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.img_size = config.img_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        patches = self.proj(image).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class MultiwayPositions(nn.Module):
    """Learned position tables: `A` for vision tokens (1 + P + 2 rows), `B` for text tokens.

    forward(num_vision, num_text) -> [num_vision + num_text, D]: rows 2.. of A for the vision
    tokens, then rows 2.. of B for the text tokens (each modality counts from its own start).
    """

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.A = nn.Embedding(config.num_patches + 1 + POSITION_OFFSET, config.embed_dim)
        self.B = nn.Embedding(config.max_text_positions, config.embed_dim)

    def forward(self, num_vision: int, num_text: int) -> torch.Tensor:
        vision = self.A.weight[POSITION_OFFSET : POSITION_OFFSET + num_vision]
        text = self.B.weight[POSITION_OFFSET : POSITION_OFFSET + num_text]
        return torch.cat([vision, text], dim=0)


class FeedForward(nn.Module):
    """Sub-LN FFN: fc1 -> GELU (on float32, cast back) -> ffn_layernorm -> fc2. [..., D] -> [..., D]."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(config.ffn_dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden.float()).to(hidden.dtype)
        return self.fc2(self.ffn_layernorm(hidden))


class MultiwaySelfAttention(nn.Module):
    """Joint multi-head self-attention with multiway projections and sub-LN.

    forward(x [B, L, D], split, key_padding_mask [B, L] bool, True = ignore as key) -> [B, L, D].
    q is scaled by head_dim^-0.5 after its projection; the softmax runs in float32. float64 runs
    compute it as upstream does (float32 softmax, rounded back); other dtypes through
    `scaled_dot_product_attention` (the same sums, fused, in another order).
    """

    def __init__(self, config: Beit3Config):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = dim // config.num_heads
        self.scaling = self.head_dim**-0.5

        def linear() -> nn.Module:
            return nn.Linear(dim, dim)

        self.k_proj = Multiway(linear)
        self.v_proj = Multiway(linear)
        self.q_proj = Multiway(linear)
        self.out_proj = Multiway(linear)
        self.inner_attn_ln = Multiway(lambda: nn.LayerNorm(dim, eps=config.layernorm_eps))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, heads, L, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(x, split) * self.scaling)
        k = self._heads(self.k_proj(x, split))
        v = self._heads(self.v_proj(x, split))
        if q.dtype == torch.float64:  # upstream's float32 softmax, rounding included
            logits = (q @ k.transpose(-1, -2)).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
            attended = weights @ v
        else:  # fused attention; its softmax runs in float32 for float16/bfloat16 too
            keep = ~key_padding_mask[:, None, None, :]
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0)
        return self.out_proj(self.inner_attn_ln(attended.transpose(1, 2).flatten(2), split), split)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + FFN(LN(x)); every LN/Linear is multiway."""

    def __init__(self, config: Beit3Config):
        super().__init__()

        def layer_norm() -> nn.Module:
            return nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps)

        self.self_attn = MultiwaySelfAttention(config)
        self.self_attn_layer_norm = Multiway(layer_norm)
        self.ffn = Multiway(lambda: FeedForward(config))
        self.final_layer_norm = Multiway(layer_norm)

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split, key_padding_mask)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Encoder(nn.Module):
    """Positions, padding zeroing, the layer stack and the final multiway LayerNorm.

    forward(x [B, L, D] token embeddings, split = number of vision tokens,
    padding_mask [B, L] bool, True = padding) -> [B, L, D].
    """

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.embed_positions = MultiwayPositions(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.layer_norm = Multiway(lambda: nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps))

    def forward(self, x: torch.Tensor, split: int, padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.embed_positions(split, x.shape[1] - split)
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        for layer in self.layers:
            x = layer(x, split, padding_mask)
        return self.layer_norm(x, split)


class Beit3Encoder(nn.Module):
    """DeRIS's BEiT-3 (vision + language, multiway). Build with `Beit3Encoder(config)`.

    forward(image, tokens, padding_mask) -> [B, 1 + P + T, D] in the model dtype, with
    P = config.num_patches; `split_tokens` splits it into cls / image / text tokens.
    """

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.config = config
        self.num_vision_tokens = 1 + config.num_patches
        self.text_embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.vision_embed = VisionEmbedding(config)
        self.encoder = Encoder(config)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Encode an image and a token sequence jointly.

        image: [B, 3, S, S] normalized RGB (S = config.img_size), cast to the model dtype.
        tokens: [B, T] int64 token ids.
        padding_mask: [B, T] bool or 0/1 integers, True/1 = padding (bos and eos are real).
        Returns [B, 1 + P + T, D]: cls, P patch tokens, T text tokens (padded ones included).
        """
        self._check_inputs(image, tokens, padding_mask)
        vision = self.vision_embed(image.to(self.vision_embed.proj.weight.dtype))
        text = self.text_embed(tokens)
        vision_padding = torch.zeros(vision.shape[:2], dtype=torch.bool, device=vision.device)
        padding = torch.cat([vision_padding, padding_mask.to(device=vision.device, dtype=torch.bool)], dim=1)
        return self.encoder(torch.cat([vision, text], dim=1), self.num_vision_tokens, padding)

    def split_tokens(self, output: torch.Tensor) -> Beit3Tokens:
        """Split a `forward` output [B, 1 + P + T, D] into cls [B, D], image [B, P, D], text [B, T, D]."""
        split = self.num_vision_tokens
        return Beit3Tokens(output[:, 0], output[:, 1:split], output[:, split:])

    def _check_inputs(self, image: torch.Tensor, tokens: torch.Tensor, padding_mask: torch.Tensor) -> None:
        side = self.config.img_size
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, side, side):
            raise InputError(f"BEiT-3 image must have shape [B, 3, {side}, {side}], got {tuple(image.shape)}")
        if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[0] != image.shape[0]:
            raise InputError(
                f"tokens must be int64 [B, T] with B = {image.shape[0]}, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tuple(padding_mask.shape) != tuple(tokens.shape):
            raise InputError(
                f"padding_mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(padding_mask.shape)}"
            )
        max_tokens = self.config.max_text_positions - POSITION_OFFSET
        if tokens.shape[1] > max_tokens:
            raise InputError(f"at most {max_tokens} text tokens fit the position table, got {tokens.shape[1]}")
