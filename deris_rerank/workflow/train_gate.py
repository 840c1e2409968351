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

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..gate import RELEASED, DecisionRule, GateConfig, ReleasedGate, VeniceGate, apply_rule
from ..settings import FEATURE_SETS, TrainSettings  # noqa: F401  (re-exported)
from ..signatures import GRID_FIELDS, GRID_SIZES, MASK_STAT_NAMES
from ..text_context import TextContext
from .cache import read_cache

TAU_GRID = tuple(round(0.01 * k, 2) for k in range(100))


@dataclass
class GateData:
    """Gate inputs and targets of P pairs (CPU float32 tensors unless noted).

    query_feat [P, N, D], scores [P, N], mask_stats [P, N, 4], grid [P, N, 675], ious [P, N],
    inter / union [P, N] int64 counts, union_iou [P] (DeRIS's own answer), ids (P strings),
    splits (P split names); text: the text-aware fields (`TextContext` of [P, ...] tensors)
    when every cache holds them, else None (caches written before they existed).
    """

    query_feat: torch.Tensor
    scores: torch.Tensor
    mask_stats: torch.Tensor
    grid: torch.Tensor
    ious: torch.Tensor
    inter: torch.Tensor
    union: torch.Tensor
    union_iou: torch.Tensor
    ids: List[str]
    splits: List[str]
    provenance: List[dict] = field(default_factory=list)
    text: Optional[TextContext] = None

    def require_text(self) -> TextContext:
        """The text-aware fields, or a one-line InputError naming the caches that lack them."""
        if self.text is None:
            splits = ", ".join(dict.fromkeys(self.splits))
            raise InputError(
                f"cache {splits} lacks the text-aware fields ({', '.join(CACHE_TEXT_FIELDS)}) that the calibrated "
                "re-ranker reads: re-extract it with this version's `deris-rerank extract`"
            )
        return self.text

    @property
    def default_index(self) -> torch.Tensor:
        return self.scores.argmax(dim=1)

    @property
    def relative_iou(self) -> torch.Tensor:
        """[P, N] IoU of each candidate minus Query-0's: the gain the gate learns to predict."""
        return self.ious - self.ious.gather(1, self.default_index[:, None])

    @property
    def failure(self) -> torch.Tensor:
        """[P] bool: some candidate beats Query-0."""
        return self.relative_iou.max(dim=1).values > 0

    def __len__(self) -> int:
        return len(self.ids)


def load_gate_data(paths: Sequence[Path]) -> GateData:
    """Read split folders written by `deris-rerank extract` into one GateData."""
    parts = []
    for path in map(Path, paths):
        tensors, ids, provenance = read_cache([path])
        t = {k: torch.from_numpy(v) for k, v in tensors.items()}
        parts.append(
            GateData(
                query_feat=t["query_feat"].float(),
                scores=t["det_scores"].float(),
                mask_stats=torch.stack([t[name].float() for name in MASK_STAT_NAMES], dim=-1),
                grid=torch.cat([t[name].float().reshape(*t[name].shape[:2], -1) for name, _ in GRID_FIELDS], dim=-1),
                ious=t["query_ious"].float(),
                inter=t["query_inter"],
                union=t["query_union"],
                union_iou=t["union_iou"].float(),
                ids=ids,
                splits=[path.name] * len(ids),
                provenance=provenance,
                text=_text_context(t),
            )
        )
    tensor_fields = [f.name for f in dataclasses.fields(GateData) if f.name not in ("ids", "splits", "provenance", "text")]
    texts = [p.text for p in parts]
    return GateData(
        **{name: torch.cat([getattr(p, name) for p in parts]) for name in tensor_fields},
        ids=[i for p in parts for i in p.ids],
        splits=[s for p in parts for s in p.splits],
        provenance=[r for p in parts for r in p.provenance],
        text=None if any(t is None for t in texts) else TextContext(*(torch.cat(f) for f in zip(*texts))),
    )


CACHE_TEXT_FIELDS = ("refer_logits", "cognition_feat", "text_feat", "text_padding")


def _text_context(t: Dict[str, torch.Tensor]) -> Optional[TextContext]:
    """The cache's text-aware fields as a TextContext (float32, bool padding), or None if any is missing."""
    if not all(name in t for name in CACHE_TEXT_FIELDS):
        return None
    return TextContext(t["refer_logits"].float(), t["cognition_feat"].float(), t["text_feat"].float(), t["text_padding"].bool())




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


def gate_outputs(gate: VeniceGate, data: GateData, batch_size: int = 4096) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(default_index [P], p_fail_logit [P], gain [P, N]) of the gate in eval mode, on CPU.

    For a text-aware re-ranker (`reads_text`), `gain` is its fused logit per candidate.
    """
    device = next(gate.parameters()).device
    gate.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = slice(start, start + batch_size)
            inputs = [x.to(device) for x in (data.query_feat[rows], data.scores[rows], data.mask_stats[rows], data.grid[rows])]
            if gate.reads_text:
                inputs.append(data.require_text().select(rows).to(device))
            default_index, logit, gain = gate(*inputs)[:3]
            outs.append([default_index.cpu(), logit.float().cpu(), gain.float().cpu()])
    return tuple(torch.cat([o[k] for o in outs]) for k in range(3))


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
