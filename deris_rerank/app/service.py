"""SegmentService: one Pipeline shared by the app and the HTTP API, with limits and a queue.

Concurrency policy: one model instance; requests take turns on it (a lock, first come first
served in practice). All expressions of one request run as one batch on one encoded image.
A request that would wait behind `max_waiting` others, or that waits longer than
`queue_timeout_s` for the model, is refused with a BusyError (the HTTP API answers 429) and
nothing of it runs. Decoding and checking an upload happen before the queue, in the
request's own thread. Image features (`Pipeline.encode`) are cached by the SHA-256 of the
image file's bytes (the `cache_size` most recent images), so a re-run on the same image with
other expressions or other gate settings does not run Swin and the pixel decoder again.

Imports neither gradio nor fastapi: the app (`ui`) and the API (`api`) are thin layers over it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

from ..errors import DerisRerankError, InputError
from ..images import MAX_IMAGE_PIXELS, load_image_bytes
from ..pipeline import EncodedImage, Pipeline
from ..result import Result
from ..venice.decision import check_tau


class TooLargeError(InputError):
    """An upload above the server's size limit (HTTP 413)."""


class BusyError(DerisRerankError):
    """The model stayed busy past the queue limits (HTTP 429): retry later."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    max_upload_bytes: size of the image file; max_pixels: pixels of the decoded image, read from
    its header before decoding (capped at the decompression-bomb limit `images.MAX_IMAGE_PIXELS`);
    max_texts: expressions per request; max_text_chars: characters per expression;
    queue_timeout_s: longest wait for the model; max_waiting: requests allowed to wait at once.
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_texts: int = 16
    max_text_chars: int = 1000
    queue_timeout_s: float = 60.0
    max_waiting: int = 64

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "max_texts", "max_text_chars", "max_waiting"):
            if getattr(self, name) < 1:
                raise InputError(f"limit {name} must be at least 1, got {getattr(self, name)}")
        if not self.queue_timeout_s > 0:
            raise InputError(f"limit queue_timeout_s must be above 0 seconds, got {self.queue_timeout_s}")
        if self.max_pixels > MAX_IMAGE_PIXELS:
            raise InputError(f"limit max_pixels must be at most the decompression-bomb limit {MAX_IMAGE_PIXELS:,}, "
                             f"got {self.max_pixels:,}")


class SegmentService:
    """Answers (image file bytes, expressions, gate settings) with Results, one request at a time.

    pipeline: the one model instance; limits: `Limits`; cache_size: images whose features are kept.
    Thread-safe: call `segment` from any number of threads.
    """

    def __init__(self, pipeline: Pipeline, limits: Limits = Limits(), cache_size: int = 4):
        if cache_size < 0:
            raise InputError(f"cache_size must be 0 or more, got {cache_size}")
        self.pipeline = pipeline
        self.limits = limits
        self.cache_size = cache_size
        self._model_lock = threading.Lock()
        self._state_lock = threading.Lock()  # guards the cache and the counters below
        self._cache: "OrderedDict[str, EncodedImage]" = OrderedDict()
        self._waiting = 0
        self.served = 0  # requests answered
        self.refused_busy = 0  # requests refused by the queue limits
        self.encoded = 0  # images encoded (cache misses)

    @property
    def has_gate(self) -> bool:
        """Whether the pipeline has a re-ranker (else gate settings do nothing)."""
        return self.pipeline.gate is not None

    @property
    def default_tau(self) -> Optional[float]:
        """The re-ranker's own threshold (None without a re-ranker)."""
        return None if self.pipeline.gate is None else float(self.pipeline.gate.rule.tau)

    def check_request(self, data: bytes, texts: Sequence[str], tau: Optional[float] = None) -> List[str]:
        """Raise InputError (TooLargeError) for a request outside the limits; returns the texts as a list."""
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InputError("image: the request has no image file (or it is empty); send the image file's bytes")
        if len(data) > self.limits.max_upload_bytes:
            raise TooLargeError(f"image file is {len(data):,} bytes, above this server's limit of "
                                f"{self.limits.max_upload_bytes:,} bytes; downscale or recompress it")
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise InputError("texts: expected a list of referring expressions")
        texts = list(texts)
        if not texts:
            raise InputError("texts: no expression given; send at least one, e.g. \"the biggest cross\"")
        if len(texts) > self.limits.max_texts:
            raise InputError(f"{len(texts)} expressions in one request, above this server's limit of "
                             f"{self.limits.max_texts}; split them over several requests")
        for number, text in enumerate(texts, 1):
            if not isinstance(text, str):
                raise InputError(f"expression {number}: expected a string, got {type(text).__name__}")
            if not text.strip():
                raise InputError(f"expression {number} is empty: give a referring expression such as \"man on the left\"")
            if len(text) > self.limits.max_text_chars:
                raise TooLargeError(f"expression {number} has {len(text):,} characters, above this server's limit "
                                    f"of {self.limits.max_text_chars:,}")
        check_tau(tau)
        if tau is not None and not self.has_gate:
            raise InputError("tau was given, but this server runs without a re-ranker; leave tau out")
        return texts

    def segment(self, data: bytes, texts: Sequence[str], name: str = "upload", gate: bool = True,
                tau: Optional[float] = None) -> List[Result]:
        """Results for each of `texts` about the image file `data`, in order.

        name: the file name messages use; gate: False answers with DeRIS's own Query-0;
        tau: the gate's threshold for this request (default: its own). Raises InputError,
        TooLargeError or BusyError with a one-line message; nothing is cached from a bad request.
        """
        texts = self.check_request(data, texts, tau)
        key = hashlib.sha256(data).hexdigest()
        with self._state_lock:
            encoded = self._cache.get(key)
        rgb = None if encoded is not None else load_image_bytes(bytes(data), name or "upload", self.limits.max_pixels)
        with self._turn():
            if encoded is None:
                encoded = self._encoded(key, rgb)
            with self._decision_settings(gate, tau):
                results = self.pipeline(encoded, texts)
        with self._state_lock:
            self.served += 1
        return results

    def stats(self) -> Dict[str, int]:
        """Counters for a health check: requests served / refused as busy, images encoded, waiting now."""
        with self._state_lock:
            return {"served": self.served, "refused_busy": self.refused_busy, "encoded": self.encoded,
                    "waiting": self._waiting, "cached_images": len(self._cache)}

    # --- internals ---------------------------------------------------------------------
    def _encoded(self, key: str, rgb) -> EncodedImage:
        """Encode `rgb` (holding the model) and keep it in the cache under `key`."""
        with self._state_lock:
            cached = self._cache.get(key)  # encoded by a request that went first
        if cached is not None:
            return cached
        encoded = self.pipeline.encode(rgb)
        with self._state_lock:
            self.encoded += 1
            if self.cache_size:
                self._cache[key] = encoded
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return encoded

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the model for one request, within the queue limits (see the module docstring)."""
        with self._state_lock:
            if self._waiting >= self.limits.max_waiting:
                self.refused_busy += 1
                raise BusyError(f"the server is busy ({self._waiting} requests waiting for the model); retry later")
            self._waiting += 1
        try:
            acquired = self._model_lock.acquire(timeout=self.limits.queue_timeout_s)
        finally:
            with self._state_lock:
                self._waiting -= 1
        if not acquired:
            with self._state_lock:
                self.refused_busy += 1
            raise BusyError(f"the model stayed busy for {self.limits.queue_timeout_s:g} s; retry later")
        try:
            yield
        finally:
            self._model_lock.release()

    @contextmanager
    def _decision_settings(self, gate: bool, tau: Optional[float]) -> Iterator[None]:
        """Run with the gate off, or with another tau, and restore the pipeline afterwards (model held)."""
        reranker = self.pipeline.gate
        if reranker is None or (gate and tau is None):
            yield
            return
        rule = reranker.rule
        try:
            if not gate:
                self.pipeline.gate = None
            else:
                reranker.rule = dataclasses.replace(rule, tau=float(tau))
            yield
        finally:
            self.pipeline.gate = reranker
            reranker.rule = rule
