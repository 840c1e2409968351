"""SegmentService: one Pipeline shared by the app and the HTTP API, with limits and a queue.

Concurrency policy: one model instance. Requests wait in one queue, in arrival order, and the
model runs one call at a time; the request thread that finds the model free runs the next call
for the requests at the head of the queue (and returns once its own request is answered).
A request that would wait behind `max_waiting` others, or that waits longer than
`queue_timeout_s` to be taken into a model call, is refused with a BusyError (the HTTP API
answers 429), leaves the queue and nothing of it runs. Decoding and checking an upload happen
before the queue, in the request's own thread. Image features (`Pipeline.encode`) are cached by
the SHA-256 of the image file's bytes (the `cache_size` most recent images), so a re-run on the
same image with other expressions or other gate settings does not run Swin and the pixel
decoder again.

Batching (`Batching`): by default (max_pairs 1) each model call answers one request, all its
expressions as one batch on one encoded image, exactly as the Python API does. With max_pairs
N > 1 one call answers several requests: the oldest waiting request, then each later one (in
arrival order) with the same decision settings (gate off, or on with the same tau; the server's
own tau given explicitly counts as the same) whose expressions still fit in N pairs. A request
with more than N expressions runs alone; a request is never split over calls. The oldest request
waits up to `wait_ms` after its arrival for others to join (no longer once the call is
full), so a lone request answers up to `wait_ms` later. Images not cached are encoded one by
one before the call; the text part of DeRIS and the gate then run once for all the call's pairs.
Each request gets its own results in order, and a failing request fails alone. In float32 a
batched matrix product sums in another order, so scores then depend in their last bits (up to
2.4e-7 here) on what else was in the call; masks and decisions were equal on the tests here.
Measured (docs/speed.md, bench/app_load.py): 16 clients on the embedded default, 2-core CPU, torch 1
thread, got 28.6 requests/s with max_pairs 1 and 50.1 with 8.

Imports neither gradio nor fastapi: the app (`ui`) and the API (`api`) are thin layers over it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Deque, Dict, Hashable, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import DerisRerankError, InputError
from ..images import MAX_IMAGE_PIXELS, load_image_bytes
from ..pipeline import EncodedImage, Pipeline
from ..result import Result
from ..rerank.decision import check_tau


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


MAX_BATCH_PAIRS = 256  # most pairs `Batching.max_pairs` allows in one model call
MAX_BATCH_WAIT_MS = 1000.0  # longest `Batching.wait_ms`, milliseconds


@dataclass(frozen=True)
class Batching:
    """How requests share model calls (the module docstring's concurrency policy).

    max_pairs: most (image, expression) pairs in one model call, 1 to MAX_BATCH_PAIRS; 1 answers
    one request per call. wait_ms: how long the oldest waiting request waits, from its arrival in
    the queue, for others to join its call, in milliseconds (0 to MAX_BATCH_WAIT_MS); 0 takes only
    the requests already waiting. Only matters when max_pairs > 1.
    """

    max_pairs: int = 1
    wait_ms: float = 5.0

    def __post_init__(self):
        if isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int) or not 1 <= self.max_pairs <= MAX_BATCH_PAIRS:
            raise InputError(f"batching: max_pairs (--batch-pairs) must be a whole number from 1 to {MAX_BATCH_PAIRS}, "
                             f"got {self.max_pairs!r}")
        if isinstance(self.wait_ms, bool) or not isinstance(self.wait_ms, (int, float)) or not 0 <= self.wait_ms <= MAX_BATCH_WAIT_MS:
            raise InputError(f"batching: wait_ms (--batch-wait-ms) must be from 0 to {MAX_BATCH_WAIT_MS:g} milliseconds, "
                             f"got {self.wait_ms!r}")


@dataclass(eq=False)
class _Request:
    """One checked request on its way through the queue, and its outcome.

    key: SHA-256 of the image file (the cache key); rgb: the decoded image when it was not cached
    on arrival, else None; encoded: its features once known; queued: when it joined the queue
    (time.monotonic(), seconds); taken: in a model call (no longer in the queue); done: results
    or error set.
    """

    key: str
    rgb: Optional[np.ndarray]
    encoded: Optional[EncodedImage]
    texts: List[str]
    gate: bool
    tau: Optional[float]
    queued: float = 0.0
    taken: bool = False
    done: bool = False
    results: Optional[List[Result]] = None
    error: Optional[Exception] = None


class SegmentService:
    """Answers (image file bytes, expressions, gate settings) with Results, one model call at a time.

    pipeline: the one model instance; limits: `Limits`; cache_size: images whose features are kept;
    batching: `Batching` (default: one request per model call).
    Thread-safe: call `segment` from any number of threads.
    """

    def __init__(self, pipeline: Pipeline, limits: Limits = Limits(), cache_size: int = 4, batching: Batching = Batching()):
        if cache_size < 0:
            raise InputError(f"cache_size must be 0 or more, got {cache_size}")
        self.pipeline = pipeline
        # the re-ranker and its own tau, kept: a request's decision settings change the pipeline's while its call runs
        self.reranker = pipeline.gate
        self._own_tau = None if pipeline.gate is None else float(pipeline.gate.rule.tau)
        self.limits = limits
        self.cache_size = cache_size
        self.batching = batching
        self._model_lock = threading.Lock()  # held while a model call runs (by the thread that runs it)
        self._state_lock = threading.Lock()  # guards the queue, the requests in it, the cache and the counters
        self._arrived = threading.Condition(self._state_lock)  # a request joined the queue
        self._finished = threading.Condition(self._state_lock)  # a model call ended: answers are in, the model is free
        self._queue: Deque[_Request] = deque()  # waiting requests, oldest first
        self._cache: "OrderedDict[str, EncodedImage]" = OrderedDict()
        self.served = 0  # requests answered
        self.refused_busy = 0  # requests refused by the queue limits
        self.encoded = 0  # images encoded (cache misses)
        self.batches = 0  # model calls run
        self.batched_pairs = 0  # (image, expression) pairs answered by them
        self.largest_batch_pairs = 0  # most pairs in one call
        self.largest_batch_requests = 0  # most requests in one call

    @property
    def has_gate(self) -> bool:
        """Whether the pipeline has a re-ranker (else gate settings do nothing)."""
        return self.reranker is not None

    @property
    def default_tau(self) -> Optional[float]:
        """The re-ranker's own threshold (None without a re-ranker)."""
        return self._own_tau

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
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate, as JSON's "\udcff" gives: no text the tokenizer takes
                raise InputError(f"expression {number} is not valid Unicode (character {exc.start + 1} is a lone "
                                 "surrogate); send UTF-8 text") from None
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
        request = _Request(key, rgb, encoded, texts, gate, tau)
        self._enqueue(request)
        while True:
            batch = self._next_batch(request)
            if not batch:
                break
            try:
                self._run(batch)
            finally:
                self._finish(batch)
        if request.error is not None:
            raise request.error
        with self._state_lock:
            self.served += 1
        return request.results

    def stats(self) -> Dict[str, int]:
        """Counters for a health check: requests served / refused as busy, images encoded, waiting now,
        cached images, model calls run (batches), the pairs they answered, and the most pairs and
        requests one call answered."""
        with self._state_lock:
            return {"served": self.served, "refused_busy": self.refused_busy, "encoded": self.encoded,
                    "waiting": len(self._queue), "cached_images": len(self._cache), "batches": self.batches,
                    "batched_pairs": self.batched_pairs, "largest_batch_pairs": self.largest_batch_pairs,
                    "largest_batch_requests": self.largest_batch_requests}

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

    def _enqueue(self, request: _Request) -> None:
        """Put `request` at the end of the queue, or refuse it (BusyError) when `max_waiting` wait already."""
        with self._state_lock:
            if len(self._queue) >= self.limits.max_waiting:
                self.refused_busy += 1
                raise BusyError(f"the server is busy ({len(self._queue)} requests waiting for the model); retry later")
            request.queued = time.monotonic()
            self._queue.append(request)
            self._arrived.notify()

    def _next_batch(self, request: _Request) -> List[_Request]:
        """Wait until `request` is answered ([]), or until the model is free while it still waits: then
        hold the model and return the next batch for this thread to run (`_run`, then `_finish`).

        Raises BusyError, taking `request` out of the queue, once it has waited `queue_timeout_s`.
        """
        deadline = request.queued + self.limits.queue_timeout_s
        with self._state_lock:
            while not request.done:
                if request.taken:  # another thread runs it
                    self._finished.wait()
                elif self._model_lock.acquire(blocking=False):
                    try:
                        return self._gather()
                    except BaseException:  # interrupted while gathering (Ctrl-C in the main thread): free the model
                        self._queue.remove(request)
                        self._model_lock.release()
                        self._finished.notify_all()
                        raise
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._queue.remove(request)
                        self.refused_busy += 1
                        raise BusyError(f"the model stayed busy for {self.limits.queue_timeout_s:g} s; retry later")
                    self._finished.wait(remaining)
        return []

    def _gather(self) -> List[_Request]:
        """Take the next batch out of the queue (state lock and model held; the queue is not empty).

        Waits for more requests, up to `Batching.wait_ms` after the oldest one's arrival, while
        the batch has room.
        """
        batch = self._batch_at_head()
        while sum(len(r.texts) for r in batch) < self.batching.max_pairs:
            remaining = self._queue[0].queued + self.batching.wait_ms / 1000 - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.wait(remaining)
            batch = self._batch_at_head()
        for request in batch:
            request.taken = True
            self._queue.remove(request)
        return batch

    def _batch_at_head(self) -> List[_Request]:
        """The oldest waiting request, and each later one with the same decision settings whose
        expressions still fit in `Batching.max_pairs` (state lock and model held)."""
        head = self._queue[0]
        settings = self._decision_key(head)
        batch, pairs = [head], len(head.texts)
        for request in islice(self._queue, 1, None):
            if pairs >= self.batching.max_pairs:
                break
            if pairs + len(request.texts) <= self.batching.max_pairs and self._decision_key(request) == settings:
                batch.append(request)
                pairs += len(request.texts)
        return batch

    def _decision_key(self, request: _Request) -> Hashable:
        """Equal for requests the gate decides alike: "off", or the tau in force; None without a re-ranker."""
        if not self.has_gate:
            return None
        if not request.gate:
            return "off"
        return self.default_tau if request.tau is None else float(request.tau)

    def _run(self, batch: List[_Request]) -> None:
        """Answer `batch` in one model call (model held): encode images not cached, then the pairs of
        all its requests together under the first one's decision settings. Sets each request's
        results, or its error (a bad pair of a request fails that request only)."""
        for request in batch:
            if request.encoded is None:
                try:
                    request.encoded = self._encoded(request.key, request.rgb)
                except Exception as exc:  # an image the model cannot take fails its own request
                    request.error = exc
        ready = [request for request in batch if request.error is None]
        pairs = [(request.encoded, text) for request in ready for text in request.texts]
        if not pairs:
            return
        try:
            with self._decision_settings(ready[0].gate, ready[0].tau):
                outcomes = dict(self.pipeline.iter_batch(pairs, batch_size=len(pairs)))
        except Exception as exc:  # a bug: each request of the call answers with it
            for request in ready:
                request.error = exc
            return
        start = 0
        for request in ready:
            mine = [outcomes[index] for index in range(start, start + len(request.texts))]
            start += len(request.texts)
            errors = [outcome for outcome in mine if isinstance(outcome, DerisRerankError)]
            if errors:
                request.error = errors[0]
            else:
                request.results = mine
        with self._state_lock:
            self.batches += 1
            self.batched_pairs += len(pairs)
            self.largest_batch_pairs = max(self.largest_batch_pairs, len(pairs))
            self.largest_batch_requests = max(self.largest_batch_requests, len(ready))

    def _finish(self, batch: List[_Request]) -> None:
        """Mark `batch` answered, free the model and wake the waiting requests."""
        with self._state_lock:
            for request in batch:
                if request.results is None and request.error is None:  # the running thread was interrupted
                    request.error = BusyError("the model call was interrupted; retry later")
                request.done = True
            self._model_lock.release()
            self._finished.notify_all()

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
