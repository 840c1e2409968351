"""Venice-H1 feature caches: safetensors shards of per-pair candidate features and IoUs.

Layout: `<cache>/<split>/shard_<k:05d>.safetensors`, shard k holding pairs
[k * shard_size, (k + 1) * shard_size) of the split. Tensors (M pairs, N candidates, D dims),
named as in the Venice-H1 caches so their tools can read ours:

  query_feat [M, N, D]   det_scores [M, N]   query_ious [M, N]   oracle_idx [M] (int64)
  mask_mean / mask_max / mask_area / mask_std [M, N]
  grid_mean_G / grid_max_G [M, N, G*G] and boundary_G [M, N] for G = 4, 8, 16
plus ours: query_inter / query_union [M, N] (int64 pixel counts, for cumulative IoU),
union_iou [M], union_inter / union_union [M] (DeRIS's own answer), existence [M];
and for text-aware re-rankers (caches written before these existed lack them):
refer_logits [M, N, K] (DeRIS's raw referring logits), cognition_feat [M, N, D] (the
cognition branch's per-candidate embeddings), text_feat [M, T, D] (the expression's cognition
token features, T = the model's max_tokens), text_padding [M, T] (uint8, 1 = padding) and
text_pooled [M, D] (mean of text_feat over the non-padding tokens);
and for set answers (GRES; caches written before these existed lack them): query_area [M, N]
and target_area [M] (int64 pixel counts at the IoU protocol's size, so query_inter / query_area
is the share of a candidate inside the target), num_targets [M] (int64, -1 = unknown),
query_instance [M, N] (int64: the referred instance a candidate overlaps most, by IoU; -1 =
none or no instance masks) with its IoU query_instance_iou [M, N], and the masks bit-packed at
S x S pixels (S = the provenance's set_mask_size; `bitmasks`): query_masks [M, N, ceil(S*S/8)]
and target_mask_packed [M, ceil(S*S/8)] (uint8).
The shard's safetensors metadata holds `ids` (JSON list, one per pair) and `provenance`
(JSON: checkpoint hash, config, package version, IoU protocol, query source).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import InputError
from ..fileio import atomic_write

SHARD_PATTERN = "shard_{:05d}.safetensors"


def shard_path(split_dir: Path, index: int) -> Path:
    return split_dir / SHARD_PATTERN.format(index)


def write_shard(path: Path, tensors: Dict[str, torch.Tensor], ids: Sequence[str], provenance: dict) -> None:
    """Write one shard atomically (temp file + rename)."""
    metadata = {"ids": json.dumps(list(ids)), "provenance": json.dumps(provenance, sort_keys=True)}
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def shard_ids(path: Path) -> List[str]:
    """The pair ids stored in a shard's metadata (reads only the header)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["ids"])


def shard_provenance(path: Path) -> dict:
    """The provenance record stored in a shard's metadata (reads only the header; {} if none)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("provenance", "{}"))


def read_cache(paths: Sequence[Path], skip: Sequence[str] = ()) -> Tuple[Dict[str, np.ndarray], List[str], List[dict]]:
    """Concatenate the shards under `paths` (split folders or shard files), in shard order,
    leaving out the tensors named in `skip`.

    Returns (tensors as NumPy arrays, pair ids, the distinct provenance records).
    """
    shards = []
    for path in map(Path, paths):
        if path.is_dir():
            shards += sorted(path.glob("shard_*.safetensors"))
        elif path.is_file():
            shards.append(path)
        else:
            raise InputError(f"feature cache not found: {path} (give split folders written by `deris-rerank extract`)")
    if not shards:
        raise InputError(f"no cache shards (shard_*.safetensors) under {', '.join(map(str, paths))}")
    parts: Dict[str, List[np.ndarray]] = {}
    ids: List[str] = []
    provenance: List[dict] = []
    for shard in shards:
        with safe_open(str(shard), framework="np") as handle:
            meta = handle.metadata()
            ids += json.loads(meta["ids"])
            record = json.loads(meta["provenance"])
            if record not in provenance:
                provenance.append(record)
            for key in handle.keys():
                if key not in skip:
                    parts.setdefault(key, []).append(handle.get_tensor(key))
    return {k: np.concatenate(v) for k, v in parts.items()}, ids, provenance
