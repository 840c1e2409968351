"""Result: the answer for one image-text pair, with what is needed to explain it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import OutputError
from .fileio import atomic_write
from .rle import encode_mask
from .visualize import candidate_grid, decision_overlay, save_png


ANSWERS = ("single", "set")


@dataclass
class Result:
    """One pair's answer. Masks are NumPy bool arrays at the original image size [H, W].

    Candidates are listed by descending referring score: `scores[k]` is the k-th best, and
    `slots[k]` its DeRIS query slot. The answer is `answer` "single" (one candidate: the
    referring-segmentation protocol) or "set" (any number of candidates: none when no object
    matches the expression, several for "all the red shapes"). `selected_ranks` are the ranks
    of the answer's candidates in that list (single: one rank) and `mask` their union (all
    False for the empty set); `selected_rank` is the single answer's rank (0 = Query-0,
    DeRIS's own first choice), for a set its best-scored member (None when empty).
    `switched` is True when the answer differs from DeRIS's own: another candidate than
    Query-0 (single), another set than DeRIS's own union answer (set). `p_fail` is the
    re-ranker's failure probability (None without one); `p_no_target` a set re-ranker's
    probability that nothing matches and `member_scores` (in the order of `scores`) its
    membership probabilities (None otherwise).
    `deris_mask` is DeRIS's own answer as its post-processing defines it (union of the
    candidates with score > threshold); `default_mask` is Query-0's own mask; `existence`
    DeRIS's own probability that a referent exists. `timings` are
    milliseconds per stage; stages shared by several pairs (decoding, image features, batched
    model runs) are split evenly. `rerank_scores` (in the order of `scores`) is what the
    re-ranker ranked by: a calibrated re-ranker's fused logits, a Venice-H1 gate's predicted
    gain over Query-0 (None without a gate); `calibrated_scores` the calibrated re-ranker's
    candidate-text logits alone; `retrieved_scores` its retrieved IoU-gain (or IoU) estimates
    from its retrieval memory (None without one). `unknown_words` are the expression's words outside the
    tokenizer's vocabulary, `truncated_to_tokens` the number of tokens kept when the text was too
    long (else None), `embedded_default` whether the RefShapes-only default model answered;
    `notes` says all of these (and an empty mask) in words.
    """

    text: str
    mask: np.ndarray
    selected_rank: Optional[int]
    switched: bool
    p_fail: Optional[float]
    scores: List[float]
    slots: List[int]
    deris_mask: np.ndarray
    default_mask: np.ndarray
    existence: float
    timings: Dict[str, float]
    unknown_words: List[str] = field(default_factory=list)
    truncated_to_tokens: Optional[int] = None
    embedded_default: bool = False
    rerank_scores: Optional[List[float]] = None
    calibrated_scores: Optional[List[float]] = None
    retrieved_scores: Optional[List[float]] = None
    answer: str = "single"
    selected_ranks: Optional[List[int]] = None
    p_no_target: Optional[float] = None
    member_scores: Optional[List[float]] = None
    image: Optional[np.ndarray] = field(default=None, repr=False)
    _candidate_masks: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {self.answer!r}")
        if self.selected_ranks is None:
            self.selected_ranks = [] if self.selected_rank is None else [self.selected_rank]

    @property
    def object_count(self) -> int:
        """How many candidates the answer holds (0: "no object matches"; a single answer: 1)."""
        return len(self.selected_ranks)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W) of the original image."""
        return tuple(self.mask.shape)

    @property
    def mask_empty(self) -> bool:
        """True when the chosen mask has no pixel: the model found nothing for the expression."""
        return not self.mask.any()

    @property
    def notes(self) -> List[str]:
        """The answer and its caveats in words: no object, several objects, an empty mask,
        unknown words, truncation, the embedded default (empty when there is nothing to say)."""
        from .tokenizer import shorten_text

        notes = []
        if self.answer == "set" and self.object_count == 0:
            notes.append(f"no object matches {shorten_text(self.text)}")
        elif self.mask_empty:
            notes.append("the chosen mask is empty: the model found nothing for this expression")
        if self.answer == "set" and self.object_count > 1:
            notes.append(f"{self.object_count} objects match {shorten_text(self.text)}")
        if self.unknown_words:
            notes.append("words unknown to the model (read as one unknown token): " + ", ".join(self.unknown_words))
        if self.truncated_to_tokens is not None:
            notes.append(f"the expression was truncated to its first {self.truncated_to_tokens} tokens")
        if self.embedded_default:
            notes.append("answered by the embedded default model, which only knows synthetic RefShapes scenes")
        return notes

    @property
    def default_index(self) -> int:
        """DeRIS query slot of Query-0 (its top-scored candidate)."""
        return self.slots[0]

    @property
    def selected_slot(self) -> Optional[int]:
        """DeRIS query slot of `selected_rank` (None when the answer is empty)."""
        return None if self.selected_rank is None else self.slots[self.selected_rank]

    @property
    def candidates(self) -> np.ndarray:
        """bool [N, H, W]: every candidate's mask at the original size, by descending score (computed on first use)."""
        if self._candidate_masks is None:
            raise OutputError("this result was made without candidate masks")
        if callable(self._candidate_masks):
            self._candidate_masks = self._candidate_masks()
        return self._candidate_masks

    def to_json(self) -> Dict[str, Any]:
        """A JSON-able dict: decision, scores, timings and the mask as COCO RLE."""
        return {
            "text": self.text,
            "image_size": list(self.image_size),
            "answer": self.answer,
            "selected": self.selected_rank,  # the rank by score (0 = Query-0), as `selected_rank`; null: no object
            "selected_slot": self.selected_slot,
            "selected_set": self.selected_ranks,
            "objects": self.object_count,
            "default_index": self.default_index,
            "switched": self.switched,
            "p_fail": self.p_fail,
            "p_no_target": self.p_no_target,
            "scores": self.scores,
            "member_scores": self.member_scores,
            "rerank_scores": self.rerank_scores,
            "calibrated_scores": self.calibrated_scores,
            "retrieved_scores": self.retrieved_scores,
            "slots": self.slots,
            "existence": self.existence,
            "mask_area": int(self.mask.sum()),
            "mask_empty": self.mask_empty,
            "unknown_words": self.unknown_words,
            "truncated_to_tokens": self.truncated_to_tokens,
            "embedded_default": self.embedded_default,
            "notes": self.notes,
            "mask": encode_mask(self.mask),
            "deris_mask": encode_mask(self.deris_mask),
            "timings_ms": self.timings,
        }

    def save(self, folder: str | Path, name: str = "result", candidates: bool = False) -> Dict[str, Path]:
        """Write `<name>_mask.png` (0/255), `<name>.json`, and with the image `<name>_overlay.png`
        (the answer's mask in a contrasting colour; DeRIS's own answer outlined when it differs;
        a legend) and, with
        candidates=True, `<name>_candidates.png`. Returns the written paths by kind."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}; choose a writable folder") from None
        written = {"mask": folder / f"{name}_mask.png", "json": folder / f"{name}.json"}
        save_png(written["mask"], self.mask)
        if self.image is not None:
            deris_answer = self.deris_mask if self.answer == "set" else self.default_mask
            outline = deris_answer if self.switched and deris_answer.any() else None
            written["overlay"] = folder / f"{name}_overlay.png"
            save_png(written["overlay"], decision_overlay(self.image, self.mask, outline))
            if candidates:
                written["candidates"] = folder / f"{name}_candidates.png"
                grid = candidate_grid(self.image, self.candidates, self.scores, self.selected_ranks, 0)
                save_png(written["candidates"], grid)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        try:
            atomic_write(written["json"], lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:
            raise OutputError(f"cannot write {written['json']}: {exc.strerror or exc}") from None
        return written
