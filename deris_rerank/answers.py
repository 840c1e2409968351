"""From one model run's candidates to its answers: the re-ranker's decision and each pair's Result.

    Candidates -> mask statistics + grid signatures -> re-ranker (or DeRIS's own Query-0)
    -> binary masks, DeRIS's own answer mask -> Result per pair (masks at the image's size)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .candidates import CandidateBatch
from .deris.config import DerisConfig
from .rerank.calibrated import CalibratedReranker
from .rerank.venice import VeniceGate
from .result import Result
from .transforms import resize_mask_nearest

Reranker = Union[VeniceGate, CalibratedReranker]


def assemble_results(
    batch: CandidateBatch, texts: Sequence[str], gate: Optional[Reranker], config: DerisConfig, embedded_default: bool = False
) -> List[Tuple[int, Result]]:
    """(pair index, Result) for each pair of `batch`, `texts` its expressions in batch order.

    gate: the re-ranker deciding each answer (None: DeRIS's own Query-0); config: the DeRIS
    model's (its mask and score thresholds); embedded_default: whether the embedded default
    model answered (said in each Result's notes). The batch's stage times are shared evenly.
    """
    timer, candidates, count = batch.timer, batch.candidates, len(batch.indices)
    with torch.inference_mode():
        with timer("signatures"):
            stats, grids = candidates.gate_features()
        with timer("gate"):
            if gate is not None:
                inputs = (candidates.query_embed.float(), candidates.scores.float(), stats, grids)
                text = {"text": candidates.text} if gate.reads_text else {}
                decision = gate.decide(*inputs, **text)
                selected, p_fail = decision.selected, decision.p_fail.tolist()
                rerank = decision.rank.float().cpu()
                calibrated = None if decision.calibrated is None else decision.calibrated.float().cpu()
                retrieved = None if decision.retrieved is None else decision.retrieved.float().cpu()
            else:
                selected, p_fail = candidates.default_index, [None] * count
                rerank = calibrated = retrieved = None
        with timer("postprocess"):
            binary = candidates.binary_masks(config.mask_threshold).cpu()
            answers = candidates.answer_mask(config.score_threshold).cpu()
            order = candidates.order.cpu()
            scores = candidates.scores.float().cpu()
            selected, default = selected.cpu(), candidates.default_index.cpu()
    shared = {stage: ms / count for stage, ms in timer.ms.items()}
    results = []
    for b, index in enumerate(batch.indices):
        size = tuple(batch.images[b].shape[:2])
        slot_order = order[b].tolist()
        chosen, first = int(selected[b]), int(default[b])
        result = Result(
            text=texts[b],
            mask=resize_mask_nearest(binary[b, chosen], size).numpy(),
            selected_rank=slot_order.index(chosen),
            switched=chosen != first,
            p_fail=p_fail[b],
            scores=scores[b, order[b]].tolist(),
            slots=slot_order,
            deris_mask=resize_mask_nearest(answers[b], size).numpy(),
            default_mask=resize_mask_nearest(binary[b, first], size).numpy(),
            existence=float(candidates.existence[b]),
            timings={"load": batch.load_ms[b], **shared},
            unknown_words=list(batch.text_notes[b].unknown_words),
            truncated_to_tokens=batch.text_notes[b].kept_tokens if batch.text_notes[b].truncated else None,
            embedded_default=embedded_default,
            rerank_scores=None if rerank is None else rerank[b, order[b]].tolist(),
            calibrated_scores=None if calibrated is None else calibrated[b, order[b]].tolist(),
            retrieved_scores=None if retrieved is None else retrieved[b, order[b]].tolist(),
            image=batch.images[b],
            _candidate_masks=_LazyMasks(binary[b, order[b]], size),
        )
        results.append((index, result))
    return results


class _LazyMasks:
    """Resizes a pair's candidate masks to the image size when first asked for."""

    def __init__(self, masks_384: torch.Tensor, size: Tuple[int, int]):
        self.masks_384, self.size = masks_384, size

    def __call__(self) -> np.ndarray:
        return resize_mask_nearest(self.masks_384, self.size).numpy()
