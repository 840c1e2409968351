"""The ablation table of `deris-rerank evaluate --gate A B ...`: several re-rankers on one split.

Rows: Query-0 (DeRIS's own first choice), each re-ranker at its saved operating point (and,
for a calibrated re-ranker, at its stored "conservative" point too), and the oracle. Columns
as the evaluation table (mIoU, oIoU, delta_full, delta_fail, switch %, harmful %, AUC of
p_fail) plus the re-ranker's time per pair: the median over single-pair calls of `decide`
(batch 1, N candidates, on the re-ranker's device with the current torch thread count).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ..rerank.decision import apply_rule
from ..rerank.gate_data import GateData, gate_outputs
from .metrics import evaluate_choices

ABLATION_COLUMNS = [
    ("mIoU", "selected_miou", "{:.2f}"),
    ("oIoU", "oiou", "{:.2f}"),
    ("delta_full", "delta_full", "{:+.2f}"),
    ("delta_fail", "delta_fail", "{:+.2f}"),
    ("switch %", "switch_rate", "{:.2f}"),
    ("harmful %", "harmful_switch_rate", "{:.2f}"),
    ("AUC", "failure_auc", "{:.3f}"),
    ("ms / pair", "ms_per_pair", "{:.2f}"),
]


def time_per_pair(gate, data: GateData, pairs: int = 100) -> float:
    """Median milliseconds of `gate.decide` on one pair, over the first `pairs` pairs (after a warm-up)."""
    text = data.text if getattr(gate, "reads_text", False) else None
    times = []
    for row in range(-1, min(pairs, len(data))):
        rows = slice(max(row, 0), max(row, 0) + 1)
        args = (data.query_feat[rows], data.scores[rows], data.mask_stats[rows], data.grid[rows])
        extra = {"text": text.select(rows), "existence": data.existence[rows]} if text is not None else {}
        start = time.perf_counter()
        gate.decide(*args, **extra)
        if row >= 0:
            times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def _row(name: str, data: GateData, selected: torch.Tensor, p_fail: Optional[np.ndarray], ms: Optional[float]) -> Dict:
    metrics = evaluate_choices(
        data.ious.numpy().astype(np.float64), data.inter.numpy(), data.union.numpy(), data.default_index.numpy(),
        selected.numpy(), data.union_iou.numpy().astype(np.float64), p_fail,
    )
    return {"name": name, **metrics, "ms_per_pair": ms}


def ablation_rows(data: GateData, gates: Dict[str, object], timing_pairs: int = 100) -> List[Dict]:
    """One row per re-ranker (and operating point), between Query-0 and the oracle, on all of `data`."""
    rows = [_row("Query-0 (DeRIS)", data, data.default_index, None, None)]
    for name, gate in gates.items():
        outputs = gate_outputs(gate, data)
        ms = time_per_pair(gate, data, timing_pairs) if timing_pairs else None
        rules = {name: gate.rule}
        for point, rule in gate.operating_points.items():
            if point != "tuned" and rule != gate.rule:
                rules[f"{name} ({point})"] = rule
        for label, rule in rules.items():
            decision = apply_rule(rule, *outputs)
            rows.append(_row(label, data, decision.selected, decision.p_fail.numpy(), ms))
    rows.append(_row("oracle", data, data.ious.argmax(dim=1), None, None))
    return rows


def ablation_markdown(rows: List[Dict]) -> str:
    """The rows as a Markdown table (oracle's row gives its mIoU; '-' where a value does not apply)."""
    lines = ["| re-ranker | " + " | ".join(c[0] for c in ABLATION_COLUMNS) + " |", "|---" * (len(ABLATION_COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in ABLATION_COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

