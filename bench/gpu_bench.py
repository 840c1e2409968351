"""The GPU table of `bench/gpu_check.sh`: DeRIS-L and DeRIS-B with random weights, and the pipeline.

    python bench/gpu_bench.py OUT_DIR [--budget-s 330]

For each model (deris-l-refcoco, deris-b-refcoco), dtype (float32, bfloat16 autocast) and
compilation (eager, torch.compile): batch-1 latency (median ms per call) and throughput
(pairs/s) at batch 16 and 32, peak GPU memory, and the compile time. Then the end-to-end
pipeline time for one pair (DeRIS-L, random weights, no gate) and for the embedded default.
Writes OUT_DIR/gpu_table.md and OUT_DIR/gpu_table.json and prints the table. Rows that do not
fit the time budget are reported as skipped, never silently dropped. Exits 0 with "no CUDA
device" when there is none.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ("deris-l-refcoco", "deris-b-refcoco")
DTYPES = ("float32", "bfloat16")
BATCHES = (1, 16, 32)


def synchronize() -> None:
    torch.cuda.synchronize()


def inputs(config, batch: int, device):
    generator = torch.Generator().manual_seed(0)
    image_hi = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator).to(device)
    image_lo = torch.randn(batch, 3, config.image_size_lo, config.image_size_lo, generator=generator).to(device)
    tokens = torch.randint(4, 1000, (batch, config.max_tokens), generator=generator).to(device)
    padding = torch.zeros(batch, config.max_tokens, dtype=torch.long, device=device)
    padding[:, 12:] = 1
    return image_hi, image_lo, tokens, padding


def timed_calls(run, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return times


def measure_model(name: str, dtype: str, compiled: bool, deadline: float) -> dict:
    from deris_rerank.deris.config import DerisConfig
    from deris_rerank.deris.model import DerisModel
    from deris_rerank.devices import store_for_autocast

    config = DerisConfig.preset(name)
    torch.manual_seed(0)
    model = DerisModel(config).cuda().eval()
    if dtype == "bfloat16":  # as the pipeline runs its fast mode
        store_for_autocast(model, torch.bfloat16)
    forward = model
    compile_s = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    row = {"model": name, "dtype": dtype, "compiled": compiled}
    if compiled:
        forward = torch.compile(model)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), autocast:
        for batch in BATCHES:
            if time.perf_counter() > deadline:
                row[f"batch{batch}"] = "skipped (time budget)"
                continue
            args = inputs(config, batch, "cuda")
            start = time.perf_counter()
            forward(*args)  # warm-up (compiles when compiled)
            synchronize()
            if compiled and compile_s is None:
                compile_s = time.perf_counter() - start
            times = timed_calls(lambda: forward(*args), 10 if batch == 1 else 5)
            median = statistics.median(times)
            row[f"batch{batch}"] = {"median_ms": median, "pairs_per_s": 1000 * batch / median}
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["compile_s"] = compile_s
    return row


def measure_pipeline(deris, text: str, image) -> dict:
    from deris_rerank import Pipeline

    pipe = Pipeline(deris=deris, gate=None if deris is None else False, device="cuda")
    pipe(image, text)
    walls = []
    for _ in range(10):
        synchronize()
        start = time.perf_counter()
        pipe(image, text)
        synchronize()
        walls.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(walls), "min_ms": min(walls)}


def random_model_folder(name: str, folder: Path) -> Path:
    """A converted-format folder with random weights for preset `name` and a toy tokenizer."""
    import sentencepiece

    from deris_rerank.checkpoints import save_deris
    from deris_rerank.deris.config import DerisConfig
    from deris_rerank.deris.model import DerisModel

    torch.manual_seed(0)
    save_deris(DerisModel(DerisConfig.preset(name)), folder)
    corpus = folder / "corpus.txt"
    corpus.write_text("man on the left\nthe red car\nwoman on the right\nsmall dog next to the blue bag\n" * 20)
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=40,
                                             model_type="bpe", minloglevel=2)
    (folder / "tok.model").rename(folder / "tokenizer.model")
    return folder


def markdown(rows: list, pipelines: dict, device: str) -> str:
    lines = [f"GPU: {device}; torch {torch.__version__}; random weights; medians after a warm-up", "",
             "| model | dtype | compile | batch 1 ms | batch 16 pairs/s | batch 32 pairs/s | peak GiB | compile s |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(value, key):
        return value if isinstance(value, str) else f"{value[key]:.1f}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'} | error: {r['error']} | | | | |")
            continue
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {cell(r['batch1'], 'median_ms')} "
                     f"| {cell(r['batch16'], 'pairs_per_s')} | {cell(r['batch32'], 'pairs_per_s')} | {r['peak_gib']:.2f} | {compile_s} |")
    lines += ["", "| pipeline, one pair end to end | median ms | min ms |", "|---|---|---|"]
    for name, value in pipelines.items():
        lines.append(f"| {name} | {value} | |" if isinstance(value, str) else f"| {name} | {value['median_ms']:.1f} | {value['min_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting new rows after this many seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    device = torch.cuda.get_device_name()
    rows = []
    for name in MODELS:
        for dtype in DTYPES:
            for compiled in (False, True):
                if time.perf_counter() > deadline:
                    rows.append({"model": name, "dtype": dtype, "compiled": compiled, "error": "skipped (time budget)"})
                    continue
                try:
                    rows.append(measure_model(name, dtype, compiled, deadline))
                except Exception as exc:  # report and go on: one failing configuration must not hide the others
                    rows.append({"model": name, "dtype": dtype, "compiled": compiled, "error": f"{type(exc).__name__}: {exc}"[:200]})
                torch.cuda.empty_cache()
                print(json.dumps(rows[-1]), flush=True)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pipelines = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, make in (("DeRIS-L (random weights, no gate)", lambda: random_model_folder("deris-l-refcoco", Path(scratch) / "l")),
                            ("embedded default (DeRIS-tiny + gate)", lambda: None)):
            try:
                pipelines[label] = measure_pipeline(make(), "man on the left", image)
            except Exception as exc:
                pipelines[label] = f"error: {type(exc).__name__}: {exc}"[:200]
    table = markdown(rows, pipelines, device)
    (args.out / "gpu_table.md").write_text(table)
    (args.out / "gpu_table.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "models": rows,
                                                         "pipelines": pipelines}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
