"""Time each DeRIS stage with random weights, float32 and the other precision modes side by side,
with peak memory and agreement.

    python bench/deris_speed.py --preset deris-l-refcoco --batch 1 8
    python bench/deris_speed.py --preset deris-l-refcoco --batch 1 --dtypes float32 int8 bfloat16 --repeats 5
    python bench/deris_speed.py --preset deris-l-refcoco --batch 1 --dtypes float32 int8 onnxruntime onnxruntime-int8
    python bench/deris_speed.py --preset deris-b-refcoco --device cuda --dtypes float32 bfloat16

Stages: preprocess (cv2 decode + both resizes + normalise, per image), swin, pixel_decoder,
beit3 (incl. projections), decoder (4 loopback rounds), aligner, upsample (stride-4 -> 384 logits)
and postprocess (DeRIS's own answer mask at the original size). The model is float32; each
dtype after the first runs as the pipeline runs it, on a copy of the model
(`devices.convert_for_precision`: autocast with linear/conv weights stored in that dtype, or int8
linear layers; onnxruntime: the model exported by `onnx_export.export_onnx` into a temporary
folder and run by `OnnxDeris`, its stages image_encoder and expression; onnxruntime-int8: that
export through onnxruntime's own dynamic int8 quantisation, `quantize_dynamic` with QInt8
weights), and the dtypes alternate call by call so that all see the same machine state.
Prints, per batch size and dtype, the median (min, max) ms per pair, each stage's median and the
ratio to the first dtype, and for every further dtype its agreement with the first over
--agreement-inputs random pairs (random image and tokens each): the share of mask pixels
binarised differently, the largest referring-score difference and the share of pairs whose top
candidate is the same. With --json, writes the numbers. Memory: each mode's weights, and the process peak RSS on CPU (getrusage: all modes'
models together), peak allocated CUDA memory on GPU.
Timings are over --repeats calls per dtype after one warm-up each.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from deris_rerank.candidates import deris_answer_mask
from deris_rerank.deris.config import DerisConfig
from deris_rerank.deris.model import DerisModel
from deris_rerank.devices import autocast_dtype_of, bfloat16_emulation, convert_for_precision, precision, resolve_precision
from deris_rerank.precision_choice import cpu_name, synthetic_pair
from deris_rerank.images import load_image
from deris_rerank.timing import StageTimer
from deris_rerank.transforms import prepare_images, resize_mask_nearest

STAGES = ("preprocess", "swin", "pixel_decoder", "image_encoder", "beit3", "decoder", "aligner", "expression", "upsample",
          "postprocess")
ONNX_MODES = ("onnxruntime", "onnxruntime-int8")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def weights_gib(model: torch.nn.Module) -> float:
    """The model's stored weights, GiB: parameters, buffers and int8 layers' packed weights and biases
    (an OnnxDeris: its graph files)."""
    if not isinstance(model, torch.nn.Module):
        return sum(f.stat().st_size for f in model.folder.glob("*.onnx*")) / 2**30
    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return sum(nbytes(v) for v in value) if isinstance(value, (tuple, list)) else 0
    return sum(nbytes(v) for v in model.state_dict().values()) / 2**30


def one_run(model, config, image_path, batch, device, autocast_dtype):
    """(stage timer, outputs) of one call on `batch` copies of the image."""
    timer = StageTimer(device)
    with timer("preprocess"):
        pairs = [prepare_images(load_image(image_path), config.image_size, config.image_size_lo) for _ in range(batch)]
        image_hi = torch.stack([p[0] for p in pairs]).to(device)
        image_lo = torch.stack([p[1] for p in pairs]).to(device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, min(1000, config.beit3.vocab_size - 1), (batch, config.max_tokens), generator=generator).to(device)
    padding = torch.zeros(batch, config.max_tokens, dtype=torch.long, device=device)
    padding[:, 12:] = 1
    tokens[:, 11] = 2
    with precision(device, autocast_dtype):
        out = model(image_hi, image_lo, tokens, padding, timer=timer)
    with timer("postprocess"):
        answer = deris_answer_mask(out.mask_logits, out.scores, config.score_threshold)
        resize_mask_nearest(answer.cpu(), (480, 640))
    return timer, out


def agreement(models, reference_mode, mode, config, device, inputs: int) -> dict:
    """Over `inputs` random pairs: the share of mask pixels binarised differently (logit >= 0), the
    largest referring-score difference, and the share of pairs with the same top candidate."""
    differing, score_diff, same_top = [], 0.0, []
    for seed in range(inputs):
        pair = synthetic_pair(config, device)
        generator = torch.Generator().manual_seed(1000 + seed)
        pair["image_hi"] = torch.randn(pair["image_hi"].shape, generator=generator).to(device)
        pair["image_lo"] = torch.randn(pair["image_lo"].shape, generator=generator).to(device)
        pair["tokens"][:, 1:11] = torch.randint(4, min(1000, config.beit3.vocab_size - 1), (1, 10), generator=generator)
        outs = []
        for name in (reference_mode, mode):
            with precision(device, autocast_dtype_of(name)):
                outs.append(models[name](**pair))
        want, got = outs
        differing.append(float(((want.mask_logits.float() >= 0) != (got.mask_logits.float() >= 0)).float().mean()))
        score_diff = max(score_diff, float((want.scores.float() - got.scores.float()).abs().max()))
        same_top.append(bool((want.scores.argmax(-1) == got.scores.argmax(-1)).all()))
    return {"inputs": inputs, "mask_pixels_differing": float(np.mean(differing)), "max_score_diff": score_diff,
            "same_top_candidate": float(np.mean(same_top))}


def onnx_model(model, mode: str, device, build: dict):
    """`model` exported to ONNX in a temporary folder (and for onnxruntime-int8 quantised there), as
    an OnnxDeris; the export's seconds go into `build`."""
    import tempfile

    from deris_rerank.onnx_export import EXPRESSION_FILE, IMAGE_ENCODER_FILE, export_onnx
    from deris_rerank.onnx_runtime import OnnxDeris

    folder = Path(tempfile.mkdtemp(prefix="deris_bench_onnx_")) / "model"
    began = time.perf_counter()
    export_onnx(model, folder)
    build["onnx_export_seconds"] = time.perf_counter() - began
    if mode == "onnxruntime-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        sidecar = json.loads((folder / "config.json").read_text())
        for name in (IMAGE_ENCODER_FILE, EXPRESSION_FILE):
            quantize_dynamic(str(folder / name), str(folder / f"int8-{name}"), weight_type=QuantType.QInt8)
            (folder / f"int8-{name}").replace(folder / name)
        sidecar["sha256"] = {}  # the quantised files are not the checked export
        (folder / "config.json").write_text(json.dumps(sidecar))
    began = time.perf_counter()
    runner = OnnxDeris(folder, device)
    build[f"{mode}_session_seconds"] = time.perf_counter() - began
    return runner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deris-l-refcoco")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per dtype and batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16", "int8", *ONNX_MODES],
                        help="the first is the reference; the others run as the pipeline runs them")
    parser.add_argument("--agreement-inputs", type=int, default=20, help="random pairs each mode's agreement is measured on")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = {name: None if name in ONNX_MODES else autocast_dtype_of(resolve_precision(name, device)) for name in args.dtypes}
    config = DerisConfig.preset(args.preset)

    rss_before = peak_rss_gib()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = DerisModel(config).to(device).eval()
    build_s = time.perf_counter() - start
    build = {"seconds": build_s, "weights_gib": weights_gib(model), "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss_before}

    image_path = Path("/tmp/deris_bench_image.jpg")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image_path), rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    # as the pipeline runs them: each other mode on a converted copy
    models = {name: model if name == "float32" else onnx_model(model, name, device, build) if name in ONNX_MODES
              else convert_for_precision(copy.deepcopy(model), name) for name in args.dtypes}

    results = []
    with torch.inference_mode():
        for batch in args.batch:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for name in args.dtypes:  # warm-up
                one_run(models[name], config, image_path, batch, device, autocast[name])
            runs = {name: [] for name in args.dtypes}
            for _ in range(args.repeats):
                for name in args.dtypes:  # alternate, so that both dtypes see the same machine state
                    runs[name].append(one_run(models[name], config, image_path, batch, device, autocast[name])[0].ms)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
            reference = None
            for name in args.dtypes:
                per_pair = [sum(r.values()) / batch for r in runs[name]]
                row = {
                    "batch": batch, "dtype": name,
                    "stage_ms": {s: statistics.median(r.get(s, 0.0) for r in runs[name]) for s in STAGES},
                    "ms_per_pair": statistics.median(per_pair), "min_ms_per_pair": min(per_pair),
                    "max_ms_per_pair": max(per_pair), "peak_gib": peak, "weights_gib": weights_gib(models[name]),
                }
                if reference is None:
                    reference = row
                else:
                    row["ratio_to_first"] = row["ms_per_pair"] / reference["ms_per_pair"]
                    row["agreement_with_first"] = agreement(models, args.dtypes[0], name, config, device, args.agreement_inputs)
                results.append(row)

    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        # the bfloat16 figures hold only where its matmuls are native (AVX-512 BF16, AMX; CUDA)
        "bfloat16": "native" if device.type == "cuda" or bfloat16_emulation() is None else f"emulated: {bfloat16_emulation()}",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(f"# {args.preset}, {args.device} ({machine['device']}, {machine['threads']} threads, torch {machine['torch']}, "
          f"bfloat16 {machine['bfloat16']}), {args.repeats} alternating calls per dtype")
    print(f"built in {build_s:.1f} s; weights {build['weights_gib']:.2f} GiB; peak RSS after build {build['peak_rss_gib']:.2f} GiB")
    print("| batch | dtype | " + " | ".join(STAGES) + " (ms per pair) | ms/pair median (min-max) | ratio | weights GiB | peak GiB |")
    print("|---" * (len(STAGES) + 6) + "|")
    for r in results:
        cells = " | ".join(f"{r['stage_ms'][s] / r['batch']:.0f}" for s in STAGES)
        ratio = f"{r['ratio_to_first']:.2f}" if "ratio_to_first" in r else "1"
        print(f"| {r['batch']} | {r['dtype']} | {cells} | {r['ms_per_pair']:.0f} ({r['min_ms_per_pair']:.0f}-"
              f"{r['max_ms_per_pair']:.0f}) | {ratio} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} |")
    for r in results:
        if "agreement_with_first" in r:
            a = r["agreement_with_first"]
            print(f"batch {r['batch']} {r['dtype']} vs {args.dtypes[0]} over {a['inputs']} random pairs: "
                  f"{100 * a['mask_pixels_differing']:.3f}% of mask pixels binarised differently, largest score difference "
                  f"{a['max_score_diff']:.4f}, same top candidate on {100 * a['same_top_candidate']:.0f}%")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "machine": machine, "build": build, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
