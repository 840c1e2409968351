"""Latency of POST /api/segment under concurrent clients (default: the embedded DeRIS-tiny + gate).

    python bench/app_load.py                       # 1, 4 and 16 clients x 8 requests each
    python bench/app_load.py --batch-pairs 8       # the same, requests sharing model calls (up to 8 pairs)
    python bench/app_load.py --clients 8 --requests 20 --deris weights/deris-l-refcoco --tokenizer weights/beit3.spm

Starts the whole server (API + page) under uvicorn on 127.0.0.1 in this process, warms it up,
then for each client count sends that many clients' requests at once (multipart, the bundled
example with one expression each; the image is cached after the first request, as in the app)
and prints the 50th / 90th / 99th percentiles and the maximum of the request latency, the
throughput, and the mean pairs per model call. A benchmark, not a test: numbers depend on the
machine and what else runs on it.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
import uvicorn

from deris_rerank import Pipeline
from deris_rerank.app.server import create_server
from deris_rerank.app.service import Batching, Limits, SegmentService

EXAMPLE = Path(__file__).resolve().parents[1] / "demo" / "assets" / "shapes.png"
TEXTS = ["the biggest cross", "the blue circle", "the green square", "the leftmost triangle"]


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deris")
    parser.add_argument("--tokenizer")
    parser.add_argument("--gate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--batch-pairs", type=int, default=1, help="most pairs per model call (the app's --batch-pairs)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="the app's --batch-wait-ms, milliseconds")
    args = parser.parse_args()

    batching = Batching(max_pairs=args.batch_pairs, wait_ms=args.batch_wait_ms)
    pipe = Pipeline(deris=args.deris, tokenizer=args.tokenizer, gate=args.gate, device=args.device, dtype=args.dtype)
    service = SegmentService(pipe, Limits(queue_timeout_s=600, max_waiting=1024), batching=batching)
    server = uvicorn.Server(uvicorn.Config(create_server(service), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/segment"
    image = EXAMPLE.read_bytes()

    def post(session, text):
        start = time.perf_counter()
        response = session.post(url, files={"image": ("shapes.png", image)}, data={"text": text}, timeout=600)
        response.raise_for_status()
        return (time.perf_counter() - start) * 1000

    with requests.Session() as session:
        for text in TEXTS:  # warm-up, and the image's features into the cache
            post(session, text)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, device {pipe.device}, model {pipe.deris_path.name if pipe.deris_path else '?'}, "
          f"batch pairs {batching.max_pairs}, batch wait {batching.wait_ms:g} ms")
    print("clients  requests  p50 ms  p90 ms  p99 ms  max ms  requests/s  pairs/call")
    for clients in args.clients:
        def one_client(number):
            with requests.Session() as session:
                return [post(session, TEXTS[(number + k) % len(TEXTS)]) for k in range(args.requests)]

        before = service.stats()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = [ms for batch in pool.map(one_client, range(clients)) for ms in batch]
        wall = time.perf_counter() - start
        after = service.stats()
        pairs_per_call = (after["batched_pairs"] - before["batched_pairs"]) / (after["batches"] - before["batches"])
        print(f"{clients:7d}  {len(latencies):8d}  {statistics.median(latencies):6.1f}  {percentile(latencies, 90):6.1f}  "
              f"{percentile(latencies, 99):6.1f}  {max(latencies):6.1f}  {len(latencies) / wall:10.1f}  {pairs_per_call:10.2f}")
    server.should_exit = True
    thread.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
