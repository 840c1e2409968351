"""Metrics of answers that are sets of candidates (GRES), as gRefCOCO's evaluator defines them.

An answer to one pair is a set of its N candidates; its mask is their union, and it is "empty"
(it says "no object") when that union has no pixel. Per pair, with I and U the intersection and
union of the answer's mask with the target (the union of the referred objects):

  no-target pair (the expression refers to nothing):  empty answer: IoU 1, I = U = 0 (a true
      positive for N-acc);  non-empty answer: IoU 0, I = 0, U = its area (a false negative)
  pair with targets:  empty answer: IoU 0, I = 0, U = the target's area (a false positive for
      T-acc);  otherwise IoU = I / U

  gIoU = mean per-pair IoU (%); cIoU = sum I / sum U (%); N-acc = share of no-target pairs
  answered empty (%); T-acc = share of pairs with targets answered non-empty (%);
  Pr@t = share of pairs with targets whose IoU >= t, t in 0.7, 0.8, 0.9 (%).

These are the rules of DeRIS's gRefCOCO evaluation (its `gres_evaluate`, the same as ReLA's
evaluator), with one difference: DeRIS calls its own answer empty when no candidate's score
passes the threshold, we when the answer has no pixel (the same unless a chosen candidate's mask
is empty). The masks compared are the cache's bit-packed ones (`set_mask_size` x
`set_mask_size`, 96 by default), so every row of a table is computed at one resolution.

"harmful" for sets: the answer's IoU is more than HARM_MARGIN below that of DeRIS's own answer
(the union of its candidates scoring above its threshold) on the same pair.
"""
from __future__ import annotations

import itertools
from typing import Dict, Optional, Tuple

import numpy as np

from ..rerank.gate_data import KINDS, SetData
from .metrics import HARM_MARGIN

SET_PRECISION_THRESHOLDS = (0.7, 0.8, 0.9)
EXHAUSTIVE_ORACLE_MAX = 12  # the oracle tries every union of up to this many overlapping candidates, else grows one greedily
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.int64)


def popcount(packed: np.ndarray) -> np.ndarray:
    """Set bits of uint8 [..., B] packed masks -> int64 [...]."""
    return _POPCOUNT[packed].sum(axis=-1)


def union_of(masks: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """The packed union of the chosen candidates: masks uint8 [P, N, B], chosen bool [P, N] -> uint8 [P, B]."""
    return np.bitwise_or.reduce(np.where(chosen[..., None], masks, 0).astype(np.uint8), axis=1)


def set_overlaps(sets: SetData, chosen: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(I, U, empty) of each pair's answer under the rules above: int64 [P], int64 [P], bool [P].

    chosen: bool [P, N], the candidates in each pair's answer.
    """
    masks, target = sets.masks.numpy(), sets.target_masks.numpy()
    answer = union_of(masks, np.asarray(chosen, dtype=bool))
    return _overlaps(popcount(answer & target), popcount(answer | target), popcount(answer) == 0, no_target_pairs(sets))


def mask_overlaps(answers, targets, num_targets) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(I, U, empty, kinds) of answers given as masks: answers and targets are P bool [H, W] masks
    (each pair at its own size), num_targets P counts (-1: unknown, then read from the target)."""
    inter, union, area, kinds = [], [], [], []
    for answer, target, count in zip(answers, targets, num_targets):
        answer, target = np.asarray(answer, dtype=bool), np.asarray(target, dtype=bool)
        inter.append(int((answer & target).sum()))
        union.append(int((answer | target).sum()))
        area.append(int(answer.sum()))
        kinds.append(min(int(count) if count is not None and count >= 0 else int(target.any()), 2))
    kinds = np.asarray(kinds, dtype=np.int64)
    return (*_overlaps(np.asarray(inter), np.asarray(union), np.asarray(area) == 0, kinds == 0), kinds)


def _overlaps(inter: np.ndarray, union: np.ndarray, empty: np.ndarray, no_target: np.ndarray):
    """Apply the rules: no intersection counts for a no-target pair or an empty answer."""
    return np.where(no_target | empty, 0, inter), union, empty


def no_target_pairs(sets: SetData) -> np.ndarray:
    """bool [P]: the pairs whose expression refers to nothing."""
    return sets.kind.numpy() == 0


def per_pair_iou(kinds: np.ndarray, inter: np.ndarray, union: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """float64 [P] IoU of each pair's answer under the rules above (kinds [P]: 0 no target, 1 one, 2 several)."""
    no_target = kinds == 0
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return np.where(no_target, empty.astype(np.float64), np.where(empty, 0.0, iou))


def set_answer_metrics(sets: SetData, chosen: np.ndarray, reference: Optional[np.ndarray] = None) -> Dict[str, Optional[float]]:
    """gIoU, cIoU, N-acc, T-acc, Pr@t overall and gIoU per kind (none / single / multi) of the
    answers `chosen` (bool [P, N]); with `reference` (bool [P, N], DeRIS's own answers), also the
    share of pairs whose answer is harmful against it and the share answered differently."""
    kinds = sets.kind.numpy()
    metrics = overlap_metrics(kinds, *set_overlaps(sets, chosen))
    metrics["answer_size"] = float(np.asarray(chosen).sum(axis=1).mean()) if len(kinds) else None
    if reference is not None:
        iou = answer_ious(sets, chosen)
        metrics["harmful_rate"] = _pct(iou < answer_ious(sets, reference) - HARM_MARGIN)
        metrics["changed_rate"] = _pct((np.asarray(chosen) != np.asarray(reference)).any(axis=1))
    return metrics


def overlap_metrics(kinds: np.ndarray, inter: np.ndarray, union: np.ndarray, empty: np.ndarray) -> Dict[str, Optional[float]]:
    """The metrics of P answers from their kinds [P] and (I, U, empty) under the rules above."""
    iou = per_pair_iou(kinds, inter, union, empty)
    no_target = kinds == 0
    metrics: Dict[str, Optional[float]] = {
        "pairs": int(len(iou)),
        "giou": _pct(iou),
        "ciou": float(100.0 * inter.sum() / union.sum()) if union.sum() > 0 else None,
        "n_acc": _pct(empty[no_target]) if no_target.any() else None,
        "t_acc": _pct(~empty[~no_target]) if (~no_target).any() else None,
    }
    for t in SET_PRECISION_THRESHOLDS:
        metrics[f"pr@{t:.1f}"] = _pct(iou[~no_target] >= t) if (~no_target).any() else None
    for k, kind in enumerate(KINDS):
        metrics[f"giou_{kind}"] = _pct(iou[kinds == k]) if (kinds == k).any() else None
        metrics[f"pairs_{kind}"] = int((kinds == k).sum())
    return metrics


def answer_ious(sets: SetData, chosen: np.ndarray) -> np.ndarray:
    """float64 [P]: each pair's answer IoU under the rules above (`chosen` bool [P, N])."""
    return per_pair_iou(sets.kind.numpy(), *set_overlaps(sets, chosen))


def oracle_sets(sets: SetData) -> np.ndarray:
    """bool [P, N]: for each pair the union of candidates with the best IoU, empty allowed (so a
    no-target pair gets the empty answer). Only candidates that overlap the target can raise the
    IoU, so every union of those is tried when there are at most EXHAUSTIVE_ORACLE_MAX of them;
    beyond, candidates are added greedily while the IoU grows (an approximation, said here)."""
    masks, target = sets.masks.numpy(), sets.target_masks.numpy()
    count, n = masks.shape[:2]
    chosen = np.zeros((count, n), dtype=bool)
    no_target = no_target_pairs(sets)
    for p in range(count):
        if no_target[p]:
            continue
        useful = np.flatnonzero(popcount(masks[p] & target[p]) > 0)
        if len(useful) == 0:
            continue
        chosen[p, _best_union(masks[p, useful], target[p], useful)] = True
    return chosen


def _best_union(masks: np.ndarray, target: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Slots of the best-IoU union among masks uint8 [K, B] (candidates overlapping the target)."""
    k = len(slots)
    if k <= EXHAUSTIVE_ORACLE_MAX:
        subsets = np.array(list(itertools.product((False, True), repeat=k))[1:])  # [2^k - 1, K], the empty one left out
        unions = union_of(np.broadcast_to(masks, (len(subsets), *masks.shape)), subsets)
        ious = popcount(unions & target) / np.maximum(popcount(unions | target), 1)
        return slots[subsets[int(np.argmax(ious))]]
    picked, best, current = [], 0.0, np.zeros_like(target)
    while True:
        trials = masks | current
        ious = popcount(trials & target) / np.maximum(popcount(trials | target), 1)
        ious[picked] = -1.0
        k_best = int(np.argmax(ious))
        if ious[k_best] <= best:
            return slots[picked]
        picked.append(k_best)
        best, current = float(ious[k_best]), trials[k_best]


def _pct(values) -> Optional[float]:
    values = np.asarray(values)
    return float(100.0 * values.mean()) if values.size else None


def score_results(results, samples, answer: str = "mask", reference: str = "deris_mask") -> Dict[str, Optional[float]]:
    """The metrics above of a pipeline's answers (`results`, `Result`s: their `answer` mask
    attribute, e.g. "default_mask" for Query-0) against the ground truth of `samples`
    (`ReferringSample`s, in the same order), at each image's own size; harmful against the
    results' `reference` mask (DeRIS's own union answer by default). Pairs whose samples do not
    say their number of targets count as one target when the target has pixels."""
    masks = [getattr(r, answer) for r in results]
    targets = [s.target_mask() for s in samples]
    counts = [s.num_targets if s.num_targets is not None else -1 for s in samples]
    inter, union, empty, kinds = mask_overlaps(masks, targets, counts)
    metrics = overlap_metrics(kinds, inter, union, empty)
    ref = mask_overlaps([getattr(r, reference) for r in results], targets, counts)
    ious, ref_ious = per_pair_iou(kinds, inter, union, empty), per_pair_iou(kinds, *ref[:3])
    metrics["harmful_rate"] = _pct(ious < ref_ious - HARM_MARGIN)
    metrics["miou"] = _pct(np.where(union > 0, inter / np.maximum(union, 1), 1.0))  # plain mean IoU (RIS protocol)
    return metrics
