"""Latency of the whole pipeline on one pair, and peak memory (default: the embedded DeRIS-tiny + gate).

    python bench/pipeline_speed.py
    python bench/pipeline_speed.py --deris weights/deris-l-refcoco --tokenizer weights/beit3.spm --device cuda

Prints the median wall time per pair over --repeats calls after a warm-up (image decoding,
preprocessing, DeRIS, signatures, gate, post-processing: everything `Pipeline.__call__` does),
the median of each stage, the time to build the pipeline, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from deris_rerank import Pipeline

DEMO = Path(__file__).resolve().parents[1] / "demo" / "assets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deris")
    parser.add_argument("--tokenizer")
    parser.add_argument("--gate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", default=str(DEMO / "shapes.png"))
    parser.add_argument("--text", default="the biggest cross")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = Pipeline(deris=args.deris, tokenizer=args.tokenizer, gate=args.gate, device=args.device)
    build = time.perf_counter() - start
    pipe(args.image, args.text)  # warm-up
    walls, stages = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = pipe(args.image, args.text)
        walls.append(1000 * (time.perf_counter() - start))
        stages.append(result.timings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    names = list(stages[0])
    print(f"# {pipe.config.name} + {'gate' if pipe.gate is not None else 'no gate'} on {args.device} "
          f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"pipeline built in {build:.2f} s; peak RSS {peak:.0f} MiB")
    print(f"one pair: median {statistics.median(walls):.1f} ms (min {min(walls):.1f}, max {max(walls):.1f}) over {args.repeats} runs")
    print("stages (median ms): " + ", ".join(f"{n} {statistics.median(s[n] for s in stages):.1f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
