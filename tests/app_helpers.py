"""Shared by the app's tests (test_app.py, test_app_browser.py): the bundled example, comparing an
answer with the Python API's, and running the whole server under uvicorn on 127.0.0.1.

Imports uvicorn only when a server is started, so that importing this module needs no [app] extra.
"""
from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "demo" / "assets" / "shapes.png"


def assert_same_answer(got: dict, want: dict, abs_tol: float = 1e-6) -> None:
    """Equal results (`Result.to_json()` dicts): masks, ranks and decisions exactly; scores to
    float32 rounding (relative 1e-5, or `abs_tol` absolute: pass 1e-5 for answers batched with
    other pairs, whose float32 sums run in another order); timings not compared."""
    assert set(got) == set(want)
    for key, value in want.items():
        if key == "timings_ms":
            continue
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=abs_tol), key
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=abs_tol), key
        else:
            assert got[key] == value, key


@contextmanager
def live_server(app, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on a free port of 127.0.0.1, in a thread; yields its base URL.

    The timeout bounds startup (it is not a speed test); the server is stopped on exit.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    ticks = threading.Event()
    for _ in range(int(startup_timeout_s * 10)):
        if server.started or not thread.is_alive():
            break
        ticks.wait(0.1)
    try:
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
