"""Feature caches as a re-ranker's inputs: `GateData` (what `deris-rerank extract` wrote, as
tensors), and `gate_outputs` (a re-ranker run over it). Read by training, evaluation and the
ablation table alike, so evaluating never imports a trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from .cache import read_cache
from .venice import VeniceGate
from .signatures import GRID_FIELDS, MASK_STAT_NAMES
from .text_context import TextContext


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
