"""Latency of the whole pipeline on one pair, and peak memory (default: the embedded DeRIS-tiny + gate).

    python bench/pipeline_speed.py
    python bench/pipeline_speed.py --deris weights/deris-l-refcoco --tokenizer weights/beit3.spm --device cuda
    python bench/pipeline_speed.py --random-deris deris-l-refcoco --no-gate --dtype bfloat16 --repeats 5

Prints the median wall time per pair over --repeats calls after a warm-up (image decoding,
preprocessing, DeRIS, signatures, gate, post-processing: everything `Pipeline.__call__` does),
the median of each stage, the time to build the pipeline, the process's peak RSS and, on Linux,
its resident memory at the end split into its own (RssAnon) and files mapped from disk
(RssFile: e.g. float32 weights read straight from their safetensors file). --random-deris PRESET
saves a seeded random DeRIS of that size (`save_deris`) in a temporary folder and loads it from
there as a user's converted checkpoint would be (with the embedded default's tokenizer; no gate
fits it unless --gate names one).
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deris_rerank import Pipeline
from deris_rerank.model_files import DEFAULT_MODEL

DEMO = Path(__file__).resolve().parents[1] / "demo" / "assets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deris")
    parser.add_argument("--tokenizer")
    parser.add_argument("--gate")
    parser.add_argument("--no-gate", action="store_true", help="DeRIS's own Query-0, no re-ranker")
    parser.add_argument("--random-deris", metavar="PRESET", help="a seeded random DeRIS of this preset instead of --deris")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--image", default=str(DEMO / "shapes.png"))
    parser.add_argument("--text", default="the biggest cross")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        deris, tokenizer = args.deris, args.tokenizer
        if args.random_deris:
            deris, tokenizer = save_random_deris(args.random_deris, Path(scratch)), tokenizer or DEFAULT_MODEL / "tokenizer.model"
        start = time.perf_counter()
        pipe = Pipeline(deris=deris, tokenizer=tokenizer, gate=False if args.no_gate else args.gate,
                        device=args.device, dtype=args.dtype)
        build = time.perf_counter() - start
        return measure(pipe, args, build)


def save_random_deris(preset: str, folder: Path) -> Path:
    """A seeded random DeRIS of `preset`, saved in our folder format under `folder` by a child
    process (so that building it does not count in this process's peak memory)."""
    code = ("import sys, torch; from deris_rerank.checkpoints import save_deris; "
            "from deris_rerank.deris.config import DerisConfig; from deris_rerank.deris.model import DerisModel; "
            "torch.manual_seed(0); save_deris(DerisModel(DerisConfig.preset(sys.argv[1])), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, preset, str(folder / preset)], check=True)
    return folder / preset


def resident_memory() -> str:
    """RssAnon and RssFile from /proc/self/status (Linux), in MiB; empty elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return ""
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return "; resident now: " + ", ".join(f"{name} {int(fields[name].split()[0]) / 1024:.0f} MiB"
                                          for name in ("RssAnon", "RssFile") if name in fields)


def measure(pipe: Pipeline, args: argparse.Namespace, build: float) -> int:
    """Time --repeats calls on one pair after a warm-up and print the figures."""
    pipe(args.image, args.text)  # warm-up
    walls, stages = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = pipe(args.image, args.text)
        walls.append(1000 * (time.perf_counter() - start))
        stages.append(result.timings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    names = list(stages[0])
    print(f"# {pipe.config.name} + {'gate' if pipe.gate is not None else 'no gate'} on {args.device}, {args.dtype} "
          f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"pipeline built in {build:.2f} s; peak RSS {peak:.0f} MiB{resident_memory()}")
    print(f"one pair: median {statistics.median(walls):.1f} ms (min {min(walls):.1f}, max {max(walls):.1f}) over {args.repeats} runs")
    print("stages (median ms): " + ", ".join(f"{n} {statistics.median(s[n] for s in stages):.1f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
