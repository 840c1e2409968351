"""From one model run's candidates to its answers: the re-ranker's decision and each pair's Result.

    Candidates -> mask statistics + grid signatures -> re-ranker (or DeRIS's own answer)
    -> the chosen candidates -> Result per pair (their union mask at the image's size)

Two kinds of answer (`ANSWERS`):
  "single"  one candidate: the re-ranker's keep-or-switch choice, or Query-0 without one
  "set"     any number of candidates: a set re-ranker's set (`CalibratedReranker` with
            `config.sets`), or without a re-ranker DeRIS's own union answer (the candidates
            scoring above its threshold); empty means "no object matches"
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .candidates import CandidateBatch
from .deris.config import DerisConfig
from .errors import InputError
from .rerank.calibrated import CalibratedReranker
from .rerank.venice import VeniceGate
from .result import ANSWERS, Result
from .transforms import resize_mask_nearest

Reranker = Union[VeniceGate, CalibratedReranker]


def is_set_reranker(gate: Optional[Reranker]) -> bool:
    """Whether `gate` chooses sets of candidates (a calibrated re-ranker trained with --sets)."""
    return isinstance(gate, CalibratedReranker) and gate.config.sets


def resolve_answer(answer: Optional[str], gate: Optional[Reranker], config: DerisConfig) -> str:
    """The kind of answer a pipeline gives: `answer` when given, else "set" for a set re-ranker or a
    GRES-trained DeRIS (config.task "gres") and "single" otherwise. InputError for an unknown kind
    or a set asked of a single-candidate re-ranker."""
    if answer is None:
        return "set" if is_set_reranker(gate) or (gate is None and config.task == "gres") else "single"
    if answer not in ANSWERS:
        raise InputError(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
    if answer == "set" and gate is not None and not is_set_reranker(gate):
        raise InputError("answer='set' needs a set re-ranker (train-gate --arch calibrated --sets) or none (DeRIS's own "
                         "union answer: gate=False / --no-gate); this re-ranker chooses one candidate")
    return answer


def assemble_results(
    batch: CandidateBatch, texts: Sequence[str], gate: Optional[Reranker], config: DerisConfig,
    embedded_default: bool = False, answer: str = "single",
) -> List[Tuple[int, Result]]:
    """(pair index, Result) for each pair of `batch`, `texts` its expressions in batch order.

    gate: the re-ranker deciding each answer (None: DeRIS's own); config: the DeRIS model's (its
    mask and score thresholds); answer: "single" or "set" (see the module docstring; a set from
    a re-ranker needs a set re-ranker); embedded_default: whether the embedded default model
    answered (said in each Result's notes). The batch's stage times are shared evenly.
    """
    timer, candidates, count = batch.timer, batch.candidates, len(batch.indices)
    p_fail: List[Optional[float]] = [None] * count
    p_none = member = rerank = calibrated = retrieved = None
    with torch.inference_mode():
        with timer("signatures"):
            stats, grids = candidates.gate_features()
        with timer("gate"):
            deris_set = candidates.scores > config.score_threshold
            if gate is not None:
                inputs = (candidates.query_embed.float(), candidates.scores.float(), stats, grids)
                extra = {"text": candidates.text, "existence": candidates.existence} if gate.reads_text else {}
                decision = gate.decide(*inputs, **extra)
                selected, p_fail = decision.selected, decision.p_fail.tolist()
                rerank = decision.rank.float().cpu()
                calibrated = None if decision.calibrated is None else decision.calibrated.float().cpu()
                retrieved = None if decision.retrieved is None else decision.retrieved.float().cpu()
                if decision.chosen is not None:
                    p_none, member = decision.p_none.float().cpu(), decision.member.float().cpu()
            else:
                selected = candidates.default_index
            slots = torch.arange(candidates.scores.shape[1], device=selected.device)
            if answer == "single":
                chosen = slots[None, :] == selected[:, None]
            else:
                chosen = deris_set if gate is None else decision.chosen
        with timer("postprocess"):
            binary = candidates.binary_masks(config.mask_threshold).cpu()
            answers = candidates.answer_mask(config.score_threshold).cpu()
            order = candidates.order.cpu()
            scores = candidates.scores.float().cpu()
            chosen, deris_set = chosen.cpu(), deris_set.cpu()
            default = candidates.default_index.cpu()
            union = (binary & chosen[:, :, None, None]).any(dim=1)
    shared = {stage: ms / count for stage, ms in timer.ms.items()}
    results = []
    for b, index in enumerate(batch.indices):
        size = tuple(batch.images[b].shape[:2])
        slot_order = order[b].tolist()
        ranks = sorted(slot_order.index(slot) for slot in torch.nonzero(chosen[b]).flatten().tolist())
        first = int(default[b])
        if answer == "single":
            switched = ranks != [0]
        else:
            switched = not torch.equal(chosen[b], deris_set[b])
        result = Result(
            text=texts[b],
            mask=resize_mask_nearest(union[b], size).numpy(),
            selected_rank=ranks[0] if ranks else None,
            switched=switched,
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
            answer=answer,
            selected_ranks=ranks,
            p_no_target=None if p_none is None else float(p_none[b]),
            member_scores=None if member is None else member[b, order[b]].tolist(),
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
