"""Pipeline: image + referring expression -> Result, wiring every stage.

    load_image -> prepare_images -> DeRIS (image features once per image) -> Candidates
    -> re-ranker -> Result (`answers.assemble_results`)

Model files are found by `model_files`: an explicit path (or hf:// path) first, then the folder
named by `$DERIS_RERANK_WEIGHTS`, then the repository's `weights/` folder.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .answers import Reranker, assemble_results, is_set_reranker, resolve_answer
from .candidates import QUERY_SOURCES, CandidateBatch, Candidates
from .checkpoints import load_deris
from .deris.loopback import BATCH_SEMANTICS
from .deris.model import DerisModel, ImageFeatures
from .errors import DerisRerankError, EmbeddedDefaultWarning, InputError, UnknownWordsWarning
from .rerank.calibrated import CalibratedReranker
from .rerank.decision import check_tau, named_rule
from .rerank.venice import VeniceGate
from .rerank.files import load_gate
from .images import load_image
from .devices import autocast_dtype_of, convert_for_precision, precision, resolve_device, resolve_precision
from .onnx_export import is_onnx_export
from .precision_choice import choose_precision
from .model_files import DEFAULT_MODEL, default_model, resolve_deris, resolve_gate, resolve_tokenizer
from .tokenizer import Beit3Tokenizer, TextNotes, shorten_text
from .transforms import prepare_images
from .result import Result
from .timing import StageTimer

EMBEDDED_DEFAULT_NOTICE = (
    "using the embedded default model (DeRIS-tiny), which only knows synthetic RefShapes scenes "
    "(coloured shapes such as \"the biggest cross\"); on photographs its masks mean nothing. For real images "
    "pass the official weights: --deris/--tokenizer/--gate (Python: deris=, tokenizer=, gate=); see README"
)


RERANKERS = (VeniceGate, CalibratedReranker)


def check_settings(tau: Optional[float] = None, batch_semantics: str = "per_sample", query_source: str = "perception") -> None:
    """Raise InputError for an out-of-range tau or an unknown batch semantics / query source."""
    check_tau(tau)
    if batch_semantics not in BATCH_SEMANTICS:
        raise InputError(f"batch_semantics must be one of {', '.join(BATCH_SEMANTICS)}, got {batch_semantics!r}")
    if query_source not in QUERY_SOURCES:
        raise InputError(f"query_source must be one of {', '.join(QUERY_SOURCES)}, got {query_source!r}")


_embedded_default_announced = False


def warn_embedded_default() -> None:
    """Say once per process what the embedded default model knows (an EmbeddedDefaultWarning)."""
    global _embedded_default_announced
    if not _embedded_default_announced:
        _embedded_default_announced = True
        warnings.warn(EmbeddedDefaultWarning(EMBEDDED_DEFAULT_NOTICE), stacklevel=3)


@dataclass
class DecodedImage:
    """A decoded image and its two model inputs (`decode_image`), or its image features when already encoded.

    rgb: uint8 [H, W, 3]; image_hi float32 [3, S, S] (perception input, S = config.image_size) or
    None when `features` are given; image_lo float32 [3, s, s] (BEiT-3's input); load_ms: decode
    and preprocessing time (ms). Passed to the pipeline in place of an image source, it is used
    as is (no second decode): how the Ray engine hands over images decoded by other workers.
    """

    rgb: np.ndarray
    image_hi: Optional[torch.Tensor]
    image_lo: torch.Tensor
    load_ms: float
    features: Optional[ImageFeatures] = None


_Image = DecodedImage


def decode_image(source: Any, image_size: int, image_size_lo: int) -> DecodedImage:
    """Decode one image source (a path, array, ...; or call a zero-argument source) and prepare both
    model inputs at `image_size` (perception) and `image_size_lo` (BEiT-3) pixels. Needs no model.
    Raises a DerisRerankError (InputError) for an image that cannot be read."""
    timer = StageTimer()
    with timer("load"):
        rgb = load_image(source() if callable(source) else source)
        image_hi, image_lo = prepare_images(rgb, image_size, image_size_lo)
    return DecodedImage(rgb, image_hi, image_lo, timer.ms["load"])


def plan_chunks(pairs: Sequence[Tuple], batch_size: int) -> List[List[List[int]]]:
    """The model runs `iter_candidates` makes of `pairs`: chunks of image groups (lists of pair indices).

    Pairs are grouped by their third element when given, else by `_image_key` of the image, in
    order of first appearance, and the groups packed into chunks of at most `batch_size` pairs.
    Any engine that runs each chunk as one call forms the same batches as the local engine.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    groups: Dict[Any, List[int]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(pair[2] if len(pair) > 2 else _image_key(pair[0]), []).append(index)
    return _chunk_groups(list(groups.values()), batch_size)


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """An image with its text-independent DeRIS work done (`Pipeline.encode`): pass it to the
    pipeline in place of the image, with any number of expressions, and Swin and the pixel
    decoder do not run again. Results equal those for the image itself.

    rgb: uint8 [H, W, 3] the decoded image; image_lo float32 [3, s, s] BEiT-3's input (CPU);
    features: Swin + pixel-decoder features of batch size 1 on the pipeline's device;
    timings: ms spent decoding ("load") and encoding ("swin", "pixel_decoder").
    """

    rgb: np.ndarray = field(repr=False)
    image_lo: torch.Tensor = field(repr=False)
    features: ImageFeatures = field(repr=False)
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> Tuple[int, int]:
        """(H, W) of the original image."""
        return tuple(self.rgb.shape[:2])


class Pipeline:
    """Referring segmentation with DeRIS, re-ranked by the Venice-H1 gate.

    Each of the three parts is a built object or a file:
    deris: a `DerisModel` (e.g. fresh from training), an official `.pth`, a converted folder,
    or a preset name found in the weights folders; None: the embedded default
    (`deris_rerank/embedded/deris-tiny`, trained on RefShapes).
    tokenizer: a `Beit3Tokenizer`, or BEiT-3's sentencepiece model (default: `beit3.spm` or
    `tokenizer.model` next to the DeRIS weights, or in the weights folders).
    gate: a re-ranker (`VeniceGate` or `CalibratedReranker`), or its file (a Venice-H1
    checkpoint, or our `.safetensors` + `.json`); None looks for `gate.safetensors` beside
    the DeRIS weights, then `venice_h1.*` in the weights folders, and runs without a gate
    (DeRIS's own Query-0) when there is none; False never uses one. Any of the files may be a
    Hugging Face Hub path, `hf://OWNER/REPO[@REVISION]/PATH` (a file or folder of a model
    repository, fetched into huggingface_hub's cache; needs the `hub` extra). (`model_files` says
    where files are looked for; `Pipeline.from_files` takes paths only.)
    device: "auto" picks CUDA when available; built objects are moved there. dtype: None
    (float32, the default: the numbers the parity tests hold to upstream's), autocast in bfloat16
    (CPU or CUDA) or float16 (CUDA), "int8" (dynamic int8 linear layers, CPU; see `int8`), or
    "auto" (the fastest of these on this machine, measured once: see `precision_choice`; the mode
    chosen is `pipe.precision`). The deformable sampling, softmaxes and signatures stay in
    float32. DeRIS weights loaded from files are then stored in that dtype where autocast would
    round them on each call (`devices.store_for_autocast`: same results, less time and memory); a
    built `DerisModel` is used as given under autocast, and quantised on a copy for int8.
    runtime: "torch" (default) or "onnxruntime": DeRIS from a folder written by `deris-rerank
    export-onnx` (`deris`; float32, per-sample batch semantics; needs the `onnx` extra), run by
    onnxruntime (`onnx_runtime.OnnxDeris`); the re-ranker stays in torch.
    operating_point: one of the re-ranker's stored operating points instead of its own rule
    (the calibrated re-ranker stores "tuned", its rule, and "conservative": fewer switches, at
    most ~1 % harmful on its tuning split); tau then overrides the threshold.
    answer: "single" (one candidate) or "set" (none, one or several: "no object matches",
    "all the red shapes"; from a set re-ranker, or DeRIS's own union answer without a
    re-ranker); None: "set" for a set re-ranker or a GRES-trained DeRIS without one, else
    "single" (see `answers`).
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
        operating_point: Optional[str] = None,
        answer: Optional[str] = None,
        runtime: str = "torch",
    ):
        check_settings(tau=tau, batch_semantics=batch_semantics, query_source=query_source)
        self.device = resolve_device(device)
        self.precision = resolve_precision(dtype, self.device)
        self.precision_times: Dict[str, float] = {}
        self.batch_semantics = batch_semantics
        self.query_source = query_source
        self.runtime = check_runtime(runtime, deris, self.precision, batch_semantics)
        if runtime == "onnxruntime":
            self.deris_path = resolve_deris(deris)
            if not is_onnx_export(self.deris_path):
                raise InputError(f"runtime onnxruntime runs a folder written by `deris-rerank export-onnx`; {self.deris_path} "
                                 "is not one (export it: deris-rerank export-onnx MODEL OUT)")
            from .onnx_runtime import OnnxDeris  # onnxruntime loads only when asked for

            self.model = OnnxDeris(self.deris_path, self.device)
        elif isinstance(deris, DerisModel):
            self.deris_path: Optional[Path] = None
            self.model = deris.to(self.device).eval()
        else:
            self.deris_path = resolve_deris(default_model() if deris is None else deris)
            if is_onnx_export(self.deris_path):
                raise InputError(f"{self.deris_path} is an ONNX export: run it with runtime=\"onnxruntime\" (--runtime onnxruntime)")
            self.model = load_deris(self.deris_path, device=self.device, autocast_dtype=autocast_dtype_of(self.precision))
        if self.precision == "auto":  # measured on the float32 model, then converted as an explicit choice is
            self.precision, self.precision_times = choose_precision(self.model, self.device)
            if self.deris_path is not None and self.precision != "int8":
                convert_for_precision(self.model, self.precision)
        if self.precision == "int8":  # a built model is quantised on a copy: the caller's stays as it was
            self.model = convert_for_precision(self.model if self.deris_path else copy.deepcopy(self.model), "int8")
        self.autocast_dtype = autocast_dtype_of(self.precision)
        self.config = self.model.config
        if isinstance(tokenizer, Beit3Tokenizer):
            self.tokenizer_path, self.tokenizer = tokenizer.path, tokenizer
        else:
            self.tokenizer_path = resolve_tokenizer(tokenizer, self.deris_path)
            self.tokenizer = Beit3Tokenizer(self.tokenizer_path)
        if isinstance(gate, RERANKERS):
            self.gate_path: Optional[Path] = None
            self.gate: Optional[Reranker] = gate.to(self.device).eval()
            if operating_point is not None:
                self.gate.rule = named_rule(self.gate.operating_points, operating_point, f"the given {type(gate).__name__}")
                if is_set_reranker(self.gate):
                    self.gate.set_rule = self.gate.set_operating_points.get(operating_point, self.gate.set_rule)
            if tau is not None:
                self.gate.rule = dataclasses.replace(self.gate.rule, tau=float(tau))
        else:
            self.gate_path = resolve_gate(gate, self.deris_path)
            self.gate = None if self.gate_path is None else load_gate(
                self.gate_path, device=self.device, tau=tau, query_dim=self.config.hidden_dim, operating_point=operating_point
            )
        self.answer = resolve_answer(answer, self.gate, self.config)
        if operating_point is not None and self.gate is None:
            raise InputError(f"operating point {operating_point!r} asks for a re-ranker, but this pipeline runs without one; "
                             "pass gate=... (--gate) or leave the operating point out")
        self.is_embedded_default = self.deris_path is not None and self.deris_path.resolve() == DEFAULT_MODEL.resolve()
        if self.is_embedded_default:
            warn_embedded_default()

    @classmethod
    def from_files(
        cls,
        deris: Union[None, str, os.PathLike] = None,
        tokenizer: Union[None, str, os.PathLike] = None,
        gate: Union[None, bool, str, os.PathLike] = None,
        **settings: Any,
    ) -> "Pipeline":
        """A pipeline from model files (paths or a preset name, found as `model_files` says; None:
        the embedded default). `settings`: device, dtype, tau, operating_point, batch_semantics, query_source."""
        for name, value in (("deris", deris), ("tokenizer", tokenizer), ("gate", gate)):
            if isinstance(value, (DerisModel, Beit3Tokenizer, *RERANKERS)):
                raise InputError(f"Pipeline.from_files: {name} must be a path, got a built {type(value).__name__}; use Pipeline(...)")
        return cls(deris=deris, gate=gate, tokenizer=tokenizer, **settings)

    # --- public API --------------------------------------------------------------------
    def encode(self, image: Any) -> EncodedImage:
        """Decode `image` and run the text-independent part of DeRIS (Swin + pixel decoder) once.

        Pass the returned `EncodedImage` instead of the image to `pipe(...)`, `batch` or
        `iter_batch`, with one expression at a time or many: the results equal those for the
        image itself, without repeating about half of a pair's work (for DeRIS-L on a CPU).
        Raises InputError for an image that cannot be read.
        """
        if isinstance(image, EncodedImage):
            return image
        decoded = self._decode(image)
        timer = StageTimer(self.device)
        with torch.inference_mode(), precision(self.device, self.autocast_dtype):
            features = self.model.encode_image(decoded.image_hi[None].to(self.device), timer)
        return EncodedImage(decoded.rgb, decoded.image_lo, features, {"load": decoded.load_ms, **timer.ms})

    def __call__(self, image: Any, text: Union[str, Sequence[str]]) -> Union[Result, List[Result]]:
        """One pair -> Result; one image and a list of texts -> list of Results (image work done once).

        image: a path, PIL image, uint8 [H, W, 3] RGB array, [3, H, W] tensor, or an `EncodedImage`
        from `encode`."""
        if not isinstance(text, (str, list, tuple)):
            hint = " (decode it first: text.decode(\"utf-8\"))" if isinstance(text, (bytes, bytearray)) else ""
            raise InputError(f"text: expected a string or a list of strings, got {_type_name(text)}{hint}")
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
        pairs = _checked_pairs(pairs)
        for item in self.iter_candidates(pairs, batch_size, workers):
            if isinstance(item, CandidateBatch):
                yield from self._results(item, pairs)
            else:
                yield item

    def iter_candidates(
        self, pairs: Sequence[Tuple], batch_size: int = 8, workers: int = 2
    ) -> Iterator[Union[CandidateBatch, Tuple[int, DerisRerankError]]]:
        """DeRIS's raw candidates, batch by batch, for tools that need more than a Result (feature extraction).

        pairs: (image, text) or (image, text, group key); pairs with equal keys share one image
        decode and encode (default key: the resolved path, or the image object itself). An image
        may also be a zero-argument callable returning a uint8 [H, W, 3] RGB array (generated data).
        Yields a `CandidateBatch` per model run, and (pair index, error) for each bad pair; raises
        InputError, before any work, when `pairs` is not a list of such tuples.
        """
        pairs = _checked_pairs(pairs)
        chunks = plan_chunks(pairs, batch_size)
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
            source = pairs[group[0]][0]
            if isinstance(source, EncodedImage):
                loaded.append(_Image(source.rgb, None, source.image_lo, 0.0, source.features))
                continue
            if isinstance(source, DecodedImage):
                loaded.append(source)
                continue
            try:
                loaded.append(self._decode(source))
            except DerisRerankError as exc:
                loaded.append(exc)
        return loaded

    def _decode(self, source: Any) -> _Image:
        """Decode one image source (or call a zero-argument source) and prepare both model inputs."""
        return decode_image(source, self.config.image_size, self.config.image_size_lo)

    def _run_chunk(self, pairs, chunk: List[List[int]], images):
        jobs = []  # (pair index, image position, tokens, padding)
        notes = []  # TextNotes of each job
        for position, (group, image) in enumerate(zip(chunk, images)):
            for index in group:
                if isinstance(image, DerisRerankError):
                    yield index, image
                    continue
                try:
                    text = _checked_text(pairs[index][1])
                    tokens, padding, text_notes = self.tokenizer.encode_with_notes(text, self.config.max_tokens)
                    notes.append(self._warn_about_text(text, text_notes))
                except DerisRerankError as exc:
                    yield index, exc
                    continue
                jobs.append((index, position, tokens, padding))
        if jobs:
            used = sorted({position for _, position, _, _ in jobs})
            batch = self._infer([images[p] for p in used], [(i, used.index(p), t, m) for i, p, t, m in jobs])
            batch.text_notes = notes
            yield batch

    def _warn_about_text(self, text: str, notes: TextNotes) -> TextNotes:
        """Warn about `text`'s unknown words and truncation (its tokenizer `notes`); returns the notes."""
        if notes.unknown_words:
            words = ", ".join(repr(w) for w in notes.unknown_words[:10]) + (" ..." if len(notes.unknown_words) > 10 else "")
            warnings.warn(UnknownWordsWarning(
                f"{shorten_text(text)}: the model does not know the word(s) {words}; they all read as one unknown "
                f"token, so expressions differing only in them give the same mask"
            ), stacklevel=4)
        if notes.truncated:
            warnings.warn(f"{shorten_text(text)}: truncated to its first {notes.kept_tokens} of {notes.tokens} tokens "
                          f"(the model reads at most {self.config.max_tokens - 2})", stacklevel=4)
        return notes

    def _image_features(self, images: List[_Image], timer: StageTimer) -> ImageFeatures:
        """Features of `images` in order: encoded together, except those that come encoded."""
        fresh = [im for im in images if im.features is None]
        encoded = self.model.encode_image(torch.stack([im.image_hi for im in fresh]).to(self.device), timer) if fresh else None
        if len(fresh) == len(images):
            return encoded
        rows = iter(range(len(fresh)))
        return ImageFeatures.cat([
            im.features if im.features is not None else encoded.select(torch.tensor([next(rows)], device=self.device))
            for im in images
        ])

    def _infer(self, images: List[_Image], jobs) -> CandidateBatch:
        timer = StageTimer(self.device)
        rows = torch.tensor([position for _, position, _, _ in jobs], device=self.device)
        with torch.inference_mode(), precision(self.device, self.autocast_dtype):
            features = self._image_features(images, timer)
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

    def _results(self, batch: CandidateBatch, pairs) -> List[Tuple[int, Result]]:
        """The re-ranker's decisions and the Results of one model run."""
        texts = [pairs[index][1] for index in batch.indices]
        return assemble_results(batch, texts, self.gate, self.config, self.is_embedded_default, self.answer)


def _image_key(image: Any) -> Any:
    """Pairs with equal keys share an image: the resolved path, or the object itself."""
    return str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else id(image)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _checked_pairs(pairs: Any) -> List[Tuple]:
    """`pairs` as a list, or InputError naming the first item that is not an (image, text[, key]) tuple."""
    if isinstance(pairs, (str, bytes, os.PathLike)) or not isinstance(pairs, Iterable):
        raise InputError(f"pairs: expected a list of (image, text) tuples, got {_type_name(pairs)}")
    pairs = list(pairs)
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            got = (f"a {type(pair).__name__} of {len(pair)} item{'' if len(pair) == 1 else 's'}"
                   if isinstance(pair, (tuple, list)) else _type_name(pair))
            hint = " (one pair? call pipe(image, text))" if isinstance(pair, (str, os.PathLike)) else ""
            raise InputError(f"pair {index}: expected an (image, text) or (image, text, group key) tuple, got {got}{hint}")
    return pairs


def _checked_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InputError(f"text: expected a string, got {_type_name(text)}")
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


RUNTIMES = ("torch", "onnxruntime")


def check_runtime(runtime: str, deris: Any, precision_mode: str, batch_semantics: str) -> str:
    """`runtime`, or InputError where it cannot run with these settings."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be torch or onnxruntime, got {runtime!r}")
    if runtime == "onnxruntime":
        if deris is None or isinstance(deris, DerisModel):
            raise InputError("runtime onnxruntime runs an exported folder: deris-rerank export-onnx MODEL OUT, then pass OUT")
        if precision_mode != "float32":
            raise InputError(f"runtime onnxruntime runs float32 exports; dtype {precision_mode} is for the torch runtime")
        if batch_semantics != "per_sample":
            raise InputError("runtime onnxruntime runs per-sample batch semantics only")
    return runtime
