"""Pipeline: image + referring expression -> Result, wiring every stage.

    load_image -> prepare_images -> DeRIS (image features once per image) -> Candidates
    -> mask statistics + grid signatures -> Venice-H1 gate -> Result

Model files are found as DESIGN.md says: an explicit path first, then the folder named by
`$DERIS_RERANK_WEIGHTS`, then the repository's `weights/` folder.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .candidates import Candidates
from .checkpoints import load_deris
from .deris.config import PRESETS
from .deris.model import DerisModel
from .errors import CheckpointError, DerisRerankError, InputError
from .gate import VeniceGate, load_gate
from .preprocess import Beit3Tokenizer, deris_answer_mask, load_image, prepare_images, resize_mask_nearest
from .result import Result
from .timing import StageTimer

REPO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_MODEL = REPO_WEIGHTS / "deris-tiny"  # the embedded default: DeRIS-tiny + its gate, trained on RefShapes
TOKENIZER_NAMES = ("beit3.spm", "tokenizer.model")
GATE_NAMES = ("venice_h1.safetensors", "venice_h1.pt", "venice_h1.pth")
GATE_BESIDE_MODEL = "gate.safetensors"  # a gate stored in a DeRIS folder belongs to that model
LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_folders() -> List[Path]:
    """Where model files are looked up after explicit paths: $DERIS_RERANK_WEIGHTS, then weights/."""
    env = os.environ.get("DERIS_RERANK_WEIGHTS")
    return ([Path(env).expanduser()] if env else []) + [REPO_WEIGHTS]


def _find_in_weights(names: Sequence[str]) -> Optional[Path]:
    for folder in weight_folders():
        for name in names:
            if (folder / name).exists():
                return folder / name
    return None


def _resolve_deris(deris: Union[str, os.PathLike]) -> Path:
    """A path as given, or a preset name looked up as weights/<name>/ or weights/<NAME>.pth."""
    path = Path(deris).expanduser()
    if path.exists():
        return path
    if str(deris).lower() in PRESETS:
        name = str(deris).lower()
        upstream = name.replace("deris-l", "DERIS-L").replace("deris-b", "DERIS-B")
        found = _find_in_weights([name, f"{upstream}.pth", f"{name}.pth"])
        if found is not None:
            return found
        where = ", ".join(str(f) for f in weight_folders())
        raise CheckpointError(
            f"no weights for preset {name} in {where}: put the official {upstream}.pth there "
            f"(or convert it with `deris-rerank convert`), or pass its path"
        )
    raise CheckpointError(f"DeRIS checkpoint not found: {path} (pass a .pth, a converted folder or a preset name)")


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA device without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return device


def _resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> Optional[torch.dtype]:
    """None/float32 -> None (plain float32); bfloat16/float16 -> the autocast dtype (CUDA only)."""
    if dtype is None or dtype in ("float32", "fp32", torch.float32):
        return None
    resolved = LOW_PRECISION.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.bfloat16, torch.float16):
        raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device.type != "cuda":
        raise InputError(f"dtype {dtype} runs as CUDA autocast; on {device.type} use float32")
    return resolved


@dataclass
class _Image:
    """A decoded image and its two model inputs."""

    rgb: np.ndarray
    image_hi: torch.Tensor
    image_lo: torch.Tensor
    load_ms: float


class Pipeline:
    """Referring segmentation with DeRIS, re-ranked by the Venice-H1 gate.

    deris: an official `.pth`, a converted folder, or a preset name found in the weights
    folders; None: the embedded default (`weights/deris-tiny`, trained on RefShapes).
    tokenizer: BEiT-3's sentencepiece model (default: `beit3.spm` or `tokenizer.model` next to
    the DeRIS weights, or in the weights folders). gate: a Venice-H1 checkpoint; None looks for
    `gate.safetensors` beside the DeRIS weights, then `venice_h1.*` in the weights folders, and
    runs without a gate (DeRIS's own Query-0) when there is none; False never uses one. device: "auto" picks CUDA when available. dtype:
    None (float32) or bfloat16/float16 autocast on CUDA; the deformable sampling, softmaxes
    and signatures stay in float32. tau overrides the gate's threshold.
    """

    def __init__(
        self,
        deris: Union[None, str, os.PathLike] = None,
        gate: Union[None, bool, str, os.PathLike] = None,
        tokenizer: Union[None, str, os.PathLike] = None,
        device: Union[str, torch.device] = "auto",
        dtype: Union[None, str, torch.dtype] = None,
        tau: Optional[float] = None,
        batch_semantics: str = "per_sample",
        query_source: str = "perception",
    ):
        if deris is None:
            if not (DEFAULT_MODEL / "model.safetensors").is_file():
                raise CheckpointError(
                    f"the embedded default model is missing ({DEFAULT_MODEL}): pass deris=PATH (an official DeRIS "
                    ".pth or a folder from `deris-rerank convert`), tokenizer=PATH (beit3.spm) and gate=PATH"
                )
            deris = DEFAULT_MODEL
        self.device = resolve_device(device)
        self.autocast_dtype = _resolve_dtype(dtype, self.device)
        self.deris_path = deris_path = _resolve_deris(deris)
        self.model: DerisModel = load_deris(deris_path, device=self.device)
        self.config = self.model.config
        self.tokenizer = Beit3Tokenizer(self._resolve_tokenizer(tokenizer, deris_path))
        self.gate: Optional[VeniceGate] = self._load_gate(gate, tau, deris_path)
        self.batch_semantics = batch_semantics
        self.query_source = query_source

    def _resolve_tokenizer(self, tokenizer, deris_path: Path) -> Path:
        if tokenizer is not None:
            return Path(tokenizer).expanduser()
        folder = deris_path if deris_path.is_dir() else deris_path.parent
        for name in TOKENIZER_NAMES:
            if (folder / name).is_file():
                return folder / name
        found = _find_in_weights(TOKENIZER_NAMES)
        if found is None:
            raise CheckpointError(f"no tokenizer found: pass tokenizer=PATH to beit3.spm (looked next to {deris_path} and in the weights folders)")
        return found

    def _load_gate(self, gate, tau, deris_path: Path) -> Optional[VeniceGate]:
        if gate is False:
            return None
        beside = (deris_path if deris_path.is_dir() else deris_path.parent) / GATE_BESIDE_MODEL
        if gate not in (None, True):
            path = Path(gate).expanduser()
        else:
            path = beside if beside.is_file() else _find_in_weights(GATE_NAMES)
        if path is None:
            if gate is True:
                raise CheckpointError(f"no Venice-H1 gate found in {', '.join(map(str, weight_folders()))}")
            warnings.warn("no Venice-H1 gate found: results are DeRIS's own first choice (pass gate=PATH)", stacklevel=3)
            return None
        return load_gate(path, device=self.device, tau=tau, query_dim=self.config.hidden_dim)

    # --- public API --------------------------------------------------------------------
    def __call__(self, image: Any, text: Union[str, Sequence[str]]) -> Union[Result, List[Result]]:
        """One pair -> Result; one image and a list of texts -> list of Results (image work done once)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise InputError("text: expected a non-empty string or a list of them")
        results = self.batch([(image, t) for t in texts], batch_size=len(texts))
        return results[0] if isinstance(text, str) else results

    def batch(self, pairs: Iterable[Tuple[Any, str]], batch_size: int = 8) -> List[Result]:
        """Many (image, text) pairs -> Results in the same order; raises on the first bad pair."""
        results = {}
        for index, outcome in self.iter_batch(pairs, batch_size=batch_size):
            if isinstance(outcome, DerisRerankError):
                raise outcome
            results[index] = outcome
        return [results[index] for index in sorted(results)]

    def iter_batch(
        self, pairs: Iterable[Tuple[Any, str]], batch_size: int = 8, workers: int = 2
    ) -> Iterator[Tuple[int, Union[Result, DerisRerankError]]]:
        """Yield (pair index, Result or the error of that pair), grouped by image (so not in input order).

        Pairs that share an image (the same path, or the same object) are decoded and run
        through the text-independent part once; decoding of the next batch's images
        overlaps with the model's work on the current one (a thread pool). A bad image or
        text gives that pair's error and the rest go on.
        """
        pairs = list(pairs)
        for item in self.iter_candidates(pairs, batch_size, workers):
            if isinstance(item, CandidateBatch):
                yield from self._results(item, pairs)
            else:
                yield item

    def iter_candidates(
        self, pairs: Sequence[Tuple], batch_size: int = 8, workers: int = 2
    ) -> Iterator[Union["CandidateBatch", Tuple[int, DerisRerankError]]]:
        """DeRIS's raw candidates, batch by batch, for tools that need more than a Result (feature extraction).

        pairs: (image, text) or (image, text, group key); pairs with equal keys share one image
        decode and encode (default key: the resolved path, or the image object itself). An image
        may also be a zero-argument callable returning a uint8 [H, W, 3] RGB array (generated data).
        Yields a `CandidateBatch` per model run, and (pair index, error) for each bad pair.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        groups: Dict[Any, List[int]] = {}
        for index, pair in enumerate(pairs):
            groups.setdefault(pair[2] if len(pair) > 2 else _image_key(pair[0]), []).append(index)
        chunks = _chunk_groups(list(groups.values()), batch_size)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            loading = [pool.submit(self._load_images, pairs, chunks[0])] if chunks else []
            for k, chunk in enumerate(chunks):
                if k + 1 < len(chunks):
                    loading.append(pool.submit(self._load_images, pairs, chunks[k + 1]))
                images = loading[k].result()
                loading[k] = None
                yield from self._run_chunk(pairs, chunk, images)

    # --- stages ------------------------------------------------------------------------
    def _load_images(self, pairs, chunk: List[List[int]]) -> List[Union[_Image, DerisRerankError]]:
        """Decode and prepare one image per group (runs in a worker thread)."""
        loaded = []
        for group in chunk:
            timer = StageTimer()
            source = pairs[group[0]][0]
            try:
                with timer("load"):
                    rgb = load_image(source() if callable(source) else source)
                    image_hi, image_lo = prepare_images(rgb, self.config.image_size, self.config.image_size_lo)
                loaded.append(_Image(rgb, image_hi, image_lo, timer.ms["load"]))
            except DerisRerankError as exc:
                loaded.append(exc)
        return loaded

    def _run_chunk(self, pairs, chunk: List[List[int]], images):
        jobs = []  # (pair index, image position, tokens, padding)
        for position, (group, image) in enumerate(zip(chunk, images)):
            for index in group:
                if isinstance(image, DerisRerankError):
                    yield index, image
                    continue
                try:
                    tokens, padding = self.tokenizer.encode(_checked_text(pairs[index][1]), self.config.max_tokens)
                except DerisRerankError as exc:
                    yield index, exc
                    continue
                jobs.append((index, position, tokens, padding))
        if jobs:
            used = sorted({position for _, position, _, _ in jobs})
            yield self._infer([images[p] for p in used], [(i, used.index(p), t, m) for i, p, t, m in jobs])

    def _infer(self, images: List[_Image], jobs) -> "CandidateBatch":
        timer = StageTimer(self.device)
        precision = (
            torch.autocast(device_type="cuda", dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        rows = torch.tensor([position for _, position, _, _ in jobs], device=self.device)
        with torch.inference_mode(), precision:
            image_hi = torch.stack([im.image_hi for im in images]).to(self.device)
            features = self.model.encode_image(image_hi, timer)
            outputs = self.model(
                None,
                torch.stack([images[p].image_lo for _, p, _, _ in jobs]).to(self.device),
                torch.stack([t for _, _, t, _ in jobs]).to(self.device),
                torch.stack([m for _, _, _, m in jobs]).to(self.device),
                batch_semantics=self.batch_semantics,
                image_features=features.select(rows),
                timer=timer,
            )
        pairs_per_image = [sum(1 for _, p, _, _ in jobs if p == position) for position in range(len(images))]
        load_ms = [images[p].load_ms / pairs_per_image[p] for _, p, _, _ in jobs]
        return CandidateBatch(
            indices=[index for index, _, _, _ in jobs],
            images=[images[p].rgb for _, p, _, _ in jobs],
            candidates=Candidates.from_outputs(outputs, self.query_source),
            outputs=outputs,
            timer=timer,
            load_ms=load_ms,
        )

    def _results(self, batch: "CandidateBatch", pairs) -> List[Tuple[int, Result]]:
        """Gate decision and Results for one model run."""
        timer, candidates, outputs, count = batch.timer, batch.candidates, batch.outputs, len(batch.indices)
        with torch.inference_mode():
            with timer("signatures"):
                stats, grids = candidates.gate_features()
            with timer("gate"):
                if self.gate is not None:
                    inputs = (candidates.query_embed.float(), candidates.scores.float(), stats, grids)
                    text = {"text": candidates.text} if self.gate.reads_text else {}
                    decision = self.gate.decide(*inputs, **text)
                    selected, p_fail = decision.selected, decision.p_fail.tolist()
                    rerank = decision.rank.float().cpu()
                    calibrated = None if decision.calibrated is None else decision.calibrated.float().cpu()
                else:
                    selected, p_fail = candidates.default_index, [None] * count
                    rerank = calibrated = None
            with timer("postprocess"):
                binary = candidates.binary_masks(self.config.mask_threshold).cpu()
                answers = deris_answer_mask(outputs["mask_logits"], outputs["scores"], self.config.score_threshold).cpu()
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
                text=pairs[index][1],
                mask=resize_mask_nearest(binary[b, chosen], size).numpy(),
                selected=slot_order.index(chosen),
                switched=chosen != first,
                p_fail=p_fail[b],
                scores=scores[b, order[b]].tolist(),
                slots=slot_order,
                deris_mask=resize_mask_nearest(answers[b], size).numpy(),
                default_mask=resize_mask_nearest(binary[b, first], size).numpy(),
                existence=float(candidates.existence[b]),
                timings={"load": batch.load_ms[b], **shared},
                rerank_scores=None if rerank is None else rerank[b, order[b]].tolist(),
                calibrated_scores=None if calibrated is None else calibrated[b, order[b]].tolist(),
                image=batch.images[b],
                _candidate_masks=_LazyMasks(binary[b, order[b]], size),
            )
            results.append((index, result))
        return results


@dataclass
class CandidateBatch:
    """One model run: pairs `indices` (into the caller's list), their RGB images, DeRIS's raw
    `outputs` and `candidates` (on the pipeline's device), the stage timer of the run, and each
    pair's share of its image's decode time (ms)."""

    indices: List[int]
    images: List[np.ndarray]
    candidates: Candidates
    outputs: Dict[str, torch.Tensor]
    timer: StageTimer
    load_ms: List[float]


class _LazyMasks:
    """Resizes a pair's candidate masks to the image size when first asked for."""

    def __init__(self, masks_384: torch.Tensor, size: Tuple[int, int]):
        self.masks_384, self.size = masks_384, size

    def __call__(self) -> np.ndarray:
        return resize_mask_nearest(self.masks_384, self.size).numpy()


def _image_key(image: Any) -> Any:
    """Pairs with equal keys share an image: the resolved path, or the object itself."""
    return str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else id(image)


def _checked_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InputError(f"text: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError("text is empty: give a referring expression such as \"man on the left\"")
    return text


def _chunk_groups(groups: List[List[int]], batch_size: int) -> List[List[List[int]]]:
    """Pack image groups (lists of pair indices) into chunks of at most batch_size pairs; a group
    larger than batch_size is split, its parts each forming a chunk."""
    chunks, current, count = [], [], 0
    for group in groups:
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            if count + len(part) > batch_size and current:
                chunks.append(current)
                current, count = [], 0
            current.append(part)
            count += len(part)
    if current:
        chunks.append(current)
    return chunks
