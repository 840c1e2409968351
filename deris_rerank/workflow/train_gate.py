"""`deris-rerank train-gate`: train the released Venice-H1 architecture on feature caches.

Recipe (the Venice-H1 card's defaults, all overridable): AdamW lr 5e-4, weight decay 1e-4,
batch 512, 20 epochs, linear warm-up for 3 epochs then cosine decay to 0; loss = focal BCE
(gamma 2, positive weight n_negative / n_positive) on the failure flag + 5 x smooth-L1
(beta 0.1) between the predicted gain relative to Query-0 and the true IoU difference;
mixed precision (float16 autocast) on CUDA; seed 42, deterministic on CPU.
A pair is a failure when some candidate has a strictly higher IoU than Query-0.

The decision settings are picked on a tuning split (never the evaluation split): tau on a
grid of 0.00 ... 0.99 maximising the mIoU gain (delta_full), ties going to the larger tau;
optionally the temperature and margin_pred too. They are stored in the saved gate.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..settings import FEATURE_SETS, TrainSettings
from ..rerank.decision import DecisionRule, apply_rule
from ..rerank.venice import RELEASED, GateConfig, ReleasedGate, VeniceGate
from ..rerank.gate_data import GateData, gate_outputs
from ..rerank.signatures import GRID_SIZES

TAU_GRID = tuple(round(0.01 * k, 2) for k in range(100))


def focal_bce(logits: torch.Tensor, targets: torch.Tensor, gamma: float, pos_weight: torch.Tensor) -> torch.Tensor:
    """Focal binary cross-entropy with a positive-class weight, averaged: [B] -> []."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    return ((1 - p_t) ** gamma * bce).mean()


def lr_factor(step: int, steps_per_epoch: int, settings: TrainSettings) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine decay to 0 at the end."""
    warmup = settings.warmup_epochs * steps_per_epoch
    total = settings.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_gate(data: GateData, settings: TrainSettings) -> VeniceGate:
    if settings.features not in FEATURE_SETS:
        raise InputError(f"features must be one of {sorted(FEATURE_SETS)}, got {settings.features!r}")
    scales = FEATURE_SETS[settings.features]
    config = GateConfig(
        RELEASED,
        query_dim=data.query_feat.shape[-1],
        hidden_dim=settings.hidden_dim,
        n_layers=settings.n_layers,
        n_heads=settings.n_heads,
        n_queries=data.query_feat.shape[1],
        use_grid=bool(scales),
        dropout=settings.dropout,
        grid_scales=scales or GRID_SIZES,
    )
    return ReleasedGate(config, DecisionRule(tau=0.5))


def train_gate(
    train: GateData,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> VeniceGate:
    """Train a released-architecture gate on `train` (no decision tuning: see `choose_rule`)."""
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    gate = build_gate(train, settings).to(device)
    failure = train.failure.float()
    positives = failure.sum()
    pos_weight = ((len(train) - positives) / positives.clamp(min=1)).to(device)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, settings))
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    shuffle = torch.Generator().manual_seed(settings.seed)
    inputs = [train.query_feat, train.scores, train.mask_stats, train.grid]
    relative = train.relative_iou
    log(f"training on {len(train)} pairs ({int(positives)} failures, pos_weight {float(pos_weight):.2f}), "
        f"{settings.epochs} epochs of {steps_per_epoch} steps on {device}")
    for epoch in range(settings.epochs):
        gate.train()
        totals = {"loss": 0.0, "gate": 0.0, "gain": 0.0}
        for rows in torch.randperm(len(train), generator=shuffle).split(settings.batch_size):
            batch = [x[rows].to(device) for x in inputs]
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                default_index, p_fail_logit, gain = gate(*batch)
                rank = gain - gain.gather(1, default_index[:, None])
                gate_loss = focal_bce(p_fail_logit.float(), failure[rows].to(device), settings.focal_gamma, pos_weight)
                gain_loss = F.smooth_l1_loss(rank.float(), relative[rows].to(device), beta=settings.smooth_l1_beta)
                loss = gate_loss + settings.gain_weight * gain_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for key, value in (("loss", loss), ("gate", gate_loss), ("gain", gain_loss)):
                totals[key] += float(value.detach()) * len(rows)
        log(f"epoch {epoch + 1}/{settings.epochs}: " + ", ".join(f"{k} {v / len(train):.4f}" for k, v in totals.items()))
    return gate.eval()


def delta_full(data: GateData, selected: torch.Tensor) -> float:
    """mIoU gain in points of choosing `selected` [P] over Query-0."""
    rows = torch.arange(len(data))
    return float(100.0 * (data.ious[rows, selected] - data.ious[rows, data.default_index]).mean())


def choose_rule(gate: VeniceGate, tune: GateData, settings: TrainSettings) -> Tuple[DecisionRule, Dict[str, float]]:
    """Pick tau (and optionally temp, margin_pred) maximising delta_full on the tuning split."""
    default_index, logit, gain = gate_outputs(gate, tune)
    temps = (0.5, 1.0, 1.5, 2.0) if settings.tune_temp else (1.0,)
    margins = (0.0, 0.01, 0.02, 0.05, 0.1) if settings.tune_margin else (0.02,)
    best: Optional[Tuple[float, DecisionRule]] = None
    for temp in temps:
        for margin in margins:
            for tau in TAU_GRID:
                rule = DecisionRule(tau=tau, temp=temp, margin_pred=margin)
                score = delta_full(tune, apply_rule(rule, default_index, logit, gain).selected)
                if best is None or score >= best[0] - 1e-12:
                    best = (score, rule)
    return best[1], {"tune_delta_full": best[0], "tune_pairs": len(tune)}
