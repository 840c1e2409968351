"""The loopback perception decoder (upstream `perception_branch.predictor`).

N queries are refined over `decoder_layers` Mask2Former-style masked-attention layers. Around
them, 1 + decoder_layers *loopback rounds* each (1) predict masks, boxes and the next layer's
attention mask from the queries, then (2) let the queries look at their own masks
(`query_SA`), at the text (`Q2TCA`, which also yields the referring logits) and fuse both
(`refer_proj`). Attribute names follow upstream so checkpoints load by identity.

Batch semantics of `query_SA`: upstream feeds a [B, N, C] tensor to a sequence-first
attention, so it attends across the *batch* (one sequence per query slot) and a result
depends on what else is in the batch; at batch size 1 it reduces to
`LN(x + out_proj(v_proj(x)))`. `"per_sample"` (our default) gives every sample that
batch-size-1 result whatever the batch; `"upstream"` reproduces the batched behaviour.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DerisConfig
from .position import sine_position_embedding_2d

BATCH_SEMANTICS = ("per_sample", "upstream")


class MLP(nn.Module):
    """Linear layers with ReLU between them (keys `layers.i.*`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention: `LN(x + MHA(x + pos, x + pos, x))` over dim 1 of [B, L, C]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        qk = x if pos is None else x + pos
        return self.norm(x + self.self_attn(qk, qk, x, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    """Post-norm masked cross-attention from queries [B, N, C] to a feature map [B, HW, C]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, memory: Tensor, memory_pos: Tensor, query_pos: Tensor, attn_mask: Tensor) -> Tensor:
        """attn_mask: bool [B * heads, N, HW], True = may not attend."""
        out = self.multihead_attn(x + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(x + out)


class FFNLayer(nn.Module):
    """Post-norm feed-forward: `LN(x + linear2(relu(linear1(x))))`."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class TextCrossAttention(nn.Module):
    """Queries attend to text tokens; padded tokens get -100 added to their logits (upstream's rule)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, padding_mask: Tensor) -> Tensor:
        """query [B, N, C], key/value [B, T, C], padding_mask bool [B, T] (True = pad) -> [B, N, C]."""
        b, n, c = query.shape
        heads = lambda x: x.unflatten(-1, (self.num_heads, c // self.num_heads)).transpose(1, 2)  # noqa: E731
        q = heads(self.q(query)) * (c // self.num_heads) ** -0.5
        logits = q @ heads(self.k(key)).transpose(-2, -1) + padding_mask[:, None, None, :].to(q.dtype) * -100
        attn = logits.softmax(dim=-1) if logits.dtype in (torch.float32, torch.float64) else logits.float().softmax(-1).to(q.dtype)
        return self.proj((attn @ heads(self.v(value))).transpose(1, 2).reshape(b, n, c))


class QueryTextLayer(nn.Module):
    """Upstream `Q2TCA` (GlobalDecoderLayer, post-norm): self-attention, text cross-attention, FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int):
        super().__init__()
        self.cross_attn = TextCrossAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, text: Tensor, text_pos: Tensor, text_padding: Tensor) -> Tensor:
        """x [B, N, C], text [B, T, C], text_pos [T, C], text_padding bool [B, T] -> [B, N, C]."""
        x = self.norm2(x + self.self_attn(x, x, x, need_weights=False)[0])
        x = self.norm1(x + self.cross_attn(x, text + text_pos, text, text_padding))
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


def text_position_embedding(length: int, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Upstream's 1-D text position embedding [length, dim], built in float32 then cast.

    Upstream casts the inverse frequencies to int64, so all but the first become 0: column 0
    is sin(pos), column 1 cos(pos), other even columns 0 and other odd columns 1.
    """
    pos = torch.arange(length, device=device, dtype=torch.float32)
    emb = torch.zeros(length, dim, device=device, dtype=torch.float32)
    emb[:, 1::2] = 1.0
    emb[:, 0], emb[:, 1] = pos.sin(), pos.cos()
    return emb.to(dtype)


class LoopbackDecoder(nn.Module):
    """Masked-attention decoder with the loopback rounds. Keys as upstream `perception_branch.predictor`."""

    def __init__(self, config: DerisConfig):
        super().__init__()
        c, heads = config.hidden_dim, config.num_heads
        self.num_heads = heads
        self.num_feature_levels = config.num_feature_levels
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(c, heads) for _ in range(config.decoder_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(c, heads) for _ in range(config.decoder_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(c, config.decoder_ffn) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c)
        self.query_embed = nn.Embedding(config.num_queries, c)
        self.level_embed = nn.Embedding(config.num_feature_levels, c)
        self.mask_embed = MLP(c, c, c, 3)
        self.box_embed = MLP(c, c, 4, 3)
        self.query_SA = nn.ModuleList(SelfAttentionLayer(c, heads) for _ in range(config.loopback_rounds))
        self.Q2TCA = nn.ModuleList(QueryTextLayer(c, config.decoder_ffn, heads) for _ in range(config.loopback_rounds))
        self.SEG_cls = nn.Linear(c, 2)
        self.refer_proj = nn.ModuleList(nn.Linear(2 * c, c) for _ in range(config.loopback_rounds))
        self.channel_proj_conv = nn.Conv2d(2 * c, c, kernel_size=1)

    def forward(
        self,
        multi_scale: List[Tensor],
        mask_features: Tensor,
        queries: Tensor,
        text_feat: Tensor,
        text_padding: Tensor,
        img_feat: Tensor,
        batch_semantics: str = "per_sample",
        keep_intermediates: bool = False,
    ) -> List[Dict[str, Tensor]]:
        """Run all rounds.

        multi_scale: 3 maps [B, C, h_l, w_l], low to high resolution; mask_features [B, C, H/4, W/4];
        queries [B, N, C] initial queries; text_feat [B, T, C]; text_padding bool [B, T] (True = pad);
        img_feat [B, C, 14, 14] BEiT-3 image tokens. Returns one dict per round with
        `mask_logits_stride4` [B, N, H/4, W/4], `boxes` [B, N, 4] (cx, cy, w, h in [0, 1]),
        `refer_logits` [B, N, 2] (class 0 = referred), `query` [B, N, C] (after refer_proj),
        `attn_mask` bool [B, N, h*w] for the next decoder layer (True = masked, before fully
        masked rows are cleared), and the intermediate query states `query_before_loopback`,
        `query_after_query_SA`, `query_refer`; with keep_intermediates=True (parity checks), after
        round 0 also the decoder layer's `after_cross_attn` and `after_self_attn` (its FFN output
        is `query_before_loopback`).
        """
        if batch_semantics not in BATCH_SEMANTICS:
            raise ValueError(f"batch_semantics must be one of {BATCH_SEMANTICS}, got {batch_semantics!r}")
        dtype = queries.dtype
        memories, memory_pos, sizes = [], [], []
        for level, feat in enumerate(multi_scale):
            sizes.append(tuple(feat.shape[-2:]))
            pos = sine_position_embedding_2d(feat.shape[-2], feat.shape[-1], feat.shape[1] // 2, feat.device)
            memory_pos.append(pos.flatten(2).transpose(1, 2).to(dtype))
            memories.append(feat.flatten(2).transpose(1, 2) + self.level_embed.weight[level])
        query_pos = self.query_embed.weight.unsqueeze(0)
        text_pos = text_position_embedding(text_feat.shape[1], text_feat.shape[2], dtype, text_feat.device)
        img_up = F.interpolate(img_feat, size=mask_features.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.channel_proj_conv(torch.cat([mask_features, img_up], dim=1))
        pooled = F.avg_pool2d(fused, kernel_size=4, stride=4)

        rounds = []
        q = queries
        for r in range(len(self.query_SA)):
            state = {}
            if r > 0:
                layer, attn_mask = r - 1, rounds[-1]["attn_mask"]
                level = layer % self.num_feature_levels
                attn_mask = (attn_mask & ~attn_mask.all(dim=-1, keepdim=True)).repeat_interleave(self.num_heads, dim=0)
                after_cross_attn = self.transformer_cross_attention_layers[layer](
                    q, memories[level], memory_pos[level], query_pos, attn_mask
                )
                after_self_attn = self.transformer_self_attention_layers[layer](after_cross_attn, query_pos)
                if keep_intermediates:
                    state["after_cross_attn"], state["after_self_attn"] = after_cross_attn, after_self_attn
                q = self.transformer_ffn_layers[layer](after_self_attn)
            state.update(self._heads(q, fused, sizes[r % self.num_feature_levels]))
            state.update(self._loopback(r, q, state["mask_logits_stride4"], pooled, text_feat, text_pos, text_padding, batch_semantics))
            q = state["query"]
            rounds.append(state)
        return rounds

    def _heads(self, q: Tensor, fused: Tensor, attn_size) -> Dict[str, Tensor]:
        """Masks [B, N, H/4, W/4], boxes [B, N, 4] and the next attention mask bool [B, N, h*w]."""
        d = self.decoder_norm(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(d), fused)
        boxes = self.box_embed(d).sigmoid()
        small = F.interpolate(masks.float(), size=attn_size, mode="bilinear", align_corners=False).to(q.dtype)
        attn_mask = small.sigmoid().flatten(2) < 0.5
        return {"query_before_loopback": q, "mask_logits_stride4": masks, "boxes": boxes, "attn_mask": attn_mask}

    def _loopback(self, r, q, masks, pooled, text_feat, text_pos, text_padding, batch_semantics) -> Dict[str, Tensor]:
        """Round r: queries see their own masks (query_SA), then the text (Q2TCA); both are fused."""
        small = F.interpolate(masks, size=pooled.shape[-2:], mode="bilinear", align_corners=False).sigmoid()
        mask_embedding = torch.einsum("bnhw,bchw->bnc", small, pooled) / (small.shape[-2] * small.shape[-1])
        b, n, c = q.shape
        if batch_semantics == "upstream":
            q_sa = self.query_SA[r](q.transpose(0, 1), mask_embedding.transpose(0, 1)).transpose(0, 1)
        else:
            q_sa = self.query_SA[r](q.reshape(b * n, 1, c), mask_embedding.reshape(b * n, 1, c)).reshape(b, n, c)
        q_refer = self.Q2TCA[r](q_sa, text_feat, text_pos, text_padding)
        return {
            "query_after_query_SA": q_sa,
            "query_refer": q_refer,
            "refer_logits": self.SEG_cls(q_refer),
            "query": self.refer_proj[r](torch.cat([q_sa, q_refer], dim=-1)),
        }
