"""Time a re-ranker's decision on cached pairs: median ms per pair at batch 1 and batch 8.

    python bench/rerank_speed.py --gate runs/calibrated.safetensors --cache cache/gate-tune --threads 2

Reads the first pairs of a feature cache (`deris-rerank extract`), calls `decide` (with the
expression's features for a text-aware re-ranker) once per batch after a warm-up, and prints
the median and minimum milliseconds per pair. Not a test.
"""
import argparse
import time
from pathlib import Path

import torch

from deris_rerank.rerank.files import load_gate
from deris_rerank.rerank.gate_data import load_gate_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", required=True, help="gate or calibrated re-ranker (.safetensors / .pt)")
    parser.add_argument("--cache", required=True, help="a cache split folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls at batch 1 (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gate, data = load_gate(args.gate), load_gate_data([Path(args.cache)])

    def ms_per_pair(batch: int, k: int) -> float:
        rows = slice((k * batch) % (len(data) - batch), (k * batch) % (len(data) - batch) + batch)
        inputs = (data.query_feat[rows], data.scores[rows], data.mask_stats[rows], data.grid[rows])
        extra = {"text": data.require_text().select(rows)} if gate.reads_text else {}
        start = time.perf_counter()
        gate.decide(*inputs, **extra)
        return 1000 * (time.perf_counter() - start) / batch

    for batch, calls in ((1, args.calls), (8, max(1, args.calls // 4))):
        for k in range(5):
            ms_per_pair(batch, k)
        times = sorted(ms_per_pair(batch, k) for k in range(calls))
        print(f"batch {batch}: median {times[len(times) // 2]:.2f} ms per pair (min {times[0]:.2f}), "
              f"{args.threads} thread(s), {type(gate).__name__}")


if __name__ == "__main__":
    main()
