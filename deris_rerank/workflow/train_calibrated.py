"""`deris-rerank train-gate --arch calibrated`: train the calibrated re-ranker on feature caches.

Recipe (every knob a flag): AdamW (the two fusion weights without weight decay and at
`fusion_lr_scale` x the learning rate: Adam moves a scalar by about lr per step, too slowly for
a weight that starts at 0 and must reach ~1), linear warm-up
then cosine decay to 0, seeded and deterministic on CPU. Loss per pair:
  listwise cross-entropy of the fused logits toward soft targets softmax(IoU / target_temperature)
  (one-hot on the best-IoU candidate when target_temperature = 0),
  + aux_weight x the same on the calibrated logits alone (so the calibration learns while the
    fusion weight is still near its initial 0),
  + failure_weight x BCE of p_fail against the failure flag (some candidate beats Query-0).

Operating points are picked on the tuning caches only, over tau in 0.00 ... 0.99 and the
fused-logit margin in MARGIN_GRID (tau also 0.995, 0.999): "tuned" maximises the mIoU gain (delta_full)
while the upper `harm_confidence` confidence bound of its harmful-switch rate (Wilson, one-sided)
is at most `max_harmful` %, "conservative" the same within `conservative_harmful` %; ties go to
the larger margin, then the larger tau (a rule's bound is never above its switch rate: a rule
that never switches always fits; where nothing fits, a point never switches). The tuned point is
the saved rule.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..settings import CalibratedSettings
from ..rerank.calibrated import CalibratedConfig, CalibratedReranker
from ..rerank.decision import DecisionRule, apply_rule
from ..rerank.gate_data import GateData, gate_outputs
from ..workflow.metrics import HARM_MARGIN
from .train_gate import TAU_GRID

MARGIN_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
CALIBRATED_TAU_GRID = TAU_GRID + (0.995, 0.999)  # a conservative point may need p_fail very near 1
NEVER_SWITCH = DecisionRule(tau=1.0, margin_pred=0.0)  # p_fail > 1 never holds




def listwise_targets(ious: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, N] target distribution over candidates from their IoUs [B, N]: softmax(IoU / temperature),
    or one-hot on the best (first best on ties) when temperature is 0."""
    if temperature > 0:
        return (ious / temperature).softmax(dim=-1)
    return F.one_hot(ious.argmax(dim=-1), ious.shape[-1]).to(ious.dtype)


def listwise_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [B, N] toward target distributions [B, N], averaged over B."""
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def build_reranker(data: GateData, settings: CalibratedSettings) -> CalibratedReranker:
    """An untrained re-ranker sized for `data` (which must hold the text-aware fields)."""
    text = data.require_text()
    config = CalibratedConfig(
        query_dim=data.query_feat.shape[-1],
        text_dim=text.text_feat.shape[-1],
        n_classes=text.refer_logits.shape[-1],
        hidden_dim=settings.hidden_dim,
        n_layers=settings.n_layers,
        n_heads=settings.n_heads,
        n_queries=data.query_feat.shape[1],
        dropout=settings.dropout,
        use_text=settings.text,
        fusion=settings.fusion,
        geometry=settings.geometry,
    )
    return CalibratedReranker(config, DecisionRule(tau=0.5, margin_pred=0.0))


def _lr_factor(step: int, steps_per_epoch: int, settings: CalibratedSettings) -> float:
    warmup, total = settings.warmup_epochs * steps_per_epoch, settings.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_calibrated(
    train: GateData,
    settings: CalibratedSettings,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    monitor: Optional[GateData] = None,
) -> CalibratedReranker:
    """Train a calibrated re-ranker on `train` (no operating-point tuning: see `choose_operating_points`).

    monitor: optional data (the tuning split) whose argmax-fused mIoU gain is logged each epoch
    (for watching only: nothing is chosen from it here).
    """
    check_point_settings(settings)  # before training, not after it
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    text = train.require_text()
    reranker = build_reranker(train, settings).to(device)
    fusion = [reranker.fusion_deris, reranker.fusion_calibrated]
    others = [p for p in reranker.parameters() if all(p is not f for f in fusion)]
    optimizer = torch.optim.AdamW(
        [{"params": others, "weight_decay": settings.weight_decay, "lr": settings.lr},
         {"params": fusion, "weight_decay": 0.0, "lr": settings.lr * settings.fusion_lr_scale}],
        lr=settings.lr,
    )
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps_per_epoch, settings))
    shuffle = torch.Generator().manual_seed(settings.seed)
    failure = train.failure.float()
    targets = listwise_targets(train.ious, settings.target_temperature)
    log(f"training the calibrated re-ranker on {len(train)} pairs ({int(failure.sum())} failures), "
        f"{settings.epochs} epochs of {steps_per_epoch} steps on {device}")
    for epoch in range(settings.epochs):
        reranker.train()
        totals = {"loss": 0.0, "rank": 0.0, "aux": 0.0, "fail": 0.0}
        for rows in torch.randperm(len(train), generator=shuffle).split(settings.batch_size):
            inputs = [x[rows].to(device) for x in (train.query_feat, train.scores, train.mask_stats, train.grid)]
            _, p_fail_logit, fused, calibrated = reranker(*inputs, text.select(rows).to(device))
            target = targets[rows].to(device)
            rank_loss = listwise_loss(fused, target)
            aux_loss = listwise_loss(calibrated, target)
            fail_loss = F.binary_cross_entropy_with_logits(p_fail_logit, failure[rows].to(device))
            loss = rank_loss + settings.aux_weight * aux_loss + settings.failure_weight * fail_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for key, value in (("loss", loss), ("rank", rank_loss), ("aux", aux_loss), ("fail", fail_loss)):
                totals[key] += float(value.detach()) * len(rows)
        line = f"epoch {epoch + 1}/{settings.epochs}: " + ", ".join(f"{k} {v / len(train):.4f}" for k, v in totals.items())
        line += f", fusion w_deris {float(reranker.fusion_deris.detach()):.3f} w_cal {float(reranker.fusion_calibrated.detach()):.3f}"
        if monitor is not None:
            default_index, _, fused = gate_outputs(reranker, monitor)
            rows = torch.arange(len(monitor))
            gain = monitor.ious[rows, fused.argmax(dim=1)] - monitor.ious[rows, default_index]
            line += f", monitor argmax delta {100 * float(gain.mean()):+.2f}"
        log(line)
    return reranker.eval()


def rule_metrics(data: GateData, selected: torch.Tensor) -> Tuple[float, float, float]:
    """(delta_full, harmful %, switch %) of choosing `selected` [P] instead of Query-0 on `data`."""
    rows = torch.arange(len(data))
    q0, chosen = data.ious[rows, data.default_index], data.ious[rows, selected]
    switched = selected != data.default_index
    harmful = switched & (chosen < q0 - HARM_MARGIN)
    return float(100 * (chosen - q0).mean()), float(100 * harmful.float().mean()), float(100 * switched.float().mean())


def harmful_upper_bound(harmful_percent: float, pairs: int, confidence: float) -> float:
    """One-sided upper confidence bound (Wilson score, in %) of a harmful-switch rate measured as
    `harmful_percent` on `pairs` pairs; `confidence` 0 gives the measured rate itself.

    The operating points keep this bound within their budgets, so a budget of 5 % measured on the
    ~3,000 tuning pairs holds on new pairs with about that confidence, not half the time."""
    if confidence <= 0:
        return harmful_percent
    z = statistics.NormalDist().inv_cdf(confidence)
    p, n = harmful_percent / 100, max(pairs, 1)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre + spread) / (1 + z * z / n)


def check_point_settings(settings: CalibratedSettings) -> None:
    """InputError (one line) for harmful budgets outside 0..100 % or a confidence outside [0, 1)."""
    for name, value in (("--max-harmful", settings.max_harmful), ("--conservative-harmful", settings.conservative_harmful)):
        if not 0 <= value <= 100:
            raise InputError(f"{name} is a harmful-switch rate in percent (0..100), got {value:g}")
    if not 0 <= settings.harm_confidence < 1:
        raise InputError(f"--harm-confidence must be in [0, 1) (0 = the measured rate itself), got {settings.harm_confidence:g}")


def choose_operating_points(
    reranker: CalibratedReranker, tune: GateData, settings: CalibratedSettings
) -> Tuple[DecisionRule, Dict[str, DecisionRule], Dict[str, float]]:
    """(tuned rule, {"tuned", "conservative"} rules, their tuning-split figures), picked on `tune` only."""
    return choose_points_from_outputs(gate_outputs(reranker, tune), tune, settings)


def choose_points_from_outputs(
    outputs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], tune: GateData, settings: CalibratedSettings
) -> Tuple[DecisionRule, Dict[str, DecisionRule], Dict[str, float]]:
    """`choose_operating_points` on given re-ranker outputs over `tune`: (default_index [P],
    p_fail_logit [P], ranking values [P, N]), as `gate_outputs` gives them."""
    budgets = {"tuned": settings.max_harmful, "conservative": settings.conservative_harmful}
    check_point_settings(settings)
    best: Dict[str, Tuple[float, DecisionRule, Tuple[float, float, float]]] = {}
    for margin in MARGIN_GRID:
        for tau in CALIBRATED_TAU_GRID:
            rule = DecisionRule(tau=tau, margin_pred=margin)
            figures = rule_metrics(tune, apply_rule(rule, *outputs).selected)
            harm_bound = min(harmful_upper_bound(figures[1], len(tune), settings.harm_confidence), figures[2])  # <= switches
            for name, budget in budgets.items():
                if harm_bound <= budget and (name not in best or figures[0] >= best[name][0] - 1e-12):
                    best[name] = (figures[0], rule, figures)
    for name in budgets:  # nothing fits (a small tuning split): keep DeRIS's choice everywhere
        best.setdefault(name, (0.0, NEVER_SWITCH, (0.0, 0.0, 0.0)))
    points = {name: found[1] for name, found in best.items()}
    report = {"tune_pairs": len(tune)}
    for name, (_, _, (delta, harm, switch)) in best.items():
        report.update({f"{name}_tune_delta_full": delta, f"{name}_tune_harmful": harm, f"{name}_tune_switch": switch})
    return points["tuned"], points, report


def settings_record(settings: CalibratedSettings) -> Dict[str, object]:
    """The training settings as saved beside the weights."""
    return {"training": dataclasses.asdict(settings)}
