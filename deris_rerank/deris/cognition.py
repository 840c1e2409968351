"""The cognition branch around BEiT-3 (upstream `understanding_branch`, BEiT-3 itself excluded).

Pre-pass: project BEiT-3's image and text tokens to the decoder width C and turn the learned
`init_query` rows into the decoder's initial queries. Post-pass: the multi-grain aligner (a
3-layer post-norm DETR decoder from queries to text) and the existence head. Attribute names
follow upstream (`roialigner.TextCorrelation.layers.i.attentions.j.attn`, ...) so checkpoints
load by identity.
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor, nn

from .config import DerisConfig


class _Attention(nn.Module):
    """Holds one batch-first attention under `.attn` (upstream's wrapper adds the residual)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)


class _FFN(nn.Module):
    """`layers.0.0` (Linear C->F), ReLU, `layers.1` (Linear F->C), as upstream's FFN."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU()), nn.Linear(ffn_dim, dim))


class AlignerLayer(nn.Module):
    """Post-norm: self-attention over queries, cross-attention to text, FFN (each + residual, then LN)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([_Attention(dim, num_heads), _Attention(dim, num_heads)])
        self.ffns = nn.ModuleList([_FFN(dim, ffn_dim)])
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, q: Tensor, text: Tensor, text_padding: Tensor) -> Tensor:
        """q [B, N, C], text [B, T, C], text_padding bool [B, T] (True = pad) -> [B, N, C]."""
        q = self.norms[0](q + self.attentions[0].attn(q, q, q, need_weights=False)[0])
        attended = self.attentions[1].attn(q, text, text, key_padding_mask=text_padding, need_weights=False)[0]
        q = self.norms[1](q + attended)
        return self.norms[2](q + self.ffns[0].layers(q))


class _TextCorrelation(nn.Module):
    def __init__(self, config: DerisConfig):
        super().__init__()
        c = config.hidden_dim
        self.layers = nn.ModuleList(AlignerLayer(c, config.num_heads, config.aligner_ffn) for _ in range(config.aligner_layers))
        self.post_norm_layer = nn.LayerNorm(c)


class MultiGrainAligner(nn.Module):
    """Refines the decoder's final queries against the text (upstream `roialigner`)."""

    def __init__(self, config: DerisConfig):
        super().__init__()
        self.TextCorrelation = _TextCorrelation(config)

    def forward(self, q: Tensor, text: Tensor, text_padding: Tensor) -> Tensor:
        for layer in self.TextCorrelation.layers:
            q = layer(q, text, text_padding)
        return self.TextCorrelation.post_norm_layer(q)


class CognitionBranch(nn.Module):
    """Projections into the decoder width, initial queries, aligner and existence head."""

    def __init__(self, config: DerisConfig):
        super().__init__()
        d, c = config.beit3.embed_dim, config.hidden_dim
        self.grid = config.beit3.img_size // config.beit3.patch_size
        self.vis_embed = nn.Linear(d, c)
        self.text_embed = nn.Linear(d, c)
        self.roialigner = MultiGrainAligner(config)
        self.perception_embed = nn.Linear(d, c)
        self.nt_embed = nn.Linear(c, 1)
        self.init_query = nn.Embedding(config.num_queries, d)

    def project(self, image_tokens: Tensor, text_tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """BEiT-3 tokens -> (img_feat [B, C, g, g], text_feat [B, T, C], initial queries [B, N, C]).

        image_tokens [B, g*g, D] in row-major patch order (cls excluded), text_tokens [B, T, D].
        """
        b = image_tokens.shape[0]
        img_feat = self.vis_embed(image_tokens).transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        queries = self.perception_embed(self.init_query.weight).unsqueeze(0).expand(b, -1, -1)
        return img_feat, self.text_embed(text_tokens), queries

    def align(self, queries: Tensor, text_feat: Tensor, text_padding: Tensor) -> Tuple[Tensor, Tensor]:
        """Final perception queries [B, N, C] -> (cognition queries [B, N, C], existence logit [B, 1]).

        The existence logit is the mean over queries of `nt_embed`; sigmoid gives P(a referent exists).
        """
        cognition = self.roialigner(queries, text_feat, text_padding)
        return cognition, self.nt_embed(cognition).mean(dim=-2)

