"""Hungarian matching and the DeRIS training losses (Mask2Former-style).

Per image, the N query slots are matched one-to-one to the K annotated instances (all
objects of the image, so every candidate slot learns to segment something: "perception
supervision on all instances"); the referred instances are a subset of them. The matching
cost is the mask cost (sigmoid BCE + Dice) plus, with weight `match_refer` (0 by default),
the referring probability: with it, the matcher can send the referred object to whichever
slot already scores high, and the scores learn slot priors instead of grounding (observed
when training DeRIS-tiny). Losses: BCE + Dice on matched masks, and cross-entropy on the
referring logits (class 0 = referred): matched slots of referred instances labelled 0, all
other slots 1 (weight 0.1, as upstream's `empty_weight`). Upstream's box head is not trained
(its box weight is 0, as here).

Instance attributes (optional): see `attributes.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .attributes import AttributeHead, AttributeHeads, attribute_cross_entropy


@dataclass(frozen=True)
class LossWeights:
    """Mask and Dice weights as Mask2Former (5, 5); the referring weight is 5 rather than its class
    weight 2, because from scratch the referring decision is what a small DeRIS learns slowest.
    Aux rounds are scaled by `aux`; existence BCE 1; instance-attribute CE `attributes` (queries
    and pixel maps); the referent's attributes from the text features `referent`."""

    refer: float = 5.0
    mask: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1
    aux: float = 0.5
    existence: float = 1.0
    match_refer: float = 0.0
    attributes: float = 6.0
    referent: float = 2.0


class PairTargets(NamedTuple):
    """What each of a batch's B image-text pairs should produce, one entry per pair.

    instances[b] float [K_b, h, w] (0/1, every object of the pair's image); referred[b] bool
    [K_b]; attributes[b] int64 [K_b, A] (see `attributes.py`), None when not supervised.
    """

    instances: Sequence[Tensor]
    referred: Sequence[Tensor]
    attributes: Optional[Sequence[Tensor]] = None


def pairwise_mask_costs(logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(BCE cost, Dice cost) [N, K] between N mask logits [N, P] and K binary targets [K, P] (flattened)."""
    pixels = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (pos @ targets.T + neg @ (1 - targets).T) / pixels
    probs = logits.sigmoid()
    dice = 1 - (2 * probs @ targets.T + 1) / (probs.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)
    return bce, dice


def hungarian_match(
    mask_logits: Tensor, refer_logits: Tensor, instances: Tensor, referred: Tensor, weights: LossWeights
) -> Tuple[np.ndarray, np.ndarray]:
    """Match slots to instances for one image: (slot indices, instance indices), each [min(N, K)].

    mask_logits [N, h, w], refer_logits [N, 2], instances float [K, h, w] (0/1), referred bool [K].
    """
    if instances.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    with torch.no_grad():
        bce, dice = pairwise_mask_costs(mask_logits.flatten(1).float(), instances.flatten(1).float())
        refer_prob = refer_logits.float().softmax(-1)  # [N, 2]
        wanted = torch.where(referred, 0, 1)  # the class each instance's slot should predict
        refer_cost = -refer_prob[:, wanted]  # [N, K]
        cost = weights.mask * bce + weights.dice * dice + weights.match_refer * refer_cost
    slots, objects = linear_sum_assignment(cost.cpu().numpy())
    return slots.astype(np.int64), objects.astype(np.int64)


def round_losses(
    mask_logits: Tensor,
    refer_logits: Tensor,
    targets: PairTargets,
    weights: LossWeights,
    attribute_logits: Optional[Sequence[Tensor]] = None,
) -> Dict[str, Tensor]:
    """Losses of one loopback round for a batch of B pairs.

    mask_logits [B, N, h, w]; refer_logits [B, N, 2]; attribute_logits: one [B, N, V_a] per
    attribute. Returns refer, mask, dice, and `attributes` (mean CE over attributes on matched
    slots) when attribute_logits and targets.attributes are given; weights not applied.
    """
    batch, slots = refer_logits.shape[:2]
    with_attributes = attribute_logits is not None and targets.attributes is not None
    labels = torch.ones(batch, slots, dtype=torch.long, device=refer_logits.device)
    flat_slots: List[Tensor] = []
    matched_objects: List[Tuple[int, Tensor]] = []
    for b in range(batch):
        slot_idx, obj_idx = hungarian_match(mask_logits[b], refer_logits[b], targets.instances[b], targets.referred[b], weights)
        slot_idx = torch.from_numpy(slot_idx).to(labels.device)
        obj_idx = torch.from_numpy(obj_idx).to(labels.device)
        labels[b, slot_idx] = torch.where(targets.referred[b][obj_idx], 0, 1)
        flat_slots.append(b * slots + slot_idx)
        matched_objects.append((b, obj_idx))
    gather = lambda per_pair: torch.cat([per_pair[b][idx] for b, idx in matched_objects])  # noqa: E731
    class_weight = torch.tensor([1.0, weights.no_object], device=refer_logits.device)
    losses = {"refer": F.cross_entropy(refer_logits.float().flatten(0, 1), labels.flatten(), weight=class_weight)}
    matched = torch.cat(flat_slots)
    if matched.numel() == 0:
        zero = mask_logits.sum() * 0
        names = ["mask", "dice"] + ["attributes"] * with_attributes
        return {**losses, **{name: zero for name in names}}
    logits = mask_logits.flatten(0, 1)[matched].flatten(1).float()
    wanted = gather(targets.instances).flatten(1).float()
    losses["mask"] = F.binary_cross_entropy_with_logits(logits, wanted)
    probs = logits.sigmoid()
    losses["dice"] = (1 - (2 * (probs * wanted).sum(-1) + 1) / (probs.sum(-1) + wanted.sum(-1) + 1)).mean()
    if with_attributes:
        losses["attributes"] = attribute_cross_entropy([a.flatten(0, 1)[matched] for a in attribute_logits], gather(targets.attributes))
    return losses


def deris_loss(
    outputs: Mapping[str, Any],
    targets: PairTargets,
    exists: Tensor,
    weights: LossWeights,
    attribute_heads: Optional[AttributeHeads] = None,
    text_padding: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """Total loss over every loopback round (the last with weight 1, earlier ones x `aux`) + existence.

    outputs: DerisModel.forward(..., return_rounds=True) (a DerisOutput, read by key: rounds,
    existence_logit, text_feat); exists float [B] (1 when a referent
    exists). With `attribute_heads` and targets.attributes, also the query-attribute loss of
    every round (unless weights.attributes is 0) and, given the tokens' text_padding bool
    [B, T] (True = pad), the referent-attribute loss on the text features (unless
    weights.referent is 0). Returns the weighted
    `total` and the unweighted parts (of the last round).
    """
    rounds = outputs["rounds"]
    parts: Dict[str, Tensor] = {}
    total = weights.existence * F.binary_cross_entropy_with_logits(outputs["existence_logit"].float().squeeze(-1), exists)
    parts["existence"] = total.detach()
    scaled = {"refer": weights.refer, "mask": weights.mask, "dice": weights.dice, "attributes": weights.attributes}
    supervise_attributes = attribute_heads is not None and targets.attributes is not None
    query_attributes = supervise_attributes and weights.attributes > 0
    for r, state in enumerate(rounds):
        attribute_logits = attribute_heads.queries(state["query_before_loopback"]) if query_attributes else None
        losses = round_losses(state["mask_logits_stride4"], state["refer_logits"], targets, weights, attribute_logits)
        round_total = sum(scaled[name] * value for name, value in losses.items())
        total = total + (1.0 if r == len(rounds) - 1 else weights.aux) * round_total
        if r == len(rounds) - 1:
            parts.update({k: v.detach() for k, v in losses.items()})
    if supervise_attributes and text_padding is not None and weights.referent > 0:
        referent = referent_attribute_loss(outputs["text_feat"], text_padding.bool(), targets, attribute_heads.text)
        total = total + weights.referent * referent
        parts["referent"] = referent.detach()
    parts["total"] = total
    return parts


def referent_attribute_loss(text_feat: Tensor, text_padding: Tensor, targets: PairTargets, head: AttributeHead) -> Tensor:
    """Attribute CE of the referent, read from the text features averaged over the non-padding tokens.

    text_feat [B, T, C]; text_padding bool [B, T] (True = pad). Only pairs with exactly one
    referent count (0 when there are none): the cognition branch is asked to say what the
    referred object looks like, which for "the leftmost star" it can only learn from the image.
    """
    single = [b for b, r in enumerate(targets.referred) if int(r.sum()) == 1]
    if not single:
        return text_feat.sum() * 0
    keep = (~text_padding[single]).to(text_feat.dtype)[..., None]
    pooled = (text_feat[single] * keep).sum(1) / keep.sum(1).clamp(min=1)
    labels = torch.stack([targets.attributes[b][targets.referred[b]][0] for b in single])
    return attribute_cross_entropy(head(pooled), labels)
