"""One server for the app and the API: a FastAPI application with the API routes and the Gradio page at /.

`create_server` builds it around a SegmentService; `serve` runs it with uvicorn on one host and
port (127.0.0.1 unless asked otherwise). Gradio's own routes live under /gradio_api/, so the
API's /api/... paths do not collide with them.
"""
from __future__ import annotations

from typing import Optional

import gradio as gr
import uvicorn
from fastapi import FastAPI

from .api import create_api_router
from .service import SegmentService
from .ui import AppCallbacks, build_ui


def create_server(service: SegmentService, ui: bool = True, callbacks: Optional[AppCallbacks] = None) -> FastAPI:
    """The FastAPI application: `/api/segment`, `/api/health`, and (ui=True) the page at `/`."""
    server = FastAPI(title="deris-rerank", docs_url=None, redoc_url=None, openapi_url=None)
    server.include_router(create_api_router(service))
    if ui:
        callbacks = callbacks or AppCallbacks(service)
        page = build_ui(service, callbacks)
        server = gr.mount_gradio_app(server, page, path="/", allowed_paths=[str(callbacks.output_root)],
                                     max_file_size=service.limits.max_upload_bytes)
    return server


def serve(service: SegmentService, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the server until interrupted (uvicorn, one process: the model lives in it once)."""
    print(f"deris-rerank app: http://{host}:{port}/  (API: POST http://{host}:{port}/api/segment)", flush=True)
    uvicorn.run(create_server(service), host=host, port=port, log_level="warning")
