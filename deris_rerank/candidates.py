"""Candidates: DeRIS's N proposals for a batch of pairs, and the gate's view of them.

Everything stays in DeRIS's own query-slot order, because the released Venice-H1 gate reads
it that way; `order` gives the by-score view that people read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

import torch
from torch import Tensor

from .deris.answer import working_precision
from .deris.model import DerisOutput
from .errors import InputError
from .rerank.signatures import grid_signatures, mask_statistics
from .rerank.text_context import TEXT_FIELDS, TextContext
from .timing import StageTimer

if TYPE_CHECKING:
    from .tokenizer import TextNotes

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
    def from_outputs(cls, outputs: DerisOutput, query_source: str = "perception") -> "Candidates":
        """From `DerisModel.forward` outputs. query_source: "perception" (the perception queries
        after the last loopback round, as the Venice-H1 caches) or "cognition" (the aligner's)."""
        if query_source not in QUERY_SOURCES:
            raise ValueError(f"query_source must be one of {QUERY_SOURCES}, got {query_source!r}")
        embed = outputs.query_embed if query_source == "perception" else outputs.cognition_embed
        existence = outputs.existence_logit.float().sigmoid().squeeze(-1)
        text = TextContext.from_outputs(outputs) if all(k in outputs for k in TEXT_FIELDS) else None
        return cls(outputs.mask_logits, outputs.scores, embed, existence, text)

    @property
    def default_index(self) -> Tensor:
        """[B] slot of Query-0, DeRIS's own first choice: argmax of the scores."""
        return self.scores.argmax(dim=-1)

    @property
    def order(self) -> Tensor:
        """[B, N] slots sorted by descending score (ties keep slot order)."""
        return self.scores.argsort(dim=-1, descending=True, stable=True)

    def answer_mask(self, score_threshold: float, mask_threshold: float = 0.5) -> Tensor:
        """bool [B, S, S]: DeRIS's own answer (see `deris_answer_mask`)."""
        return deris_answer_mask(self.mask_logits, self.scores, score_threshold, mask_threshold)

    def gate_features(self) -> Tuple[Tensor, Tensor]:
        """(mask statistics [B, N, 4], grid signatures [B, N, 675]), computed in float32 or float64."""
        return mask_statistics(self.mask_logits), grid_signatures(self.mask_logits)

    def binary_masks(self, threshold: float = 0.5) -> Tensor:
        """bool [B, N, S, S]: sigmoid(mask_logits) >= threshold (in float32, or float64), as DeRIS binarises."""
        logits = self.mask_logits if self.mask_logits.dtype == torch.float64 else self.mask_logits.float()
        return logits.sigmoid() >= threshold


@dataclass
class CandidateBatch:
    """One model run: pairs `indices` (into the caller's list), their RGB images, DeRIS's raw
    `outputs` and `candidates` (on the pipeline's device), the stage timer of the run, each
    pair's share of its image's decode time (ms) and what the tokenizer noted of its text."""

    indices: List[int]
    images: List[np.ndarray]
    candidates: Candidates
    outputs: DerisOutput
    timer: StageTimer
    load_ms: List[float]
    text_notes: List[TextNotes] = field(default_factory=list)


def deris_answer_mask(
    mask_logits_384: torch.Tensor, scores: torch.Tensor, score_threshold: float, mask_threshold: float = 0.5
) -> torch.Tensor:
    """DeRIS's final mask: union over candidates with score > score_threshold of sigmoid(logits) >= mask_threshold.

    mask_logits_384: [..., N, S, S] mask logits (upstream's 384 px `pred_masks`);
    scores: [..., N] referring scores. Returns bool [..., S, S]; all False where no
    candidate's score is strictly above the threshold.
    """
    if not torch.is_tensor(mask_logits_384) or not mask_logits_384.is_floating_point() or mask_logits_384.dim() < 3:
        raise InputError("mask_logits_384: expected a floating-point tensor of shape [..., N, S, S]")
    if not torch.is_tensor(scores) or scores.shape != mask_logits_384.shape[:-2]:
        got = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise InputError(
            f"scores: expected shape {tuple(mask_logits_384.shape[:-2])} to match mask_logits_384 "
            f"{tuple(mask_logits_384.shape)}, got {got}"
        )
    foreground = working_precision(mask_logits_384).sigmoid() >= mask_threshold
    selected = (scores > score_threshold)[..., None, None]
    return (foreground & selected).any(dim=-3)
