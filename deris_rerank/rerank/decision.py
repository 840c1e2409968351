"""The keep-or-switch decision shared by every re-ranker.

A re-ranker gives, for B pairs with N candidates each: the default candidate's slot
(`default_index` [B], DeRIS's own answer), a failure logit (`p_fail_logit` [B]: "the default
is wrong") and a per-candidate ranking value (`gain` [B, N]: a Venice-H1 gate's predicted IoU
gain, a calibrated re-ranker's fused logit). `apply_rule` turns them into a decision:

    p_fail = sigmoid(p_fail_logit / temp);  rank = gain - gain[default]
    switch to argmax(rank) only if p_fail > tau, and (when margin_pred is set) the best
    alternative's rank exceeds margin_pred, and (when margin_gap > 0) the best alternative
    beats the second best by more than margin_gap.

A set re-ranker (GRES: the answer may be no object or several) also gives, per pair, the
probabilities that the expression refers to no object, one or several (`kind_logits` [B, 3]) and
each candidate's membership logit (`member_logit` [B, N]); `apply_set_rule` makes the answer a
set of candidates:

    confidence < tau_defer                           -> DeRIS's own answer: the candidates scoring
                                                        above union_threshold
    (confidence = min(max(p_none, p_one, p_several), min over candidates of |2 sigmoid(member) - 1|):
    how sure the re-ranker is of how many objects and of which candidates belong)
    else p_none > tau_none                           -> no candidate ("no object matches")
    else p_several / (1 - p_none) > tau_several      -> the candidates with sigmoid(member) >
                                                        tau_member (the single choice when none is)
    else                                             -> the single choice of `apply_rule`
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..errors import CheckpointError, InputError


@dataclass(frozen=True)
class DecisionRule:
    """Keep/switch thresholds. `margin_pred=None` means no margin test (the packaged rule)."""

    tau: float
    temp: float = 1.0
    margin_pred: Optional[float] = 0.02
    margin_gap: float = 0.0


@dataclass
class GateDecision:
    """What the gate decided for a batch of B pairs with N candidates each (slot order).

    p_fail_logit [B], p_fail [B] in [0, 1]; rank [B, N] predicted IoU gain relative to the
    default candidate (0 at the default); default_index [B] and selected [B] int64 slot
    indices (slots, not ranks: `Result.selected_rank` is a rank by score); switched [B] bool
    (selected != default); calibrated [B, N]: a text-aware
    re-ranker's calibrated candidate-text logits (None for a Venice-H1 gate); retrieved [B, N]:
    a calibrated re-ranker's retrieved IoU estimates (None without a retrieval memory).
    """

    p_fail_logit: torch.Tensor
    p_fail: torch.Tensor
    rank: torch.Tensor
    default_index: torch.Tensor
    selected: torch.Tensor
    switched: torch.Tensor
    calibrated: Optional[torch.Tensor] = None
    retrieved: Optional[torch.Tensor] = None
    chosen: Optional[torch.Tensor] = None
    p_none: Optional[torch.Tensor] = None
    p_several: Optional[torch.Tensor] = None
    member: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SetRule:
    """Thresholds of a set answer (see the module docstring), each a probability in [0, 1].

    tau_defer 0 never defers; union_threshold is
    DeRIS's score threshold for its own answer (its config's `score_threshold` when tuned).
    """

    tau_none: float = 0.5
    tau_several: float = 0.5
    tau_member: float = 0.5
    tau_defer: float = 0.0
    union_threshold: float = 0.6


def apply_set_rule(rule: SetRule, single: Tensor, kind_logits: Tensor, member_logit: Tensor,
                   scores: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(chosen bool [B, N], p_none [B], p_several [B] (conditional on some object), member [B, N]
    probabilities) of set answers; single [B] int64: the slot `apply_rule` chose for each pair;
    scores [B, N]: DeRIS's candidate scores (its own answer, for deferring)."""
    kind = kind_logits.float().softmax(dim=-1)
    p_none = kind[:, 0]
    p_several = kind[:, 2] / (1 - p_none).clamp(min=1e-12)
    member = member_logit.float().sigmoid()
    n = member.shape[1]
    single_set = torch.arange(n, device=member.device)[None, :] == single[:, None]
    members = member > rule.tau_member
    several = (p_several > rule.tau_several)[:, None] & members.any(dim=1, keepdim=True)
    chosen = torch.where(several, members, single_set) & ~(p_none > rule.tau_none)[:, None]
    defer = set_confidence(kind, member) < rule.tau_defer
    chosen = torch.where(defer[:, None], scores > rule.union_threshold, chosen)
    return chosen, p_none, p_several, member


def set_confidence(kind: Tensor, member: Tensor) -> Tensor:
    """[B] in [0, 1]: a set re-ranker's confidence in its answer, from its kind probabilities [B, 3]
    and membership probabilities [B, N] (see the module docstring)."""
    return torch.minimum(kind.amax(dim=-1), (2 * member - 1).abs().amin(dim=-1))


def apply_rule(rule: DecisionRule, default_index: Tensor, p_fail_logit: Tensor, gain: Tensor) -> GateDecision:
    """The keep/switch decision from a re-ranker's outputs (see the module docstring).

    default_index [B] int64, p_fail_logit [B], gain [B, N] raw predicted gains.
    """
    rank = gain - gain.gather(1, default_index[:, None])
    p_fail = torch.sigmoid(p_fail_logit / rule.temp)
    is_default = torch.arange(rank.shape[1], device=rank.device)[None, :] == default_index[:, None]
    alternatives = rank.masked_fill(is_default, float("-inf"))
    top = alternatives.topk(min(2, rank.shape[1]), dim=1).values
    use_rerank = p_fail > rule.tau
    if rule.margin_pred is not None:
        use_rerank &= top[:, 0] > rule.margin_pred
    if rule.margin_gap > 0 and top.shape[1] > 1:
        use_rerank &= (top[:, 0] - top[:, 1]) > rule.margin_gap
    selected = torch.where(use_rerank, rank.argmax(dim=1), default_index)
    return GateDecision(p_fail_logit, p_fail, rank, default_index, selected, selected != default_index)


def check_tau(tau: Optional[float]) -> None:
    """Raise InputError unless `tau` is None or a number in [0, 1] (NaN is refused)."""
    if tau is not None and not (isinstance(tau, numbers.Real) and 0.0 <= tau <= 1.0):
        raise InputError(f"tau must be between 0 and 1 (the gate switches when p_fail > tau), got {tau!r}")


def named_rule(points: Mapping[str, DecisionRule], name: str, where: object) -> DecisionRule:
    """The operating point `name` of a re-ranker (`where`: its file or description, for the message)."""
    if name not in points:
        raise CheckpointError(f"{where} has no operating point {name!r} (it has: {', '.join(sorted(points)) or 'none'}); "
                              "leave the operating point out to use its own rule, or set tau instead")
    return points[name]
