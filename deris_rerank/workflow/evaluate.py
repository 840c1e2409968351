"""`deris-rerank evaluate`: DeRIS alone, DeRIS + gate and the oracle on feature caches.

Writes `metrics.json`, `metrics.md` (a table per split and overall, with the evaluation
protocol printed above it) and, when matplotlib is installed, `roc.png` (the gate as a
failure detector), `coverage_risk.png` (share of pairs switched vs harmful switches and mIoU
gain as tau varies, with the re-ranker's stored operating points marked) and `per_split.png` (mIoU gain per split). Metric definitions:
`workflow/metrics.py` and docs/rerankers.md.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import install_hint
from ..fileio import atomic_write
from ..rerank.decision import apply_rule
from ..rerank.venice import VeniceGate
from ..rerank.gate_data import GateData, gate_outputs, load_gate_data
from .metrics import HARM_MARGIN, PRECISION_THRESHOLDS, evaluate_choices, roc_auc

TABLE_COLUMNS = [
    ("pairs", "pairs", "{:.0f}"),
    ("Q0 mIoU", "q0_miou", "{:.2f}"),
    ("gate mIoU", "selected_miou", "{:.2f}"),
    ("oracle mIoU", "oracle_miou", "{:.2f}"),
    ("DeRIS union mIoU", "deris_union_miou", "{:.2f}"),
    ("oIoU", "oiou", "{:.2f}"),
    *[(f"P@{t}", f"precision@{t}", "{:.2f}") for t in PRECISION_THRESHOLDS],
    ("fail %", "failure_rate", "{:.2f}"),
    ("switch %", "switch_rate", "{:.2f}"),
    ("delta_full", "delta_full", "{:+.2f}"),
    ("delta_fail", "delta_fail", "{:+.2f}"),
    ("gap closed %", "gap_closed", "{:.1f}"),
    ("AUC", "failure_auc", "{:.3f}"),
    ("harmful %", "harmful_switch_rate", "{:.2f}"),
]


def split_rows(data: GateData) -> Dict[str, np.ndarray]:
    """Row indices of every split, in first-appearance order."""
    names = list(dict.fromkeys(data.splits))
    splits = np.asarray(data.splits)
    return {name: np.flatnonzero(splits == name) for name in names}


def evaluate(data: GateData, gate: Optional[VeniceGate]) -> Dict[str, object]:
    """Metrics per split and overall; with no gate, the 'gate' column is Query-0 itself."""
    default = data.default_index
    if gate is not None:
        outputs = gate_outputs(gate, data)
        decision = apply_rule(gate.rule, *outputs)
        selected, p_fail = decision.selected, decision.p_fail.numpy()
    else:
        outputs, selected, p_fail = None, default, None
    points = gate.operating_points if gate is not None else {}
    arrays = {
        "ious": data.ious.numpy().astype(np.float64),
        "inter": data.inter.numpy(),
        "union": data.union.numpy(),
        "default": default.numpy(),
        "selected": selected.numpy(),
        "union_iou": data.union_iou.numpy().astype(np.float64),
    }

    def subset(rows) -> Dict[str, Optional[float]]:
        return evaluate_choices(**{k: v[rows] for k, v in arrays.items()}, p_fail=None if p_fail is None else p_fail[rows])

    everything = np.arange(len(data))
    report = {
        "protocol": protocol(data, gate),
        "splits": {name: subset(rows) for name, rows in split_rows(data).items()},
        "overall": subset(everything),
    }
    if gate is not None:
        report["curves"] = curves(data, gate, outputs)
    if points:  # every stored operating point on the same pairs, overall
        report["operating_points"] = {
            name: {"rule": dataclasses.asdict(rule), **evaluate_choices(**{**arrays, "selected": apply_rule(rule, *outputs).selected.numpy()}, p_fail=p_fail)}
            for name, rule in points.items()
        }
    return report


def protocol(data: GateData, gate: Optional[VeniceGate]) -> Dict[str, object]:
    """How the numbers were made: printed with every table."""
    sources = data.provenance
    return {
        "iou": sorted({p.get("iou_protocol", "?") for p in sources}),
        "query_0": "argmax of DeRIS's referring scores over its query slots",
        "thresholds": {"mask": sorted({p["config"]["mask_threshold"] for p in sources if "config" in p}),
                       "deris_union_score": sorted({p["config"]["score_threshold"] for p in sources if "config" in p})},
        "checkpoints": sorted({p.get("checkpoint_sha256", "?")[:12] for p in sources}),
        "query_source": sorted({p.get("query_source", "?") for p in sources}),
        "gate": None if gate is None else {**dataclasses.asdict(gate.rule), **{"flavour": gate.config.flavour,
                                           "grid_scales": list(gate.config.grid_scales) if gate.config.use_grid else []}},
    }


def curves(data: GateData, gate: VeniceGate, outputs) -> Dict[str, List[float]]:
    """ROC of p_fail against failures, and the switch / harm / gain trade-off over tau."""
    default_index, logit, gain = outputs
    failure = data.failure.numpy()
    p_fail = torch.sigmoid(logit / gate.rule.temp).numpy()
    thresholds = np.unique(np.concatenate([[-np.inf, np.inf], p_fail]))[::-1]
    tpr = [float((p_fail[failure] >= t).mean()) if failure.any() else 0.0 for t in thresholds]
    fpr = [float((p_fail[~failure] >= t).mean()) if (~failure).any() else 0.0 for t in thresholds]
    taus, switch, harm, delta = [], [], [], []
    rows = torch.arange(len(data))
    q0 = data.ious[rows, data.default_index]
    for tau in np.linspace(0.0, 1.0, 101):
        selected = apply_rule(dataclasses.replace(gate.rule, tau=float(tau)), default_index, logit, gain).selected
        chosen = data.ious[rows, selected]
        switched = selected != data.default_index
        taus.append(float(tau))
        switch.append(float(100 * switched.float().mean()))
        harm.append(float(100 * (switched & (chosen < q0 - HARM_MARGIN)).float().mean()))
        delta.append(float(100 * (chosen - q0).mean()))
    return {"fpr": fpr, "tpr": tpr, "auc": roc_auc(failure, p_fail), "tau": taus, "switch_rate": switch,
            "harmful_switch_rate": harm, "delta_full": delta}


def markdown(report: Dict[str, object]) -> str:
    """The protocol, then one row per split and the overall row."""
    lines = ["# Evaluation", "", "Protocol: " + json.dumps(report["protocol"]), ""]
    lines.append("| split | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |")
    lines.append("|---" * (len(TABLE_COLUMNS) + 1) + "|")
    rows = list(report["splits"].items()) + [("overall", report["overall"])]
    for name, metrics in rows:
        cells = [fmt.format(metrics[key]) if metrics.get(key) is not None else "-" for _, key, fmt in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("operating_points"):
        lines += ["", "Stored operating points of the re-ranker, overall (the rule in use is the one in the protocol):", "",
                  "| operating point | tau | margin | gate mIoU | delta_full | switch % | harmful % |", "|---|---|---|---|---|---|---|"]
        for name, m in report["operating_points"].items():
            margin = m["rule"]["margin_pred"]
            lines.append(f"| {name} | {m['rule']['tau']:g} | {'-' if margin is None else f'{margin:g}'} | {m['selected_miou']:.2f} | "
                         f"{m['delta_full']:+.2f} | {m['switch_rate']:.2f} | {m['harmful_switch_rate']:.2f} |")
    if report.get("sets"):
        from .set_evaluation import set_markdown

        size = report["sets"]["mask_size"]
        lines += ["", f"Set answers (GRES; gRefCOCO's rules, masks at {size} x {size}; harmful: more than 0.01 IoU below "
                  "DeRIS's own union answer):", "", set_markdown(report["sets"]["rows"]).rstrip()]
    return "\n".join(lines) + "\n"


def write_report(report: Dict[str, object], out_dir: Path) -> List[Path]:
    """metrics.json, metrics.md and the plots (skipped, with a note, without matplotlib)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "metrics.md"]
    text = json.dumps(report, indent=2, default=float) + "\n"
    atomic_write(written[0], lambda tmp: Path(tmp).write_text(text))
    atomic_write(written[1], lambda tmp: Path(tmp).write_text(markdown(report)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plots ({install_hint('plots', 'matplotlib')})")
        return written
    if "curves" in report:
        c = report["curves"]
        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        axis.plot(c["fpr"], c["tpr"], label=f"gate (AUC {c['auc']:.3f})" if c["auc"] is not None else "gate")
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
        axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Failure detection (ROC)")
        axis.legend(loc="lower right")
        written.append(_save(figure, out_dir / "roc.png"))
        figure, axis = plt.subplots(figsize=(5.5, 4.5))
        axis.plot(c["switch_rate"], c["harmful_switch_rate"], label="harmful switches (% of pairs)")
        axis.plot(c["switch_rate"], c["delta_full"], label="mIoU gain (points)")
        for name, m in report.get("operating_points", {}).items():
            axis.plot([m["switch_rate"]] * 2, [m["harmful_switch_rate"], m["delta_full"]], "o:", color="black", markersize=4)
            axis.annotate(name, (m["switch_rate"], m["delta_full"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set(xlabel="pairs switched (%) as tau goes from 1 to 0", title="Coverage and risk over tau")
        axis.legend()
        written.append(_save(figure, out_dir / "coverage_risk.png"))
    figure, axis = plt.subplots(figsize=(max(4.5, 1.2 * len(report["splits"])), 4))
    names = list(report["splits"])
    axis.bar(names, [report["splits"][n]["delta_full"] for n in names])
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set(ylabel="mIoU gain over Query-0 (points)", title="Improvement per split")
    written.append(_save(figure, out_dir / "per_split.png"))
    return written


def _save(figure, path: Path) -> Path:
    from matplotlib import pyplot as plt

    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)
    return path


def evaluate_caches(
    paths: Sequence[Path], gate: Optional[VeniceGate], out_dir: Path,
    set_gates: Optional[Dict[str, object]] = None, tune_paths: Sequence[Path] = (),
) -> Dict[str, object]:
    """Load the caches, evaluate, write the report files; returns the report.

    When the caches hold the set fields (GRES), the report also has "sets": the set-answer rows
    of `set_evaluation` for the re-rankers in `set_gates` (default: `gate`), with DeRIS's union
    at its best threshold on the caches `tune_paths` when given."""
    data = load_gate_data(paths, masks=True)
    report = evaluate(data, gate)
    if data.sets is not None and data.sets.masks is not None:
        from .set_evaluation import set_rows

        gates = set_gates if set_gates is not None else ({} if gate is None else {"re-ranker": gate})
        tune = load_gate_data(tune_paths, masks=True) if tune_paths else None
        report["sets"] = {"mask_size": data.sets.mask_size, "rows": set_rows(data, gates, tune)}
    write_report(report, out_dir)
    return report
