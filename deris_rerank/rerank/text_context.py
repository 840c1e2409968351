"""TextContext: what a text-aware re-ranker reads beyond the Venice-H1 candidate features.

For B image-text pairs with N candidates, T text tokens, K referring classes and width D
(DeRIS's decoder width):

  refer_logits    [B, N, K]  DeRIS's raw referring logits (class 0 = "referred"; the
                             scores are softmax(refer_logits)[..., 0])
  cognition_embed [B, N, D]  the cognition branch's per-candidate embeddings (aligner output)
  text_feat       [B, T, D]  the expression's cognition token features (BEiT-3's text tokens
                             projected to the decoder width)
  text_padding    [B, T]     bool, True = padding token (carries no text)

`pooled_text` gives the masked mean of the token features, [B, D].
"""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch
from torch import Tensor

TEXT_FIELDS = ("refer_logits", "cognition_embed", "text_feat", "text_padding")


def pooled_text(text_feat: Tensor, text_padding: Tensor) -> Tensor:
    """Mean of text_feat [..., T, D] over the non-padding tokens (text_padding bool [..., T]) -> [..., D].

    A row with no real token gives zeros.
    """
    keep = (~text_padding.bool()).to(text_feat.dtype)[..., None]
    return (text_feat * keep).sum(dim=-2) / keep.sum(dim=-2).clamp(min=1)


class TextContext(NamedTuple):
    """The text-aware inputs of B pairs (shapes in the module docstring)."""

    refer_logits: Tensor
    cognition_embed: Tensor
    text_feat: Tensor
    text_padding: Tensor

    @classmethod
    def from_outputs(cls, outputs: Dict[str, Tensor]) -> "TextContext":
        """From `DerisModel.forward` outputs (`refer_logits`, `cognition_embed`, `text_feat`, `text_padding`)."""
        return cls(outputs["refer_logits"], outputs["cognition_embed"], outputs["text_feat"], outputs["text_padding"].bool())

    @property
    def pooled(self) -> Tensor:
        """[B, D] masked mean of the token features."""
        return pooled_text(self.text_feat, self.text_padding)

    def to(self, device=None, dtype=None) -> "TextContext":
        """Float tensors to `dtype` (when given) and everything to `device`; the padding stays bool."""
        floats = [t.to(device=device, dtype=dtype or t.dtype) for t in self[:3]]
        return TextContext(*floats, self.text_padding.to(device=device, dtype=torch.bool))

    def select(self, rows) -> "TextContext":
        """The pairs `rows` (an index or slice over B) of every tensor."""
        return TextContext(*(t[rows] for t in self))
