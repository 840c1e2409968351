"""Time each DeRIS stage with random weights and report peak memory.

    python bench/deris_speed.py --preset deris-l-refcoco --batch 1 8
    python bench/deris_speed.py --preset deris-b-refcoco --device cuda --dtype bfloat16

Stages: preprocess (cv2 decode + both resizes + normalise, per image), swin, pixel_decoder,
beit3 (incl. projections), decoder (4 loopback rounds), aligner, upsample (stride-4 -> 384 logits)
and postprocess (DeRIS's own answer mask at the original size). Prints a Markdown table and,
with --json, writes the numbers. Peak memory: process peak RSS on CPU (getrusage), peak
allocated CUDA memory on GPU. Timings are medians over --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from deris_rerank.deris.config import DerisConfig
from deris_rerank.deris.model import DerisModel
from deris_rerank.candidates import deris_answer_mask
from deris_rerank.images import load_image
from deris_rerank.transforms import prepare_images, resize_mask_nearest
from deris_rerank.timing import StageTimer

STAGES = ("preprocess", "swin", "pixel_decoder", "beit3", "decoder", "aligner", "upsample", "postprocess")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def weights_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def one_run(model, config, image_path, batch, device, dtype) -> StageTimer:
    timer = StageTimer(device)
    with timer("preprocess"):
        pairs = [prepare_images(load_image(image_path), config.image_size, config.image_size_lo) for _ in range(batch)]
        image_hi = torch.stack([p[0] for p in pairs]).to(device, dtype)
        image_lo = torch.stack([p[1] for p in pairs]).to(device, dtype)
    tokens = torch.randint(4, 1000, (batch, config.max_tokens), device=device)
    padding = torch.zeros(batch, config.max_tokens, dtype=torch.long, device=device)
    padding[:, 12:] = 1
    tokens[:, 11] = 2
    out = model(image_hi, image_lo, tokens, padding, timer=timer)
    with timer("postprocess"):
        answer = deris_answer_mask(out.mask_logits, out.scores, config.score_threshold)
        resize_mask_nearest(answer.cpu(), (480, 640))
    return timer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deris-l-refcoco")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = DerisConfig.preset(args.preset)

    rss_before = peak_rss_gib()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = DerisModel(config).to(device, dtype).eval()
    build_s = time.perf_counter() - start
    build = {"seconds": build_s, "weights_gib": weights_gib(model), "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss_before}

    image_path = Path("/tmp/deris_bench_image.jpg")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image_path), rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))

    results = []
    with torch.inference_mode():
        for batch in args.batch:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            one_run(model, config, image_path, batch, device, dtype)  # warm-up
            runs = [one_run(model, config, image_path, batch, device, dtype).ms for _ in range(args.repeats)]
            median = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES}
            total = statistics.median(sum(r.values()) for r in runs)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
            results.append({"batch": batch, "stage_ms": median, "total_ms": total, "ms_per_pair": total / batch, "peak_gib": peak})

    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(f"# {args.preset}, {args.dtype}, {args.device} ({machine['device']}, {machine['threads']} threads, torch {machine['torch']})")
    print(f"built in {build_s:.1f} s; weights {build['weights_gib']:.2f} GiB; peak RSS after build {build['peak_rss_gib']:.2f} GiB")
    print("| batch | " + " | ".join(STAGES) + " | total ms | ms/pair | peak GiB |")
    print("|---" * (len(STAGES) + 4) + "|")
    for r in results:
        cells = " | ".join(f"{r['stage_ms'][s]:.0f}" for s in STAGES)
        print(f"| {r['batch']} | {cells} | {r['total_ms']:.0f} | {r['ms_per_pair']:.0f} | {r['peak_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "dtype": args.dtype, "machine": machine, "build": build, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
