"""Evaluation metrics of DeRIS alone, DeRIS + gate, and the oracle, as the Venice-H1 paper reports them.

Inputs are per pair, over P pairs with N candidates each (NumPy arrays):
  ious [P, N]            IoU of every candidate with the ground truth
  inter, union [P, N]    their intersection and union pixel counts (for the cumulative IoU)
  default [P]            Query-0: the slot DeRIS ranks first (argmax of its scores)
  selected [P]           the slot the gate chose
  p_fail [P]             the gate's failure probability (optional)
  union_iou [P]          IoU of DeRIS's own answer (union of candidates above its threshold)

Definitions (all IoUs in %, "mIoU" = mean over pairs):
  q0_miou / selected_miou / oracle_miou: mIoU of Query-0 / of the gate's choice / of the best candidate
  oiou: cumulative IoU of the gate's choice, sum(intersections) / sum(unions) (q0_oiou for Query-0)
  precision@t: share of pairs whose chosen candidate has IoU >= t, for t in 0.5 ... 0.9
  deris_union_miou: mIoU of DeRIS's own answer
  failure: some candidate has a strictly higher IoU than Query-0; failure_rate = share of such pairs
  switch_rate: share of pairs where the gate chose another slot than Query-0
  delta_full = selected_miou - q0_miou (points); delta_fail: the same on failure pairs only
  gap_closed = delta_fail / (oracle mIoU - Query-0 mIoU on failure pairs), in %
  failure_auc: ROC AUC of p_fail as a detector of failures (ties count half)
  harmful_switch_rate: share of ALL pairs where the gate switched and lost more than 0.01 IoU;
  harmful_share_of_switches: the same count over the number of switches
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
HARM_MARGIN = 0.01


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def evaluate_choices(
    ious: np.ndarray,
    inter: np.ndarray,
    union: np.ndarray,
    default: np.ndarray,
    selected: np.ndarray,
    union_iou: np.ndarray,
    p_fail: Optional[np.ndarray] = None,
) -> Dict[str, Optional[float]]:
    """All metrics of one split (see the module docstring). Percentages; counts as ints."""
    rows = np.arange(len(default))
    q0, chosen, best = ious[rows, default], ious[rows, selected], ious.max(axis=1)
    failure = best > q0
    switched = selected != default
    harmful = switched & (chosen < q0 - HARM_MARGIN)
    n, n_fail, n_switch = len(default), int(failure.sum()), int(switched.sum())

    def pct(x) -> float:
        return float(100.0 * np.mean(x)) if np.size(x) else float("nan")

    def cumulative(slots) -> float:
        total_union = union[rows, slots].sum()
        return float(100.0 * inter[rows, slots].sum() / total_union) if total_union > 0 else float("nan")

    gap_fail = pct(best[failure]) - pct(q0[failure]) if n_fail else float("nan")
    delta_fail = pct(chosen[failure]) - pct(q0[failure]) if n_fail else float("nan")
    metrics: Dict[str, Optional[float]] = {
        "pairs": n,
        "q0_miou": pct(q0),
        "selected_miou": pct(chosen),
        "oracle_miou": pct(best),
        "q0_oiou": cumulative(default),
        "oiou": cumulative(selected),
        "deris_union_miou": pct(union_iou),
        "failure_rate": pct(failure),
        "switch_rate": pct(switched),
        "delta_full": pct(chosen) - pct(q0),
        "delta_fail": delta_fail,
        "gap_closed": 100.0 * delta_fail / gap_fail if n_fail and gap_fail > 0 else float("nan"),
        "failure_auc": roc_auc(failure, p_fail) if p_fail is not None else None,
        "harmful_switch_rate": pct(harmful),
        "harmful_share_of_switches": 100.0 * harmful.sum() / n_switch if n_switch else 0.0,
        "switches": n_switch,
        "failures": n_fail,
    }
    for t in PRECISION_THRESHOLDS:
        metrics[f"precision@{t}"] = pct(chosen >= t)
    return metrics
