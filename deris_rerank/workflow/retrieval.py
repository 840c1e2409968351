"""Building a calibrated re-ranker's retrieval memory and choosing its ensemble weight.

`build_memory` runs a trained re-ranker over a cache's P pairs, keys each of the P x N
candidates in the re-ranker's own space (`rerank.retrieval.retrieval_keys`), values them by
their IoU gain over Query-0 (or their IoU), and keeps `memory_size` of them (seeded draw).

`choose_retrieval` picks the ensemble weight w_ret from RETRIEVAL_WEIGHTS (0 included: no
retrieval) together with the operating points, on the tuning caches only:
- memory_source "train": the memory holds training candidates; for each w_ret the operating
  points are chosen on the tuning split as without retrieval, and the w_ret whose tuned point
  gains most there wins (ties: the smaller w_ret);
- memory_source "tune": the memory holds tuning candidates, so choosing on the tuning split
  itself would read each pair's own outcome; instead the tuning pairs are split in two seeded
  halves, each half is scored with a memory of the other, and w_ret and the points are chosen
  on these out-of-fold scores. The shipped memory then holds (up to memory_size of) all tuning
  candidates.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from ..errors import InputError
from ..settings import MEMORY_SOURCES, CalibratedSettings
from ..rerank.calibrated import CalibratedReranker
from ..rerank.decision import DecisionRule
from ..rerank.gate_data import GateData
from ..rerank.retrieval import RetrievalConfig, RetrievalMemory, memory_values, retrieval_keys, subsample
from .train_calibrated import choose_points_from_outputs

RETRIEVAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
BATCH = 1024  # pairs per forward pass when scoring a cache


def retrieval_config(settings: CalibratedSettings, weight: float = 0.0) -> RetrievalConfig:
    """The memory's config from the recipe's retrieval fields (k = settings.retrieval)."""
    if settings.memory_source not in MEMORY_SOURCES:
        raise InputError(f"memory source must be one of {MEMORY_SOURCES}, got {settings.memory_source!r}")
    return RetrievalConfig(k=settings.retrieval, temperature=settings.retrieval_temperature, weight=weight,
                           keys=settings.retrieval_keys, values=settings.retrieval_values,
                           key_dtype=settings.memory_dtype, source=settings.memory_source)


def _rows(data: GateData, rows: slice, device):
    inputs = [x[rows].to(device) for x in (data.query_feat, data.scores, data.mask_stats, data.grid)]
    return (*inputs, data.require_text().select(rows).to(device))


@torch.no_grad()
def candidate_keys(reranker: CalibratedReranker, data: GateData, space: str) -> torch.Tensor:
    """[P, N, E] unit-norm keys of every candidate of `data` in the re-ranker's space (on CPU, float32)."""
    reranker.eval()
    device = next(reranker.parameters()).device
    keys = []
    for start in range(0, len(data), BATCH):
        cand, pooled = reranker.encode(*_rows(data, slice(start, start + BATCH), device))
        keys.append(retrieval_keys(cand, pooled, space).float().cpu())
    return torch.cat(keys)


def build_memory(reranker: CalibratedReranker, data: GateData, config: RetrievalConfig, size: Optional[int], seed: int) -> RetrievalMemory:
    """A memory of `size` (all when None or 0) of the P x N candidates of `data`, drawn with `seed`."""
    keys = candidate_keys(reranker, data, config.keys).flatten(0, 1)  # [P * N, E]
    values = memory_values(data.ious, data.default_index, config.values).flatten()  # [P * N]
    keep = subsample(len(values), size, seed)
    return RetrievalMemory(keys[keep].contiguous(), values[keep].contiguous(), config)


@torch.no_grad()
def retrieval_outputs(reranker: CalibratedReranker, data: GateData, memory: RetrievalMemory):
    """(default_index [P], p_fail_logit [P], fused [P, N] without retrieval, retrieved [P, N]) of
    the re-ranker with `memory` over `data` (on CPU); the re-ranker's own memory is left as it was."""
    own = reranker.memory
    reranker.attach_memory(RetrievalMemory(memory.keys, memory.values, dataclasses.replace(memory.config, weight=0.0)))
    reranker.eval()
    device = next(reranker.parameters()).device
    parts = []
    try:
        for start in range(0, len(data), BATCH):
            out = reranker.outputs(*_rows(data, slice(start, start + BATCH), device))
            parts.append([t.float().cpu() if t.is_floating_point() else t.cpu() for t in (out.default_index, out.p_fail_logit, out.fused, out.retrieved)])
    finally:
        reranker.memory = own
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def _halves(count: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[: count // 2].sort().values, order[count // 2 :].sort().values


def choose_retrieval(
    reranker: CalibratedReranker, tune: GateData, settings: CalibratedSettings, train: Optional[GateData] = None
) -> Tuple[RetrievalMemory, DecisionRule, Dict[str, DecisionRule], Dict[str, object]]:
    """(memory with the chosen weight, tuned rule, operating points, report) for `reranker`; see the
    module docstring. `train` is needed when settings.memory_source is "train"."""
    config = retrieval_config(settings)
    if settings.memory_source == "train":
        if train is None:
            raise InputError("a memory of training candidates needs the training caches (--train)")
        memory = build_memory(reranker, train, config, settings.memory_size, settings.seed)
        scored = retrieval_outputs(reranker, tune, memory)
    else:
        halves = _halves(len(tune), settings.seed)
        scored_parts = []
        for own, other in (halves, halves[::-1]):
            fold_memory = build_memory(reranker, tune.select(other), config, settings.memory_size, settings.seed)
            scored_parts.append(retrieval_outputs(reranker, tune.select(own), fold_memory))
        order = torch.cat(halves).argsort()  # back to the tuning split's pair order
        scored = tuple(torch.cat([p[i] for p in scored_parts])[order] for i in range(4))
        memory = build_memory(reranker, tune, config, settings.memory_size, settings.seed)
    default_index, p_fail_logit, fused, retrieved = scored
    best = None
    sweep = {}
    for weight in RETRIEVAL_WEIGHTS:
        rule, points, report = choose_points_from_outputs((default_index, p_fail_logit, fused + weight * retrieved), tune, settings)
        delta = report.get("tuned_tune_delta_full", float("-inf"))
        sweep[str(weight)] = {k: v for k, v in report.items() if k != "tune_pairs"}
        if best is None or delta > best[0] + 1e-9:
            best = (delta, weight, rule, points, report)
    _, weight, rule, points, report = best
    chosen = RetrievalMemory(memory.keys, memory.values, dataclasses.replace(config, weight=weight))
    report = {**report, "retrieval_weight": weight, "memory_size": chosen.size, "memory_source": settings.memory_source,
              "retrieval_sweep": sweep}
    return chosen, rule, points, report
