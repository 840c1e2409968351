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

A set re-ranker (`sets`, GRES caches) adds two losses: membership BCE (a candidate is a member
when it is non-empty and at least MEMBER_SHARE of its pixels lie in the target) on every pair,
and cross-entropy of the kind (no object, one, several) on every pair; the listwise and failure
losses then count only pairs that have targets (on a no-target pair every candidate's IoU is 0,
an empty one's 1: nothing to rank). Its single-candidate points are picked as above on the
tuning pairs with one target; its set points ("tuned", "conservative": `SetRule` thresholds over
SET_TAU_GRID, MEMBER_GRID and DEFER_GRID, each on top of the single point of the same name;
deferring answers DeRIS's own union when the re-ranker is unsure) maximise gIoU on
all tuning pairs while the Wilson bound of the share of harmful answers (IoU more than 0.01 below
DeRIS's own union answer's) stays within `set_max_harmful` / `set_conservative_harmful` %; where
nothing fits, the point is the one with the fewest harmful answers (the report says so).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..settings import CalibratedSettings
from ..rerank.calibrated import CalibratedConfig, CalibratedReranker
from ..rerank.decision import DecisionRule, SetRule, apply_rule, set_confidence
from ..rerank.gate_data import GateData, gate_outputs, set_outputs
from ..workflow.metrics import HARM_MARGIN
from .set_metrics import answer_ious
from .train_gate import TAU_GRID

MARGIN_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
CALIBRATED_TAU_GRID = TAU_GRID + (0.995, 0.999)  # a conservative point may need p_fail very near 1
NEVER_SWITCH = DecisionRule(tau=1.0, margin_pred=0.0)  # p_fail > 1 never holds
SET_TAU_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20)) + (0.99,)  # tau_none and tau_several
MEMBER_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # tau_member
DEFER_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # tau_defer (0: never defer)




def listwise_targets(ious: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, N] target distribution over candidates from their IoUs [B, N]: softmax(IoU / temperature),
    or one-hot on the best (first best on ties) when temperature is 0."""
    if temperature > 0:
        return (ious / temperature).softmax(dim=-1)
    return F.one_hot(ious.argmax(dim=-1), ious.shape[-1]).to(ious.dtype)


def listwise_loss(logits: torch.Tensor, targets: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Cross-entropy of logits [B, N] toward target distributions [B, N], averaged over B (per pair [B] without `reduce`)."""
    per_pair = -(targets * logits.log_softmax(dim=-1)).sum(dim=-1)
    return per_pair.mean() if reduce else per_pair


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of values [B] over the pairs with weight 1 (0 when none has)."""
    return (values * weights).sum() / weights.sum().clamp(min=1)


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
        sets=settings.sets,
        set_inputs=tuple(name for name, on in (("existence", settings.set_existence), ("overlap", settings.set_overlap)) if on),
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
    init: Optional[CalibratedReranker] = None,
) -> CalibratedReranker:
    """Train a calibrated re-ranker on `train` (no operating-point tuning: see `choose_operating_points`).

    monitor: optional data (the tuning split) whose argmax-fused mIoU gain is logged each epoch
    (for watching only: nothing is chosen from it here). init: a trained re-ranker whose weights
    training starts from (its configuration must be the one `settings` and `train` give, else
    InputError); its retrieval memory is not kept.
    """
    check_point_settings(settings)  # before training, not after it
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    text = train.require_text()
    if settings.sets:
        sets = train.require_sets()
        members, kinds = sets.membership(train.inter).float(), sets.kind
        has_target = kinds > 0
    reranker = build_reranker(train, settings)
    if init is not None:
        if init.config != reranker.config:
            differing = [f.name for f in dataclasses.fields(init.config) if getattr(init.config, f.name) != getattr(reranker.config, f.name)]
            raise InputError(f"--init: that re-ranker differs from the one these settings and caches make in {', '.join(differing)}; "
                             "give the settings it was trained with")
        reranker.load_state_dict({k: v for k, v in init.state_dict().items() if k in reranker.state_dict()})
    reranker = reranker.to(device)
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
    weight = has_target.float() if settings.sets else torch.ones(len(train))  # pairs the ranking and failure losses count
    log(f"training the calibrated {'set ' if settings.sets else ''}re-ranker on {len(train)} pairs ({int(failure.sum())} failures), "
        f"{settings.epochs} epochs of {steps_per_epoch} steps on {device}")
    for epoch in range(settings.epochs):
        reranker.train()
        totals = {"loss": 0.0, "rank": 0.0, "aux": 0.0, "fail": 0.0, **({"member": 0.0, "kind": 0.0} if settings.sets else {})}
        for rows in torch.randperm(len(train), generator=shuffle).split(settings.batch_size):
            inputs = [x[rows].to(device) for x in (train.query_feat, train.scores, train.mask_stats, train.grid)]
            out = reranker.outputs(*inputs, text.select(rows).to(device), train.existence[rows].to(device))
            target, counted = targets[rows].to(device), weight[rows].to(device)
            rank_loss = _weighted_mean(listwise_loss(out.fused, target, reduce=False), counted)
            aux_loss = _weighted_mean(listwise_loss(out.calibrated, target, reduce=False), counted)
            fail_loss = _weighted_mean(F.binary_cross_entropy_with_logits(out.p_fail_logit, failure[rows].to(device), reduction="none"), counted)
            loss = rank_loss + settings.aux_weight * aux_loss + settings.failure_weight * fail_loss
            parts = {"rank": rank_loss, "aux": aux_loss, "fail": fail_loss}
            if settings.sets:
                parts["member"] = F.binary_cross_entropy_with_logits(out.member, members[rows].to(device))
                parts["kind"] = F.cross_entropy(out.kind, kinds[rows].to(device))
                loss = loss + settings.member_weight * parts["member"] + settings.kind_weight * parts["kind"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for key, value in (("loss", loss), *parts.items()):
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
    for name, value in (("--max-harmful", settings.max_harmful), ("--conservative-harmful", settings.conservative_harmful),
                        ("--set-max-harmful", settings.set_max_harmful), ("--set-conservative-harmful", settings.set_conservative_harmful)):
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


def pick_points(reranker: CalibratedReranker, tune: GateData, settings: CalibratedSettings) -> Dict[str, float]:
    """Pick and set every operating point of `reranker` on `tune` (its rule and named points; for a
    set re-ranker also its set rule and set points); returns the tuning-split figures."""
    if not reranker.config.sets:
        reranker.rule, reranker.operating_points, report = choose_operating_points(reranker, tune, settings)
        return report
    single = tune.select(torch.nonzero(tune.require_sets().kind == 1).squeeze(1))
    if len(single) == 0:
        raise InputError("the tuning caches hold no pair with exactly one target: a set re-ranker's single-candidate "
                         "points are picked on those (extract a gres-mode tuning split)")
    reranker.rule, reranker.operating_points, report = choose_operating_points(reranker, single, settings)
    reranker.set_rule, reranker.set_operating_points, set_report = choose_set_points(reranker, tune, settings)
    return {**report, **set_report}


def deris_score_threshold(data: GateData) -> float:
    """The score threshold of DeRIS's own answer in the caches' provenance (one value, else InputError)."""
    thresholds = {p["config"]["score_threshold"] for p in data.provenance if "config" in p}
    if len(thresholds) != 1:
        raise InputError(f"the caches name {len(thresholds)} DeRIS score thresholds ({sorted(thresholds)}); "
                         "set answers are judged against one model's own answer: use caches of one model")
    return float(next(iter(thresholds)))


def choose_set_points(
    reranker: CalibratedReranker, tune: GateData, settings: CalibratedSettings
) -> Tuple[SetRule, Dict[str, SetRule], Dict[str, float]]:
    """(tuned set rule, {"tuned", "conservative"} set rules, their tuning figures), picked on all of
    `tune` (with its packed masks) on top of the re-ranker's single points of the same names."""
    sets = tune.require_sets(masks=True)
    default_index, p_fail_logit, fused, member_logit, kind_logit = set_outputs(reranker, tune)
    union_threshold = deris_score_threshold(tune)
    reference = (tune.scores > union_threshold).numpy()
    ref_iou = answer_ious(sets, reference)
    count, n = reference.shape
    empty_iou = answer_ious(sets, np.zeros_like(reference))
    several_ious = {}
    for tau_member in MEMBER_GRID:
        members = (member_logit.sigmoid() > tau_member).numpy()
        several_ious[tau_member] = (answer_ious(sets, members), members.any(axis=1), members)
    kind = kind_logit.softmax(dim=-1).numpy()
    p_none, p_several = kind[:, 0], kind[:, 2] / np.clip(1 - kind[:, 0], 1e-12, None)
    sure = set_confidence(kind_logit.softmax(dim=-1), member_logit.sigmoid()).numpy()
    budgets = {"tuned": settings.set_max_harmful, "conservative": settings.set_conservative_harmful}
    points, report = {}, {}
    for name, budget in budgets.items():
        single = apply_rule(reranker.operating_points[name], default_index, p_fail_logit, fused).selected.numpy()
        single_set = np.arange(n)[None, :] == single[:, None]
        single_iou = answer_ious(sets, single_set)
        best, fewest = None, None
        for tau_member, (several_iou, has_member, members) in several_ious.items():
            for tau_none in SET_TAU_GRID:
                none = p_none > tau_none
                for tau_several in SET_TAU_GRID:
                    several = (p_several > tau_several) & has_member & ~none
                    own_iou = np.where(none, empty_iou, np.where(several, several_iou, single_iou))
                    own_answer = np.where(several[:, None], members, single_set) & ~none[:, None]
                    own_changed = (own_answer != reference).any(axis=1)
                    for tau_defer in DEFER_GRID:
                        defer = sure < tau_defer
                        iou = np.where(defer, ref_iou, own_iou)
                        changed = 100 * float((own_changed & ~defer).mean())
                        harmful = 100 * float((iou < ref_iou - HARM_MARGIN).mean())
                        bound = min(harmful_upper_bound(harmful, count, settings.harm_confidence), changed)
                        rule = SetRule(tau_none, tau_several, tau_member, tau_defer, union_threshold)
                        figures = (100 * float(iou.mean()), harmful, changed, rule)
                        if bound <= budget and (best is None or figures[0] > best[0] + 1e-12):
                            best = figures
                        if fewest is None or harmful < fewest[1] - 1e-12:
                            fewest = figures
        chosen = best or fewest
        points[name] = chosen[3]
        report.update({f"{name}_set_tune_giou": chosen[0], f"{name}_set_tune_harmful": chosen[1],
                       f"{name}_set_tune_changed": chosen[2], f"{name}_set_within_budget": best is not None})
    report["set_tune_pairs"] = count
    report["set_tune_deris_giou"] = 100 * float(ref_iou.mean())
    return points["tuned"], points, report


def settings_record(settings: CalibratedSettings) -> Dict[str, object]:
    """The training settings as saved beside the weights."""
    return {"training": dataclasses.asdict(settings)}
