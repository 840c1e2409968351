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


SET_CACHE_FIELDS = ("query_area", "target_area", "num_targets", "query_instance", "query_instance_iou")
MASK_CACHE_FIELDS = ("query_masks", "target_mask_packed")
MEMBER_SHARE = 0.5  # a candidate is a member of the target set when at least this share of its pixels is in the target
KINDS = ("none", "single", "multi")  # kinds of expression by their number of targets: 0, 1, several


@dataclass
class SetData:
    """What set answers (GRES) need of P pairs with N candidates, from caches that hold it.

    area [P, N] and target_area [P]: int64 pixel counts at the IoU protocol's size (with the
    GateData's inter, the share of each candidate inside the target); num_targets [P] int64 (-1 =
    unknown); instance [P, N] int64 (the referred instance each candidate overlaps most, -1 =
    none) and instance_iou [P, N]; masks uint8 [P, N, B] and target_masks uint8 [P, B]: the
    bit-packed masks at mask_size x mask_size (None when not loaded).
    """

    area: torch.Tensor
    target_area: torch.Tensor
    num_targets: torch.Tensor
    instance: torch.Tensor
    instance_iou: torch.Tensor
    masks: Optional[torch.Tensor] = None
    target_masks: Optional[torch.Tensor] = None
    mask_size: int = 0

    @property
    def kind(self) -> torch.Tensor:
        """[P] int64 index into KINDS: 0 no target, 1 one, 2 several (unknown counts: from the target's area)."""
        counts = torch.where(self.num_targets >= 0, self.num_targets, (self.target_area > 0).long())
        return counts.clamp(max=2)

    def membership(self, inter: torch.Tensor, share: float = MEMBER_SHARE) -> torch.Tensor:
        """[P, N] bool: non-empty candidates with at least `share` of their pixels inside the
        target (`inter` [P, N]: their intersections with it)."""
        return (self.area > 0) & (inter.double() >= share * self.area.double())

    def select(self, rows) -> "SetData":
        """The pairs `rows` (an index tensor or slice)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return SetData(self.area[rows], self.target_area[rows], self.num_targets[rows], self.instance[rows],
                       self.instance_iou[rows], pick(self.masks), pick(self.target_masks), self.mask_size)


@dataclass
class GateData:
    """Gate inputs and targets of P pairs (CPU float32 tensors unless noted).

    query_feat [P, N, D], scores [P, N], mask_stats [P, N, 4], grid [P, N, 675], ious [P, N],
    inter / union [P, N] int64 counts, union_iou [P] (DeRIS's own answer), ids (P strings),
    splits (P split names); existence [P] DeRIS's existence probability; text: the text-aware
    fields (`TextContext` of [P, ...] tensors) when every cache holds them, else None (caches
    written before they existed); sets: what set answers need (`SetData`), when every cache holds
    it, else None.
    """

    query_feat: torch.Tensor
    scores: torch.Tensor
    mask_stats: torch.Tensor
    grid: torch.Tensor
    ious: torch.Tensor
    inter: torch.Tensor
    union: torch.Tensor
    union_iou: torch.Tensor
    existence: torch.Tensor
    ids: List[str]
    splits: List[str]
    provenance: List[dict] = field(default_factory=list)
    text: Optional[TextContext] = None
    sets: Optional[SetData] = None

    def require_text(self) -> TextContext:
        """The text-aware fields, or a one-line InputError naming the caches that lack them."""
        if self.text is None:
            splits = ", ".join(dict.fromkeys(self.splits))
            raise InputError(
                f"cache {splits} lacks the text-aware fields ({', '.join(CACHE_TEXT_FIELDS)}) that the calibrated "
                "re-ranker reads: re-extract it with this version's `deris-rerank extract`"
            )
        return self.text

    def require_sets(self, masks: bool = False) -> SetData:
        """The set fields (with the packed masks when `masks`), or a one-line InputError naming the
        caches that lack them."""
        if self.sets is None or (masks and self.sets.masks is None):
            splits = ", ".join(dict.fromkeys(self.splits))
            what = "the packed masks" if self.sets is not None else f"the set fields ({', '.join(SET_CACHE_FIELDS)})"
            raise InputError(
                f"cache {splits} lacks {what} that set answers need (read with masks=True, or re-extract it with this "
                "version's `deris-rerank extract`, e.g. --refshapes-mode gres for RefShapes)"
            )
        return self.sets

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

    def select(self, rows: torch.Tensor) -> "GateData":
        """The pairs `rows` [R] (int64) of this data."""
        tensors = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(GateData)
                   if f.name not in ("ids", "splits", "provenance", "text", "sets")}
        picked = rows.tolist()
        return GateData(**tensors, ids=[self.ids[i] for i in picked], splits=[self.splits[i] for i in picked],
                        provenance=self.provenance, text=None if self.text is None else self.text.select(rows),
                        sets=None if self.sets is None else self.sets.select(rows))


def load_gate_data(paths: Sequence[Path], masks: bool = False) -> GateData:
    """Read split folders written by `deris-rerank extract` into one GateData; masks: also read
    the bit-packed masks (for set metrics; they are large: ~12 kB per pair)."""
    parts = []
    for path in map(Path, paths):
        tensors, ids, provenance = read_cache([path], skip=() if masks else MASK_CACHE_FIELDS)
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
                existence=t["existence"].float(),
                ids=ids,
                splits=[path.name] * len(ids),
                provenance=provenance,
                text=_text_context(t),
                sets=_set_data(t, provenance, path),
            )
        )
    tensor_fields = [f.name for f in dataclasses.fields(GateData) if f.name not in ("ids", "splits", "provenance", "text", "sets")]
    texts = [p.text for p in parts]
    return GateData(
        **{name: torch.cat([getattr(p, name) for p in parts]) for name in tensor_fields},
        ids=[i for p in parts for i in p.ids],
        splits=[s for p in parts for s in p.splits],
        provenance=[r for p in parts for r in p.provenance],
        text=None if any(t is None for t in texts) else TextContext(*(torch.cat(f) for f in zip(*texts))),
        sets=_joined_sets([p.sets for p in parts]),
    )


CACHE_TEXT_FIELDS = ("refer_logits", "cognition_feat", "text_feat", "text_padding")


def _set_data(t: Dict[str, torch.Tensor], provenance: List[dict], path: Path) -> Optional[SetData]:
    """The cache's set fields as SetData (with its packed masks when they were read), or None if any is missing."""
    if not all(name in t for name in SET_CACHE_FIELDS):
        return None
    sizes = {record.get("set_mask_size") for record in provenance}
    masks = t.get("query_masks"), t.get("target_mask_packed")
    if masks[0] is not None and len(sizes) != 1:
        raise InputError(f"cache {path} mixes shards with packed masks of different sizes ({sorted(map(str, sizes))}); re-extract it")
    return SetData(t["query_area"], t["target_area"], t["num_targets"], t["query_instance"], t["query_instance_iou"].float(),
                   *masks, mask_size=int(next(iter(sizes)) or 0) if masks[0] is not None else 0)


def _joined_sets(parts: List[Optional[SetData]]) -> Optional[SetData]:
    """The SetData of several caches in order (None if any lacks it; masks only if all have them, of one size)."""
    if any(p is None for p in parts):
        return None
    with_masks = all(p.masks is not None for p in parts)
    sizes = {p.mask_size for p in parts}
    if with_masks and len(sizes) != 1:
        raise InputError(f"the caches hold packed masks of different sizes ({sorted(sizes)}); evaluate them separately")
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return SetData(cat("area"), cat("target_area"), cat("num_targets"), cat("instance"), cat("instance_iou"),
                   cat("masks") if with_masks else None, cat("target_masks") if with_masks else None,
                   next(iter(sizes)) if with_masks else 0)


def _text_context(t: Dict[str, torch.Tensor]) -> Optional[TextContext]:
    """The cache's text-aware fields as a TextContext (float32, bool padding), or None if any is missing."""
    if not all(name in t for name in CACHE_TEXT_FIELDS):
        return None
    return TextContext(t["refer_logits"].float(), t["cognition_feat"].float(), t["text_feat"].float(), t["text_padding"].bool())




def gate_outputs(gate: VeniceGate, data: GateData, batch_size: int = 4096) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(default_index [P], p_fail_logit [P], gain [P, N]) of the gate in eval mode, on CPU.

    For a text-aware re-ranker (`reads_text`), `gain` is its fused logit per candidate.
    """
    return tuple(_batched_outputs(gate, data, batch_size, lambda out: out[:3]))


def set_outputs(reranker, data: GateData, batch_size: int = 4096) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A set re-ranker's (default_index [P], p_fail_logit [P], fused [P, N], member [P, N],
    kind [P, 3]) logits in eval mode, on CPU."""
    return tuple(_batched_outputs(reranker, data, batch_size, lambda out: (*out[:3], out.member, out.kind), full=True))


def _batched_outputs(gate, data: GateData, batch_size: int, pick, full: bool = False) -> List[torch.Tensor]:
    """`pick` of the gate's outputs (`outputs` when `full`, else its forward) over `data`, concatenated on CPU."""
    device = next(gate.parameters()).device
    gate.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = slice(start, start + batch_size)
            inputs = [x.to(device) for x in (data.query_feat[rows], data.scores[rows], data.mask_stats[rows], data.grid[rows])]
            if gate.reads_text:
                inputs.append(data.require_text().select(rows).to(device))
                inputs.append(data.existence[rows].to(device))
            out = gate.outputs(*inputs) if full else gate(*inputs)
            outs.append([t.float().cpu() if t.is_floating_point() else t.cpu() for t in pick(out)])
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]
