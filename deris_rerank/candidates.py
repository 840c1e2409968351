"""Candidates: DeRIS's N proposals for a batch of pairs, and the gate's view of them.

Everything stays in DeRIS's own query-slot order, because the released Venice-H1 gate reads
it that way; `order` gives the by-score view that people read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .signatures import grid_signatures, mask_statistics
from .text_context import TEXT_FIELDS, TextContext

QUERY_SOURCES = ("perception", "cognition")


@dataclass
class Candidates:
    """B image-text pairs with N candidates each, slot order.

    mask_logits [B, N, S, S] logits at the perception input size (DeRIS's `pred_masks`);
    scores [B, N] referring probability; query_embed [B, N, D] what the gate reads;
    existence [B] sigmoid of DeRIS's existence logit (P(a referent exists); upstream
    computes it but does not use it); text: what a text-aware re-ranker reads besides
    (DeRIS's referring logits, cognition embeddings, the expression's token features and
    padding; see `TextContext`), or None when the outputs lack it.
    """

    mask_logits: Tensor
    scores: Tensor
    query_embed: Tensor
    existence: Tensor
    text: Optional[TextContext] = None

    @classmethod
    def from_outputs(cls, outputs: Dict[str, Tensor], query_source: str = "perception") -> "Candidates":
        """From `DerisModel.forward` outputs. query_source: "perception" (the perception queries
        after the last loopback round, as the Venice-H1 caches) or "cognition" (the aligner's)."""
        if query_source not in QUERY_SOURCES:
            raise ValueError(f"query_source must be one of {QUERY_SOURCES}, got {query_source!r}")
        embed = outputs["query_embed" if query_source == "perception" else "cognition_embed"]
        existence = outputs["existence_logit"].float().sigmoid().squeeze(-1)
        text = TextContext.from_outputs(outputs) if all(k in outputs for k in TEXT_FIELDS) else None
        return cls(outputs["mask_logits"], outputs["scores"], embed, existence, text)

    @property
    def default_index(self) -> Tensor:
        """[B] slot of Query-0, DeRIS's own first choice: argmax of the scores."""
        return self.scores.argmax(dim=-1)

    @property
    def order(self) -> Tensor:
        """[B, N] slots sorted by descending score (ties keep slot order)."""
        return self.scores.argsort(dim=-1, descending=True, stable=True)

    def gate_features(self) -> Tuple[Tensor, Tensor]:
        """(mask statistics [B, N, 4], grid signatures [B, N, 675]), computed in float32 or float64."""
        return mask_statistics(self.mask_logits), grid_signatures(self.mask_logits)

    def binary_masks(self, threshold: float = 0.5) -> Tensor:
        """bool [B, N, S, S]: sigmoid(mask_logits) >= threshold (in float32, or float64), as DeRIS binarises."""
        logits = self.mask_logits if self.mask_logits.dtype == torch.float64 else self.mask_logits.float()
        return logits.sigmoid() >= threshold

