"""The HTTP API: `POST /api/segment`, `GET /api/health` and `GET /openapi.json`, as a FastAPI router
over a SegmentService.

POST /api/segment takes either
  - multipart/form-data: a file field `image`, one or more `text` fields, optional `gate`
    ("true"/"false") and `tau` fields; or
  - application/json: {"image": "<base64 of the image file's bytes>", "texts": ["...", ...],
    "gate": true, "tau": 0.5} (gate and tau optional),
and answers {"results": [Result.to_json(), ...]}, one per expression in order. GET /openapi.json
is the API's OpenAPI description (openapi.py). Every error answers {"error": "<one line>"}: 400
(bad input), 404 (no such path under /api/), 405 (a method the path does not take, with an Allow
header), 413 (too large: image file, body or an expression), 415 (other content types), 429 (model
busy); a bug answers 500 with a one-line message, and the server goes on serving.

The log (logger "deris_rerank.app") gets one line per refused request, without a traceback; a
500 logs its traceback (it is a bug, not the client's mistake).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any, Dict, List, Optional, Tuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..errors import DerisRerankError, InputError
from .openapi import FORM_BOOLEANS, api_description
from .service import BusyError, SegmentService, TooLargeError

log = logging.getLogger("deris_rerank.app")

# room a request body may take beyond the image itself: base64's 4/3, the texts, form framing
_BODY_OVERHEAD_BYTES = 256 * 1024
# the API's paths and the one method each takes (any other method answers 405, other /api/ paths 404)
API_METHODS = {"/api/segment": "POST", "/api/health": "GET", "/openapi.json": "GET"}


class _RequestTooLarge(TooLargeError):
    """The request body is above what the limits allow."""


def error_status(exc: DerisRerankError) -> int:
    """The HTTP status of a user-facing error."""
    if isinstance(exc, TooLargeError):
        return 413
    if isinstance(exc, BusyError):
        return 429
    return 400


def error_response(request: Request, message: str, status: int, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    """{"error": message} with `status`, and one line in the log; the message is kept to one line."""
    message = " ".join(str(message).split())
    log.info("refused %s %s (%d): %s", request.method, request.url.path, status, message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def shown(value: Any, limit: int = 40) -> str:
    """`value` for a message: its repr, cut to `limit` characters (a client's value can be long)."""
    try:
        text = repr(value)
    except RecursionError:  # a structure nested too deeply to print
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def create_api_router(service: SegmentService) -> APIRouter:
    """The API's routes over `service` (include them in a FastAPI app before mounting the UI at /)."""
    router = APIRouter()
    limits = service.limits
    max_body = limits.max_upload_bytes * 4 // 3 + 4 + _BODY_OVERHEAD_BYTES + 8 * limits.max_texts * limits.max_text_chars

    @router.get("/api/health")
    def health() -> Dict[str, Any]:
        """Liveness and what this server runs: model, re-ranker, limits, batching, counters."""
        pipe = service.pipeline
        return {
            "status": "ok",
            "embedded_default": pipe.is_embedded_default,
            "deris": None if pipe.deris_path is None else pipe.deris_path.name,
            "reranker": None if service.reranker is None else type(service.reranker).__name__,
            "tau": service.default_tau,
            "limits": {
                "max_upload_bytes": service.limits.max_upload_bytes,
                "max_pixels": service.limits.max_pixels,
                "max_texts": service.limits.max_texts,
                "max_text_chars": service.limits.max_text_chars,
                "queue_timeout_s": service.limits.queue_timeout_s,
                "max_waiting": service.limits.max_waiting,
            },
            "batching": {"max_pairs": service.batching.max_pairs, "wait_ms": service.batching.wait_ms},
            **service.stats(),
        }

    @router.post("/api/segment")
    async def segment(request: Request) -> JSONResponse:
        """Segment one image for one or more expressions (see the module docstring)."""
        try:
            body = await _read_body(request, max_body)
            data, name, texts, gate, tau = await _parse(request, body, service.limits.max_texts)
            results = await run_in_threadpool(service.segment, data, texts, name, gate, tau)
            return JSONResponse({"results": [result.to_json() for result in results]})
        except DerisRerankError as exc:
            return error_response(request, str(exc), error_status(exc))
        except _UnsupportedType as exc:
            return error_response(request, str(exc), 415)
        except Exception as exc:  # a bug: say so in one line, log its traceback, keep serving
            log.exception("bug answering %s %s", request.method, request.url.path)
            message = " ".join(f"internal error ({type(exc).__name__}: {exc}); please report it".split())
            return JSONResponse({"error": message}, status_code=500)

    description = api_description(limits, service.has_gate)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        """The API's OpenAPI description (openapi.py), for client generators and API testers."""
        return JSONResponse(description)

    for path in ("/api", "/api/{rest:path}", "/openapi.json"):
        router.add_route(path, _OtherMethodOrPath(), include_in_schema=False)  # after the routes above
    return router


class _OtherMethodOrPath:
    """Any other method on an API path (405, with Allow), or any other path under /api/ (404).

    An ASGI app rather than a function, so that its route takes every method, standard or not.
    """

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        path = request.url.path
        if path in API_METHODS:
            response = error_response(request, f"{path} takes {API_METHODS[path]}, not {request.method[:20]}", 405,
                                      headers={"Allow": API_METHODS[path]})
        else:
            known = ", ".join(f"{method} {known}" for known, method in API_METHODS.items())
            response = error_response(request, f"no such path in the API: {shown(path, 80)}; it has {known}", 404)
        await response(scope, receive, send)


class _UnsupportedType(Exception):
    """A request body that is neither JSON nor multipart."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _RequestTooLarge(f"request body is {int(declared):,} bytes, above this server's limit of {limit:,}; "
                               "send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _RequestTooLarge(f"request body is above this server's limit of {limit:,} bytes; send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, body: bytes, max_texts: int) -> Tuple[bytes, str, List[str], bool, Optional[float]]:
    """(image bytes, its name, texts, gate, tau) from a JSON or multipart body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _parse_json(body)
    if kind == "multipart/form-data":
        return await _parse_multipart(request, body, max_texts)
    given = f"content type {shown(kind)}" if kind else "no content type"
    raise _UnsupportedType(f"{given} is not supported; send multipart/form-data "
                           "(fields image, text) or application/json ({\"image\": base64, \"texts\": [...]})")


def _parse_json(body: bytes) -> Tuple[bytes, str, List[str], bool, Optional[float]]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError("request body is JSON nested too deeply; send {\"image\": base64, \"texts\": [...]}") from None
    if not isinstance(payload, dict):
        raise InputError("request body: expected a JSON object {\"image\": base64, \"texts\": [...]}")
    unknown = sorted(set(payload) - {"image", "texts", "gate", "tau"})
    if unknown:
        names = ", ".join(shown(name) for name in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InputError(f"unknown field(s) {names}; expected image, texts, gate, tau")
    image = payload.get("image")
    if not isinstance(image, str) or not image:
        raise InputError("image: expected the image file's bytes as a base64 string")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image: not valid base64; send base64.b64encode(file bytes).decode()") from None
    gate = payload.get("gate", True)
    if not isinstance(gate, bool):
        raise InputError(f"gate: expected true or false, got {shown(gate)}")
    tau = payload.get("tau")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1):
        raise InputError(f"tau: expected a number between 0 and 1, got {shown(tau)}")
    return data, "upload", payload.get("texts"), gate, None if tau is None else float(tau)


async def _parse_multipart(request: Request, body: bytes, max_texts: int) -> Tuple[bytes, str, List[str], bool, Optional[float]]:
    async def replay() -> Dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=2 * max_texts + 8)
    except Exception as exc:  # starlette's MultiPartException and friends
        raise InputError(f"cannot read the multipart form: {exc}") from None
    try:
        images = form.getlist("image")
        if len(images) != 1 or not isinstance(images[0], UploadFile):
            raise InputError("image: expected exactly one file field named 'image'")
        data = await images[0].read()
        texts = form.getlist("text")
        if any(not isinstance(text, str) for text in texts):
            raise InputError("text: expected plain form fields, got a file")
        gate_field = form.get("gate", "true")
        if not isinstance(gate_field, str) or gate_field not in FORM_BOOLEANS:
            raise InputError(f"gate: expected true or false, got {shown(gate_field)}")
        tau_field = form.get("tau")
        try:
            tau = None if tau_field in (None, "") else float(tau_field)
        except (TypeError, ValueError):
            raise InputError(f"tau: expected a number between 0 and 1, got {shown(tau_field)}") from None
        return data, images[0].filename or "upload", texts, FORM_BOOLEANS[gate_field], tau
    finally:
        await form.close()
