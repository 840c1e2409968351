"""Retrieval augmentation for the calibrated re-ranker: a memory of training candidates and
their IoU outcomes, searched by cosine similarity in the re-ranker's own learned space.

For B pairs with N candidates, hidden size H (the re-ranker's), a memory of M entries and key
width E (H, or 2H when the pooled text is joined):

    keys    [M, E]  unit-norm keys of memory candidates (stored as float16 or float32)
    values  [M]     each memory candidate's IoU gain over its pair's Query-0 ("gain"),
                    or its IoU ("iou")
    query   [B, N, E]  unit-norm keys of the candidates to score (`retrieval_keys`)
    sim = query @ keys^T                       [B, N, M]   (batched matmul; large batches in row
                                                            chunks of at most SIMILARITY_BUDGET values)
    top-k sims s_j and their values v_j        [B, N, k]
    retrieved = sum_j softmax(s / temperature)_j v_j   [B, N]

Key spaces (`retrieval_keys`), from the re-ranker's candidate representation `cand` [B, N, H]
(after its last norm) and pooled text representation `pooled` [B, H]:
  "cand":      normalise(cand)
  "cand_text": [normalise(cand), normalise(pooled)] / sqrt(2)   (cosine = mean of the two cosines)

The ensemble (in `CalibratedReranker`) ranks by fused + weight * retrieved, weight >= 0; a weight
of 0 gives exactly the decisions without memory.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..settings import RETRIEVAL_KEY_SPACES as KEY_SPACES
from ..settings import RETRIEVAL_VALUE_KINDS as VALUE_KINDS

SIMILARITY_BUDGET = 1 << 25  # similarities held at once by a lookup (128 MiB in float32)
KEY_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class RetrievalConfig:
    """How a memory is searched and ensembled: k neighbours, softmax temperature over cosine
    similarities, the ensemble weight (>= 0), the key space and value kind it was built with, the
    dtype its keys are stored in, and where its entries came from (for the record)."""

    k: int = 32
    temperature: float = 0.1
    weight: float = 0.0
    keys: str = "cand_text"
    values: str = "gain"
    key_dtype: str = "float16"
    source: str = "train"

    def __post_init__(self):
        if self.k < 1:
            raise InputError(f"retrieval k must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise InputError(f"retrieval temperature must be positive, got {self.temperature}")
        if not self.weight >= 0:
            raise InputError(f"retrieval weight must be >= 0, got {self.weight}")
        for name, value, allowed in (("keys", self.keys, KEY_SPACES), ("values", self.values, VALUE_KINDS),
                                     ("key_dtype", self.key_dtype, tuple(KEY_DTYPES))):
            if value not in allowed:
                raise InputError(f"retrieval {name} must be one of {allowed}, got {value!r}")


def retrieval_keys(cand: Tensor, pooled: Tensor, space: str) -> Tensor:
    """Unit-norm keys [..., N, E] from cand [..., N, H] and pooled [..., H] (see the module docstring).

    A zero pooled vector (a re-ranker that reads no text) contributes zeros, so the key is then
    cand's direction scaled by 1/sqrt(2) (cosines are halved alike for every entry)."""
    unit = F.normalize(cand, dim=-1)
    if space == "cand":
        return unit
    if space == "cand_text":
        text = F.normalize(pooled, dim=-1)[..., None, :].expand_as(unit)
        return torch.cat([unit, text], dim=-1) / math.sqrt(2.0)
    raise InputError(f"retrieval keys must be one of {KEY_SPACES}, got {space!r}")


def memory_values(ious: Tensor, default_index: Tensor, kind: str) -> Tensor:
    """[P, N] values of candidates with IoUs [P, N] and Query-0 slots [P]: the gain over Query-0
    ("gain", 0 at Query-0) or the IoU itself ("iou")."""
    if kind == "gain":
        return ious - ious.gather(1, default_index[:, None])
    if kind == "iou":
        return ious
    raise InputError(f"retrieval values must be one of {VALUE_KINDS}, got {kind!r}")


class RetrievalMemory(nn.Module):
    """Keys [M, E] and values [M] as buffers (saved with the re-ranker), searched by `lookup`.

    keys are kept in the compute dtype they are given in (`CalibratedReranker` stores them as
    `config.key_dtype` in its file and computes in float32 on the CPU)."""

    def __init__(self, keys: Tensor, values: Tensor, config: RetrievalConfig):
        super().__init__()
        if keys.dim() != 2 or values.shape != keys.shape[:1]:
            raise InputError(f"memory keys must be [M, E] and values [M]; got {tuple(keys.shape)} and {tuple(values.shape)}")
        if keys.shape[0] < 1:
            raise InputError("a retrieval memory needs at least one entry")
        self.config = config
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)

    @property
    def size(self) -> int:
        """M, the number of entries."""
        return self.keys.shape[0]

    def lookup(self, query: Tensor) -> Tensor:
        """Retrieved estimate [B, N] for unit-norm query keys [B, N, E]: softmax(top-k cosine /
        temperature)-weighted mean of the k nearest entries' values (k capped at M)."""
        if query.shape[-1] != self.keys.shape[-1]:
            raise InputError(f"memory keys have width {self.keys.shape[-1]}, the query keys {query.shape[-1]}")
        keys = self.keys if self.keys.dtype == query.dtype else self.keys.to(query.dtype)
        values = self.values.to(query.dtype)
        rows = query.reshape(-1, query.shape[-1])  # [B * N, E]
        chunk = max(1, SIMILARITY_BUDGET // self.size)  # rows per matmul, bounding the [rows, M] similarities
        out = [self._search(part, keys, values) for part in rows.split(chunk)] if len(rows) else [rows.new_zeros(0)]
        return torch.cat(out).reshape(query.shape[:-1])

    def _search(self, rows: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """[R] estimates for unit-norm rows [R, E] (one matmul [R, E] x [E, M], top-k, softmax)."""
        top, index = (rows @ keys.t()).topk(min(self.config.k, self.size), dim=-1)  # [R, k]
        return ((top / self.config.temperature).softmax(dim=-1) * values[index]).sum(dim=-1)

    def settings(self) -> Dict[str, Any]:
        """The config plus the size, as saved in the re-ranker's JSON."""
        return {**dataclasses.asdict(self.config), "size": self.size, "key_width": int(self.keys.shape[1])}


def storage_state(memory: Optional[RetrievalMemory], prefix: str = "memory.") -> Dict[str, Tensor]:
    """The memory's buffers as they go into the file: keys in `config.key_dtype`, values float32."""
    if memory is None:
        return {}
    return {prefix + "keys": memory.keys.detach().to(KEY_DTYPES[memory.config.key_dtype]),
            prefix + "values": memory.values.detach().float()}


def subsample(count: int, size: Optional[int], seed: int) -> Tensor:
    """Sorted indices of `size` of `count` entries drawn without replacement (seeded), or all of them
    when `size` is None, 0 or at least `count`."""
    if not size or size >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].sort().values
