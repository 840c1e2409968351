"""The set-answer table of `deris-rerank evaluate` (GRES caches): every way of answering, one row each.

Rows, on the same pairs and by the rules of `set_metrics` (gRefCOCO's):
  DeRIS union (threshold t)         DeRIS's own answer: the candidates scoring above its threshold
  DeRIS union, best on tune         the same at the threshold with the best gIoU on --tune (when given)
  Query-0                           DeRIS's top candidate alone
  <re-ranker>                       each re-ranker's answer: a single-candidate re-ranker's one
                                    candidate, a set re-ranker's set (and its other stored points)
  oracle set                        the best union of candidates, empty allowed
Columns: gIoU, cIoU, N-acc, T-acc, gIoU of the no-target / single / multi pairs, harmful %
(answers more than 0.01 IoU below DeRIS's own union answer's), answer size and the re-ranker's
time per pair.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from ..rerank.decision import apply_rule, apply_set_rule
from ..rerank.gate_data import GateData, gate_outputs, set_outputs
from .ablation import time_per_pair
from .set_metrics import answer_ious, oracle_sets, set_answer_metrics
from .train_calibrated import deris_score_threshold

SET_COLUMNS = [
    ("gIoU", "giou", "{:.2f}"),
    ("cIoU", "ciou", "{:.2f}"),
    ("N-acc", "n_acc", "{:.2f}"),
    ("T-acc", "t_acc", "{:.2f}"),
    ("gIoU none", "giou_none", "{:.2f}"),
    ("gIoU single", "giou_single", "{:.2f}"),
    ("gIoU multi", "giou_multi", "{:.2f}"),
    ("harmful %", "harmful_rate", "{:.2f}"),
    ("size", "answer_size", "{:.2f}"),
    ("ms / pair", "ms_per_pair", "{:.2f}"),
]
UNION_THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(1, 100))


def set_rows(data: GateData, gates: Dict[str, object], tune: Optional[GateData] = None, timing_pairs: int = 100) -> List[Dict]:
    """The rows of the table on `data` (which needs its set fields and packed masks)."""
    sets = data.require_sets(masks=True)
    threshold = deris_score_threshold(data)
    reference = (data.scores > threshold).numpy()
    rows = [_row(f"DeRIS union (threshold {threshold:g})", sets, reference, reference)]
    if tune is not None:
        best = best_union_threshold(tune)
        rows.append(_row(f"DeRIS union, best on tune ({best:g})", sets, (data.scores > best).numpy(), reference))
    rows.append(_row("Query-0", sets, _one_hot(data.default_index, data.scores.shape[1]), reference))
    for name, gate in gates.items():
        ms = time_per_pair(gate, data, timing_pairs) if timing_pairs else None
        for label, chosen in answers_of(name, gate, data).items():
            rows.append({**_row(label, sets, chosen, reference), "ms_per_pair": ms})
    rows.append(_row("oracle set", sets, oracle_sets(sets), reference))
    return rows


def answers_of(name: str, gate, data: GateData) -> Dict[str, np.ndarray]:
    """{row label: chosen bool [P, N]} of one re-ranker: its answer at its rule, and for a set
    re-ranker also at its other stored set points."""
    n = data.scores.shape[1]
    if not getattr(getattr(gate, "config", None), "sets", False):
        return {name: _one_hot(apply_rule(gate.rule, *gate_outputs(gate, data)).selected, n)}
    default_index, p_fail_logit, fused, member, kind = set_outputs(gate, data)
    labelled = {name: (gate.rule, gate.set_rule)}
    for point, set_rule in gate.set_operating_points.items():
        if set_rule != gate.set_rule:
            labelled[f"{name} ({point})"] = (gate.operating_points.get(point, gate.rule), set_rule)
    answers = {}
    for label, (rule, set_rule) in labelled.items():
        single = apply_rule(rule, default_index, p_fail_logit, fused).selected
        answers[label] = apply_set_rule(set_rule, single, kind, member, data.scores)[0].numpy()
    return answers


def best_union_threshold(tune: GateData) -> float:
    """The score threshold whose DeRIS union answer has the best gIoU on `tune` (first best of UNION_THRESHOLDS)."""
    sets = tune.require_sets(masks=True)
    gious = [float(answer_ious(sets, (tune.scores > t).numpy()).mean()) for t in UNION_THRESHOLDS]
    return UNION_THRESHOLDS[int(np.argmax(gious))]


def set_markdown(rows: List[Dict]) -> str:
    """The rows as a Markdown table ('-' where a value does not apply)."""
    lines = ["| answer | " + " | ".join(c[0] for c in SET_COLUMNS) + " |", "|---" * (len(SET_COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in SET_COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _row(name: str, sets, chosen: np.ndarray, reference: np.ndarray) -> Dict:
    return {"name": name, **set_answer_metrics(sets, chosen, reference), "ms_per_pair": None}


def _one_hot(slots: torch.Tensor, n: int) -> np.ndarray:
    return (np.arange(n)[None, :] == slots.numpy()[:, None])
