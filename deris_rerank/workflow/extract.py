"""`deris-rerank extract`: run DeRIS over a split and write its Venice-H1 feature cache.

Per pair: the candidates' query embeddings, referring scores (slot order), 4 mask statistics,
9 grid-signature fields, the IoU of every candidate with the ground truth, the oracle slot,
and DeRIS's own answer's IoU; and, for text-aware re-rankers, DeRIS's raw referring logits,
the cognition embeddings and the expression's token features, padding and pooled mean (see
`cache.py` for the fields).

For answers that are sets of candidates (GRES: no referent, or several), also each candidate's
pixel area and the target's, the number of targets, each candidate's best-matching referred
instance (when the data has instance masks), and every candidate's and the target's mask at
SET_MASK_SIZE x SET_MASK_SIZE, bit-packed (`bitmasks`), so that the IoU of any union of
candidates (and the best such union) can be computed from the cache alone.

IoU protocols: "384" (default, as DeRIS's own evaluation): candidate masks binarised at the
perception size (sigmoid >= 0.5), ground truth resized there with nearest; "original": the
candidates resized (nearest) to the image and compared with the full-size ground truth. An
empty prediction against an empty ground truth (a no-target expression) scores IoU 1. The
packed masks do not depend on the protocol: candidates from the perception size, the target
from the image's size, both resized with nearest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..data.sample import ReferringSample
from ..errors import InputError, OutputMismatchError
from ..bitmasks import pack_masks
from ..candidates import CandidateBatch
from ..pipeline import Pipeline
from ..run_identity import engine_identity, identity_differences, model_sha256
from ..transforms import resize_mask_nearest
from ..rerank.cache import shard_ids, shard_path, shard_provenance, write_shard
from ..rerank.signatures import MASK_STAT_NAMES, split_grid_signature
from ..version import __version__

IOU_PROTOCOLS = ("384", "original")
SET_MASK_SIZE = 96  # side of the bit-packed candidate and target masks in a cache


class GroundTruth(NamedTuple):
    """What extraction compares the candidates with: the target mask bool [H, W] (the union of the
    referred objects; all False when there are none), the number of targets (-1 when the data
    does not say) and the referred instances' masks bool [K, H, W] (None when the data has none)."""

    mask: np.ndarray
    num_targets: int
    instances: Optional[np.ndarray]


def ground_truth(sample: ReferringSample) -> GroundTruth:
    """The ground truth of one pair (decodes its masks)."""
    instances = sample.instance_masks() if sample.instance_masks is not None else None
    count = sample.num_targets if sample.num_targets is not None else -1
    return GroundTruth(sample.target_mask(), count, instances)


def mask_overlap(pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IoU, intersection, union) of bool masks pred [..., H, W] and target [..., H, W] (broadcast).

    IoU is 1 where both are empty. Counts are int64.
    """
    inter = (pred & target).sum(dim=(-2, -1))
    union = (pred | target).sum(dim=(-2, -1))
    iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.ones_like(inter, dtype=torch.float64))
    return iou, inter, union


def pair_features(batch: CandidateBatch, truths: List[GroundTruth], config, protocol: str) -> Dict[str, torch.Tensor]:
    """Cache fields for the pairs of one model run (CPU tensors, first dim = pairs)."""
    candidates = batch.candidates
    stats, grids = candidates.gate_features()
    binary = candidates.binary_masks(config.mask_threshold).cpu()
    answer = candidates.answer_mask(config.score_threshold).cpu()
    small = (SET_MASK_SIZE, SET_MASK_SIZE)
    overlaps, sets = [], []
    for b, truth in enumerate(truths):
        target = torch.from_numpy(truth.mask)
        instances = None if truth.instances is None else torch.from_numpy(truth.instances)
        packed_target = pack_masks(resize_mask_nearest(target, small))
        if protocol == "384":
            target = resize_mask_nearest(target, binary.shape[-2:])
            instances = None if instances is None else resize_mask_nearest(instances, binary.shape[-2:])
            preds, union_pred = binary[b], answer[b]
        else:
            preds = resize_mask_nearest(binary[b], target.shape)
            union_pred = resize_mask_nearest(answer[b], target.shape)
        overlaps.append((mask_overlap(preds, target), mask_overlap(union_pred, target)))
        sets.append(_set_fields(preds, target, instances, truth.num_targets, pack_masks(resize_mask_nearest(binary[b], small)), packed_target))
    fields = {
        "query_feat": candidates.query_embed.float().cpu(),
        "det_scores": candidates.scores.float().cpu(),
        "query_ious": torch.stack([o[0][0] for o in overlaps]).float(),
        "query_inter": torch.stack([o[0][1] for o in overlaps]),
        "query_union": torch.stack([o[0][2] for o in overlaps]),
        "union_iou": torch.stack([o[1][0] for o in overlaps]).float(),
        "union_inter": torch.stack([o[1][1] for o in overlaps]),
        "union_union": torch.stack([o[1][2] for o in overlaps]),
        "existence": candidates.existence.float().cpu(),
        **{name: torch.stack([pair[name] for pair in sets]) for name in SET_FIELDS},
    }
    if candidates.text is not None:
        text = candidates.text
        fields.update({
            "refer_logits": text.refer_logits.float().cpu(),
            "cognition_feat": text.cognition_embed.float().cpu(),
            "text_feat": text.text_feat.float().cpu(),
            "text_padding": text.text_padding.to(torch.uint8).cpu(),
            "text_pooled": text.pooled.float().cpu(),
        })
    fields["oracle_idx"] = fields["query_ious"].argmax(dim=1)
    fields.update({name: stats[..., k].float().cpu() for k, name in enumerate(MASK_STAT_NAMES)})
    fields.update({name: value.float().cpu() for name, value in split_grid_signature(grids).items()})
    return fields


SET_FIELDS = ("query_area", "target_area", "num_targets", "query_instance", "query_instance_iou", "query_masks", "target_mask_packed")


def _set_fields(preds: torch.Tensor, target: torch.Tensor, instances: Optional[torch.Tensor], num_targets: int,
                packed_preds: torch.Tensor, packed_target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One pair's fields for set answers: preds bool [N, H, W] and target bool [H, W] at the IoU
    protocol's size, instances bool [K, H, W] there (or None), the packed masks [N, B] and [B]."""
    n = preds.shape[0]
    best = torch.full((n,), -1, dtype=torch.int64)
    best_iou = torch.zeros(n, dtype=torch.float32)
    if instances is not None and instances.shape[0] > 0:
        ious = mask_overlap(preds[:, None], instances[None])[0].float()  # [N, K]
        best_iou, best = ious.max(dim=1)
        best = torch.where(best_iou > 0, best, torch.full_like(best, -1))
    return {
        "query_area": preds.sum(dim=(-2, -1)),
        "target_area": target.sum(),
        "num_targets": torch.tensor(num_targets, dtype=torch.int64),
        "query_instance": best,
        "query_instance_iou": best_iou,
        "query_masks": packed_preds,
        "target_mask_packed": packed_target,
    }


def extract_split(
    pipe: Pipeline,
    samples: Sequence[ReferringSample],
    out_dir: Path,
    shard_size: int = 10_000,
    batch_size: int = 8,
    protocol: str = "384",
    worker: Tuple[int, int] = (0, 1),
    progress: bool = True,
    source: Optional[dict] = None,
    overwrite: bool = False,
) -> Dict[str, int]:
    """Write the cache of one split under `out_dir/<split>/`. Resumable: complete shards are skipped.

    worker (i, K): this process handles the shards k with k % K == i, so K processes (e.g. one
    per GPU) can share a split. source: a JSON-able description of where the pairs came from
    (annotation file and its hash, or RefShapes settings), recorded in the provenance. Shards
    already in the split must have this run's provenance (model, tokenizer, settings, source, and
    batch_size and torch's thread count: `engine_identity`), else OutputMismatchError names the
    differences; overwrite=True removes them first.
    Returns counts of pairs written, skipped and failed.
    """
    check_extract_inputs(samples, protocol)
    provenance = {**extract_provenance(pipe, protocol, source), **engine_identity(batch_size)}
    jobs, counts = plan_extract(samples, out_dir, provenance, shard_size, worker, overwrite)
    total = counts["skipped"] + sum(len(job.samples) for job in jobs)
    with tqdm(total=total, initial=counts["skipped"], unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for job in jobs:
            written, failed = _extract_shard(pipe, job, batch_size, protocol, bar)
            counts["written"] += written
            counts["failed"] += failed
    return counts


@dataclass(frozen=True)
class ShardJob:
    """One shard still to write: its number k, its pairs (split positions [k * size, (k + 1) * size)),
    its file and the provenance it will record."""

    index: int
    samples: Sequence[ReferringSample]
    path: Path
    provenance: dict


def check_extract_inputs(samples: Sequence[ReferringSample], protocol: str) -> None:
    """InputError for an unknown IoU protocol, no pairs, or pairs of several splits."""
    if protocol not in IOU_PROTOCOLS:
        raise InputError(f"IoU protocol must be one of {IOU_PROTOCOLS}, got {protocol!r}")
    if not samples:
        raise InputError("the split has no pairs")
    splits = {s.split for s in samples}
    if len(splits) != 1:
        raise InputError(f"extract one split at a time, got {sorted(splits)}")


def extract_provenance(pipe: Pipeline, protocol: str, source: Optional[dict]) -> dict:
    """What each shard records and a rerun must match: model, tokenizer, settings and data source."""
    return {
        "checkpoint": None if pipe.deris_path is None else str(pipe.deris_path),
        "checkpoint_sha256": model_sha256(pipe),
        "config": pipe.config.to_dict(),
        "tokenizer_sha256": pipe.tokenizer.sha256,
        "dtype": pipe.precision,
        "package_version": __version__,
        "iou_protocol": protocol,
        "set_mask_size": SET_MASK_SIZE,
        "query_source": pipe.query_source,
        "batch_semantics": pipe.batch_semantics,
        "source": source,
    }


def plan_extract(
    samples: Sequence[ReferringSample], out_dir: Path, provenance: dict, shard_size: int = 10_000,
    worker: Tuple[int, int] = (0, 1), overwrite: bool = False,
) -> Tuple[List[ShardJob], Dict[str, int]]:
    """The shards of this worker still to write, and counts {written: 0, skipped, failed: 0}.

    Checks (OutputMismatchError) that the split's shards have `provenance`; overwrite=True
    removes them first. A complete shard (every pair of its range that did not fail) is skipped.
    """
    split_dir = Path(out_dir) / samples[0].split
    if overwrite:
        _remove_split(split_dir)
    _check_provenance(split_dir, provenance)
    index, count = worker
    counts = {"written": 0, "skipped": 0, "failed": 0}
    jobs = []
    for k in range(-(-len(samples) // shard_size)):
        if k % count != index:
            continue
        part = samples[k * shard_size : (k + 1) * shard_size]
        path = shard_path(split_dir, k)
        if path.is_file() and _complete(path, part, split_dir):
            counts["skipped"] += len(part)
        else:
            jobs.append(ShardJob(k, part, path, provenance))
    return jobs, counts


def batch_fields(batch: CandidateBatch, truths: List[GroundTruth], config, protocol: str) -> Dict[int, Dict[str, torch.Tensor]]:
    """`pair_features` of one model run, per pair: {pair index of the batch: {field: tensor}}."""
    fields = pair_features(batch, truths, config, protocol)
    return {i: {name: value[b] for name, value in fields.items()} for b, i in enumerate(batch.indices)}


def save_shard(job: ShardJob, collected: Dict[int, Dict[str, torch.Tensor]], failed: Dict[int, str]) -> Tuple[int, int]:
    """Write a shard from its pairs' fields (`collected`: position in `job.samples` -> fields) in
    split order, and add the failed pairs (position -> reason) to the split's errors.jsonl, in split order.
    Returns (pairs written, pairs failed)."""
    part = job.samples
    order = sorted(collected)
    if order:
        tensors = {name: torch.stack([collected[i][name] for i in order]) for name in collected[order[0]]}
        write_shard(job.path, tensors, [part[i].id for i in order], job.provenance)
    if failed:
        errors = job.path.parent / "errors.jsonl"
        known = {json.loads(line)["id"] for line in _error_lines(job.path.parent)}
        records = [{"id": part[i].id, "error": failed[i]} for i in sorted(failed)]  # split order, whatever the engine
        with open(errors, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(e) + "\n" for e in records if e["id"] not in known)
    return len(order), len(failed)


def _check_provenance(split_dir: Path, provenance: dict) -> None:
    """Stop when a shard already in `split_dir` was made by a run with another provenance."""
    for path in sorted(split_dir.glob("shard_*.safetensors")):
        differences = identity_differences(shard_provenance(path), provenance)
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise OutputMismatchError(
                f"{split_dir} holds shards made with other settings or data ({path.name}: {shown}); rerun with "
                f"--overwrite to replace them, or choose another --out"
            )


def _remove_split(split_dir: Path) -> None:
    """Delete a split's shards and error list (for overwrite); other files are left alone."""
    for path in split_dir.glob("shard_*.safetensors"):
        path.unlink()
    (split_dir / "errors.jsonl").unlink(missing_ok=True)


def _complete(path: Path, part: Sequence[ReferringSample], split_dir: Path) -> bool:
    """A shard is complete when it holds every pair of its range that did not fail."""
    failed = {json.loads(line)["id"] for line in _error_lines(split_dir)}
    return shard_ids(path) == [s.id for s in part if s.id not in failed]


def _error_lines(split_dir: Path) -> List[str]:
    errors = split_dir / "errors.jsonl"
    return [line for line in errors.read_text().splitlines() if line.strip()] if errors.is_file() else []


def _extract_shard(pipe, job: ShardJob, batch_size, protocol, bar) -> Tuple[int, int]:
    part = job.samples
    pairs = [(s.image, s.text, s.image_id or s.id) for s in part]
    collected: Dict[int, Dict[str, torch.Tensor]] = {}
    failed: Dict[int, str] = {}
    for item in pipe.iter_candidates(pairs, batch_size=batch_size):
        if isinstance(item, CandidateBatch):
            collected.update(batch_fields(item, [ground_truth(part[i]) for i in item.indices], pipe.config, protocol))
            bar.update(len(item.indices))
        else:
            i, error = item
            failed[i] = str(error)
            bar.update(1)
    return save_shard(job, collected, failed)
