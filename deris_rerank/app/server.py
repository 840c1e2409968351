"""One server for the app and the API: a FastAPI application with the API routes and the Gradio page at /.

`create_server` builds it around a SegmentService; `serve` runs it with uvicorn on one host and
port (127.0.0.1 unless asked otherwise). Gradio's own routes live under /gradio_api/, so the
API's /api/... paths (and its /openapi.json, which describes the API only) do not collide with
them. The log stays readable: one line per refused API request (api.py), and one line, not a
traceback, for a request that makes the page's routes (Gradio) fail, such as an unknown ?page=.
"""
from __future__ import annotations

import logging
import sys
import traceback
import warnings
from typing import Optional

import gradio as gr
import uvicorn
from fastapi import FastAPI

from ..errors import UnknownWordsWarning
from .api import create_api_router, log
from .service import SegmentService
from .ui import PAGE_CSS, PAGE_JS, AppCallbacks, build_ui


class OneLineErrors:
    """ASGI middleware: a request whose handling raises is answered 500 (when nothing was sent yet)
    and logged as one line naming the exception and where it was raised, instead of a traceback.

    Wraps the page's routes (Gradio), which raise on some malformed requests (e.g. an unknown
    `?page=`); the API's own routes answer their errors themselves.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = {"started": False, "complete": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                sent["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if sent["started"] and not sent["complete"]:
                raise  # half a response: let the server close the connection (and log it in full)
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno}"
            log.error("failed %s %s (500): %s: %s (raised at %s)", scope.get("method"), scope.get("path"),
                      type(exc).__name__, " ".join(str(exc).split())[:200], where)
            if not sent["started"]:
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"Internal Server Error"})


def create_server(service: SegmentService, ui: bool = True, callbacks: Optional[AppCallbacks] = None) -> FastAPI:
    """The FastAPI application: `/api/segment`, `/api/health`, and (ui=True) the page at `/`."""
    server = FastAPI(title="deris-rerank", docs_url=None, redoc_url=None, openapi_url=None)
    server.include_router(create_api_router(service))
    if ui:
        callbacks = callbacks or AppCallbacks(service)
        page = build_ui(service, callbacks)
        server = gr.mount_gradio_app(server, page, path="/", allowed_paths=[str(callbacks.output_root)],
                                     max_file_size=service.limits.max_upload_bytes, css=PAGE_CSS, js=PAGE_JS)
        server.add_middleware(OneLineErrors)
    return server


def serve(service: SegmentService, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the server until interrupted (uvicorn, one process: the model lives in it once).

    Logs to stderr: uvicorn's warnings, and this app's one line per refused request. Unknown words
    are not logged: each answer names them to its client (`unknown_words`, `notes`).
    """
    warnings.filterwarnings("ignore", category=UnknownWordsWarning)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    print(f"deris-rerank app: http://{host}:{port}/  (API: POST http://{host}:{port}/api/segment, "
          f"described at http://{host}:{port}/openapi.json)", flush=True)
    uvicorn.run(create_server(service), host=host, port=port, log_level="warning")
