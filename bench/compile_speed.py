"""Eager against `torch.compile` for one DeRIS preset (random weights, batch 1, float32): compile
time, agreement and time per pair, the two alternating.

    python bench/compile_speed.py --preset deris-l-refcoco --threads 2 --repeats 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from deris_rerank.deris.config import DerisConfig
from deris_rerank.deris.model import DerisModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deris-l-refcoco", help="DeRIS preset (default deris-l-refcoco)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=4, help="timed calls of each (default 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = DerisConfig.preset(args.preset)
    torch.manual_seed(0)
    model = DerisModel(config).eval()
    inputs = (torch.randn(1, 3, config.image_size, config.image_size),
              torch.randn(1, 3, config.image_size_lo, config.image_size_lo),
              torch.randint(4, min(1000, config.beit3.vocab_size), (1, config.max_tokens)),
              (torch.arange(config.max_tokens) >= 8).long()[None])
    compiled = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        reference = model(*inputs)
        start = time.perf_counter()
        output = compiled(*inputs)
        print(f"# {args.preset}, {args.threads} threads, torch {torch.__version__}")
        print(f"compile + first call: {time.perf_counter() - start:.1f} s")
        print(f"max |difference|: mask logits {(output.mask_logits - reference.mask_logits).abs().max().item():.2e}, "
              f"scores {(output.scores - reference.scores).abs().max().item():.2e}")
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, run in (("eager", model), ("compiled", compiled)):
                start = time.perf_counter()
                run(*inputs)
                times[name].append(1000 * (time.perf_counter() - start))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.0f} ms per pair (min {min(values):.0f}, max {max(values):.0f})")


if __name__ == "__main__":
    main()
