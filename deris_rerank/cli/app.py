"""`deris-rerank app`: the interactive page and the HTTP API (optional extra `app`)."""
from __future__ import annotations

import argparse

from ..errors import DerisRerankError, install_hint
from .options import add_pipeline_options, pipeline_from_args

def cmd_app(args: argparse.Namespace) -> int:
    """Serve the interactive app and the HTTP API (deris_rerank/app) until interrupted."""
    try:
        from ..app.server import serve
        from ..app.service import Batching, Limits, SegmentService
    except ImportError as exc:
        raise DerisRerankError(f"the app needs gradio, fastapi and uvicorn ({exc.name or exc} is missing): "
                               f"{install_hint('app')}") from None
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_texts=args.max_texts, queue_timeout_s=args.queue_timeout)
    batching = Batching(max_pairs=args.batch_pairs, wait_ms=args.batch_wait_ms)
    serve(SegmentService(pipeline_from_args(args), limits, cache_size=args.cache_images, batching=batching),
          host=args.host, port=args.port)
    return 0


def add_commands(commands) -> None:
    """Add `app` to the `deris-rerank` subcommands."""
    app = commands.add_parser(
        "app",
        help=f"serve the interactive app and the HTTP API ({install_hint('app')})",
        description="A Gradio page at / and POST /api/segment on one server; one model instance, requests take turns "
                    "(or share model calls: --batch-pairs).",
    )
    app.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, this machine only; "
                     "0.0.0.0 opens it to the network)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    app.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted, MiB (default 20)")
    app.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image accepted, pixels (default 40,000,000)")
    app.add_argument("--max-texts", type=int, default=16, help="most expressions per request (default 16)")
    app.add_argument("--queue-timeout", type=float, default=60.0,
                     help="longest wait for the model, seconds; a request waiting longer gets 429 (default 60)")
    app.add_argument("--cache-images", type=int, default=4, help="images whose encoded features are kept (default 4)")
    app.add_argument("--batch-pairs", type=int, default=1,
                     help="most (image, expression) pairs one model call answers, from several requests; "
                          "1 runs one request at a time (default 1; see docs/app.md, Concurrency)")
    app.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="how long the oldest waiting request waits for others to join its model call, "
                          "milliseconds; 0: only those already waiting (default 5; only with --batch-pairs above 1)")
    add_pipeline_options(app)
    app.set_defaults(run=cmd_app)
