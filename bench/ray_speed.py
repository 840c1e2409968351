"""Pairs per second of `batch` on the local engine and on the Ray engine with 1 and 2 replicas.

    python bench/ray_speed.py                      # the embedded default on generated RefShapes pairs
    python bench/ray_speed.py --pairs 400 --replicas 1 2 4 --batch-size 8

Makes a manifest of about --pairs pairs (RefShapes images, 2-4 expressions each), then runs it
into fresh output folders, --repeats times with the engines taking turns (medians reported), with:
the local engine at 1 torch thread and at all cores; the Ray
engine (one local Ray started once, its start-up timed apart) with each --replicas count, the
cores shared out between the replicas (a quarter CPU kept for decoding). For each run:

    total       wall time of the whole call (Ray: probe, actors' start, the job, the writing)
    steady      pairs/s between the first and the last written result (start-up left out)
    ms/pair     1000 / steady pairs/s

Ray's overhead per pair is the Ray engine's ms/pair with 1 replica minus the local engine's at the
same thread count; its fixed cost is its total minus pairs / steady rate. Every engine must also
give the same results: the script checks the results' content against the local 1-thread run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from deris_rerank import batch as batch_module
from deris_rerank.batch import read_manifest, run_batch
from deris_rerank.data import RefShapes


def make_manifest(folder: Path, pairs: int) -> Path:
    """About `pairs` RefShapes pairs (128 x 128 images) as a JSONL manifest in `folder`."""
    rows = []
    for sample in RefShapes("bench", num_images=pairs // 2 + 1, seed=11, image_size=(128, 128))[:pairs]:
        name = f"{sample.image_id}.png"
        if not (folder / name).exists():
            Image.fromarray(sample.load_image()).save(folder / name)
        rows.append({"image": name, "text": sample.text, "id": sample.id})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class WriteClock:
    """Records the time of each result the engines write (wraps BatchOutput.write once); `reset` starts anew."""

    def __init__(self):
        self.times = []
        original = batch_module.BatchOutput.write

        def write(output, item, record, mask):
            original(output, item, record, mask)
            self.times.append(time.perf_counter())

        batch_module.BatchOutput.write = write

    def reset(self) -> "WriteClock":
        self.times = []
        return self

    def steady_rate(self) -> float:
        """Results per second from the first written result to the last (None for < 2)."""
        if len(self.times) < 2 or self.times[-1] == self.times[0]:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def content(out: Path) -> list:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "timings_ms"} for r in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine, taking turns (default 3)")
    parser.add_argument("--keep", help="keep the manifest and outputs in this folder")
    args = parser.parse_args()

    import ray

    from deris_rerank import Pipeline
    from deris_rerank.distributed import DECODE_CPUS, PipelineSpec, Resources
    from deris_rerank.distributed import run_batch as run_batch_ray

    warnings.simplefilter("ignore")
    cores = os.cpu_count()
    root = Path(args.keep or tempfile.mkdtemp(prefix="ray_speed_"))
    root.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(root, args.pairs)
    items = read_manifest(manifest)
    print(f"# {len(items)} pairs over {len({i.image for i in items})} images, batch size {args.batch_size}; "
          f"{platform.machine()}, {cores} cores, torch {torch.__version__}, ray {ray.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rows, reference, clock = {}, None, WriteClock()

    def measure(name, threads, run):
        """Run `run` (a fresh output folder each time) --repeats times; record (totals, steady rates)."""
        totals, rates = rows.setdefault(name, ([], [], threads))[:2]
        clock.reset()
        start = time.perf_counter()
        out = run()
        totals.append(time.perf_counter() - start)
        rates.append(clock.steady_rate())
        return out

    pipes = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        pipes[threads] = Pipeline()
        run_batch(pipes[threads], items[: args.batch_size], root / "warm-up", batch_size=args.batch_size, progress=False)
    torch.set_num_threads(cores)
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="error")
    ray_start = time.perf_counter() - start
    start = time.perf_counter()
    run_batch_ray(items[:16], root / "ray-warm-up", PipelineSpec(), Resources(replicas=1), batch_size=args.batch_size,
                  progress=False)
    cold = time.perf_counter() - start

    for repeat in range(args.repeats):  # the engines take turns, so a busy spell of the machine hits all of them
        for threads, pipe in pipes.items():
            torch.set_num_threads(threads)
            out = root / f"local-{threads}-{repeat}"
            measure(f"local, {threads} thread(s)", threads,
                    lambda: run_batch(pipe, items, out, batch_size=args.batch_size, progress=False))
            if threads == 1 and reference is None:
                reference = content(out)
        torch.set_num_threads(cores)
        for replicas in args.replicas:
            cpus = min(1.0, (cores - DECODE_CPUS) / replicas)
            out = root / f"ray-{replicas}-{repeat}"
            measure(f"ray, {replicas} replica(s) x {cpus:g} CPU", max(1, int(cpus)), lambda: run_batch_ray(
                items, out, PipelineSpec(), Resources(replicas=replicas, cpus_per_replica=cpus),
                batch_size=args.batch_size, progress=False))
            if content(out) != reference:
                print(f"note: ray with {replicas} replica(s) differs from the local 1-thread run", flush=True)
    ray.shutdown()

    print("| engine | torch threads per model | total s (median) | steady pairs/s (median; min-max) | ms/pair |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, (totals, rates, threads) in rows.items():
        medians[name] = (statistics.median(totals), statistics.median(rates))
        print(f"| {name} | {threads} | {medians[name][0]:.1f} | {medians[name][1]:.1f} ({min(rates):.1f}-{max(rates):.1f}) "
              f"| {1000 / medians[name][1]:.1f} |")
    local = medians["local, 1 thread(s)"]
    one = next(v for k, v in medians.items() if k.startswith("ray, 1 replica"))
    print(f"\nlocal Ray start-up (ray.init): {ray_start:.1f} s; first Ray run on it (16 pairs, cold workers): {cold:.1f} s")
    print(f"Ray's overhead per pair (1 replica vs local, 1 thread each, steady): {1000 / one[1] - 1000 / local[1]:.1f} ms")
    print(f"Ray's fixed cost per run (1 replica: total - pairs / steady rate): {one[0] - len(items) / one[1]:.1f} s")
    print("results: every Ray run above equals the local 1-thread run (content, timings aside) unless a note says otherwise")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
