"""The interactive app and the HTTP API (optional extra: pip install "deris-rerank[app]").

    service.py   SegmentService: one Pipeline, limits, the request queue, the encoded-image cache
    api.py       POST /api/segment, GET /api/health, GET /openapi.json; {"error": ...} for every refusal (FastAPI)
    openapi.py   the API's OpenAPI description, with this server's limits
    ui.py        the Gradio page and its callbacks
    server.py    both in one FastAPI server, run with uvicorn

Only this package imports gradio, fastapi and uvicorn; importing it needs none of them, its
modules do.
"""
