"""Hungarian matching and the DeRIS training losses (Mask2Former-style).

Per image, the N query slots are matched one-to-one to the K annotated instances (all
objects of the image, so every candidate slot learns to segment something: "perception
supervision on all instances"); the referred instances are a subset of them. The matching
cost is the mask cost (sigmoid BCE + Dice) plus, with weight `match_refer` (0 by default),
the referring probability: with it, the matcher can send the referred object to whichever
slot already scores high, and the scores learn slot priors instead of grounding (observed
when training DeRIS-tiny). Losses: BCE + Dice on matched masks, and cross-entropy on the
referring logits (class 0 = referred): matched slots of referred instances labelled 0, all
other slots 1 (weight 0.1, as upstream's `empty_weight`).

Instance attributes (optional): see `attributes.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .attributes import AttributeHeads, attribute_cross_entropy, pooled_attribute_loss


@dataclass(frozen=True)
class LossWeights:
    """Mask and Dice weights as Mask2Former (5, 5); the referring weight is 5 rather than its class
    weight 2, because from scratch the referring decision is what a small DeRIS learns slowest.
    Aux rounds are scaled by `aux`; existence BCE 1; instance-attribute CE `attributes`."""

    refer: float = 5.0
    mask: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1
    aux: float = 0.5
    existence: float = 1.0
    match_refer: float = 0.0
    attributes: float = 6.0


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
    instances: Sequence[Tensor],
    referred: Sequence[Tensor],
    weights: LossWeights,
    attribute_logits: Optional[Sequence[Tensor]] = None,
    attributes: Optional[Sequence[Tensor]] = None,
) -> Dict[str, Tensor]:
    """Losses of one loopback round for a batch.

    mask_logits [B, N, h, w]; refer_logits [B, N, 2]; instances[b] float [K_b, h, w];
    referred[b] bool [K_b]. Optional: attribute_logits, one [B, N, V_a] per attribute, and
    attributes[b] int64 [K_b, A] (the instances' labels). Returns refer, mask, dice and, with
    attributes, `attributes` (mean CE over attributes on matched slots); weights not applied.
    """
    batch, slots = refer_logits.shape[:2]
    labels = torch.ones(batch, slots, dtype=torch.long, device=refer_logits.device)
    matched_logits: List[Tensor] = []
    matched_targets: List[Tensor] = []
    matched_slots: List[Tensor] = []
    matched_labels: List[Tensor] = []
    for b in range(batch):
        slot_idx, obj_idx = hungarian_match(mask_logits[b], refer_logits[b], instances[b], referred[b], weights)
        slot_idx = torch.from_numpy(slot_idx).to(labels.device)
        obj_idx = torch.from_numpy(obj_idx).to(labels.device)
        labels[b, slot_idx] = torch.where(referred[b][obj_idx], 0, 1)
        matched_logits.append(mask_logits[b, slot_idx])
        matched_targets.append(instances[b][obj_idx])
        matched_slots.append(b * slots + slot_idx)
        if attributes is not None:
            matched_labels.append(attributes[b][obj_idx])
    class_weight = torch.tensor([1.0, weights.no_object], device=refer_logits.device)
    refer = F.cross_entropy(refer_logits.float().flatten(0, 1), labels.flatten(), weight=class_weight)
    logits = torch.cat(matched_logits).flatten(1).float()
    targets = torch.cat(matched_targets).flatten(1).float()
    if logits.shape[0] == 0:
        zero = mask_logits.sum() * 0
        losses = {"refer": refer, "mask": zero, "dice": zero}
        return losses if attributes is None else {**losses, "attributes": zero}
    mask = F.binary_cross_entropy_with_logits(logits, targets)
    probs = logits.sigmoid()
    dice = (1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)).mean()
    losses = {"refer": refer, "mask": mask, "dice": dice}
    if attributes is not None:
        flat_slots, labels_k = torch.cat(matched_slots), torch.cat(matched_labels)
        losses["attributes"] = attribute_cross_entropy([a.flatten(0, 1)[flat_slots] for a in attribute_logits], labels_k)
    return losses


def deris_loss(
    outputs: Dict,
    instances,
    referred,
    exists: Tensor,
    weights: LossWeights,
    attribute_heads: Optional[AttributeHeads] = None,
    attributes: Optional[Sequence[Tensor]] = None,
    feature_maps: Sequence[Tensor] = (),
) -> Dict[str, Tensor]:
    """Total loss over every loopback round (the last with weight 1, earlier ones x `aux`) + existence
    (+ the instance-attribute losses when `attribute_heads` and `attributes` are given).

    outputs: DerisModel.forward(..., return_rounds=True); exists float [B] (1 when a referent exists).
    attributes[b] int64 [K_b, A]; feature_maps: the pixel-decoder maps [B, C, h, w] that
    `attribute_heads.maps` read (instance masks averaged over them).
    """
    rounds = outputs["rounds"]
    parts: Dict[str, Tensor] = {}
    total = weights.existence * F.binary_cross_entropy_with_logits(outputs["existence_logit"].float().squeeze(-1), exists)
    parts["existence"] = total.detach()
    for r, state in enumerate(rounds):
        scale = 1.0 if r == len(rounds) - 1 else weights.aux
        attribute_logits = None if attribute_heads is None else attribute_heads.queries(state["query_before_loopback"])
        losses = round_losses(
            state["mask_logits_stride4"], state["refer_logits"], instances, referred, weights, attribute_logits, attributes
        )
        round_total = weights.refer * losses["refer"] + weights.mask * losses["mask"] + weights.dice * losses["dice"]
        if attribute_logits is not None:
            round_total = round_total + weights.attributes * losses["attributes"]
        total = total + scale * round_total
        if r == len(rounds) - 1:
            parts.update({k: v.detach() for k, v in losses.items()})
    if attribute_heads is not None:
        parts["pixel_attributes"] = pooled_attribute_loss(feature_maps, instances, attributes, attribute_heads.maps)
        total = total + weights.attributes * parts["pixel_attributes"]
        parts["pixel_attributes"] = parts["pixel_attributes"].detach()
    parts["total"] = total
    return parts
