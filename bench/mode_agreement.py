"""Whether a re-ranker's answers change with the precision mode: the same pairs through `Pipeline`
in float32 and in each other mode, compared answer by answer.

    python bench/mode_agreement.py --gate ../shared/reference/venice_A/packaged_style.pt \
        --random-deris deris-l-refcoco --modes int8 onnxruntime --pairs 20
    python bench/mode_agreement.py --modes int8 onnxruntime --pairs 200     # the embedded default and its re-ranker

Pairs: the first --pairs of RefShapes (`test` split, seed 13, single-target expressions, 256 px).
DeRIS is --deris (a folder or preset path), or with --random-deris PRESET a seeded random DeRIS of
that size saved as a converted checkpoint (bench/pipeline_speed.py's); the re-ranker is --gate
(default: the model folder's own, as `Pipeline` finds it). onnxruntime runs the model exported by
`export_onnx` into a temporary folder. For each mode against float32, prints the share of pairs
whose answer is the same (the chosen candidate ranks), whose DeRIS top candidate (Query-0) is the
same and whose re-ranker switched the same way, the mean IoU of the two answers' masks, and the
largest difference of the re-ranker's failure probability.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from deris_rerank import Pipeline
from deris_rerank.data.refshapes.dataset import RefShapes
from deris_rerank.model_files import DEFAULT_MODEL, resolve_deris, resolve_gate, resolve_tokenizer
from deris_rerank.onnx_export import export_onnx
from deris_rerank.checkpoints import load_deris
from pipeline_speed import save_random_deris


def answers(pipe: Pipeline, pairs) -> list:
    return [pipe(image, text) for image, text in pairs]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(reference: list, other: list) -> dict:
    same = np.mean([r.selected_ranks == o.selected_ranks if r.selected_ranks is not None else r.selected_rank == o.selected_rank
                    for r, o in zip(reference, other)])
    query0 = np.mean([int(np.argmax(r.scores)) == int(np.argmax(o.scores)) for r, o in zip(reference, other)])
    switched = np.mean([r.switched == o.switched for r, o in zip(reference, other)])
    iou = np.mean([mask_iou(r.mask, o.mask) for r, o in zip(reference, other)])
    p_fail = max((abs(r.p_fail - o.p_fail) for r, o in zip(reference, other) if r.p_fail is not None), default=float("nan"))
    return {"same answer": same, "same Query-0": query0, "same switch": switched, "answer IoU": iou, "largest p_fail diff": p_fail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deris", help="DeRIS model (default: the embedded default)")
    parser.add_argument("--random-deris", metavar="PRESET", help="a seeded random DeRIS of this preset instead of --deris")
    parser.add_argument("--tokenizer")
    parser.add_argument("--gate", help="re-ranker file (default: the model folder's own)")
    parser.add_argument("--modes", nargs="+", default=["int8", "onnxruntime"],
                        help="modes compared with float32: int8, bfloat16, onnxruntime")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = RefShapes("test", num_images=max(1, args.pairs), seed=13, mode="ris")
    pairs = [(sample.load_image(), sample.text) for sample in data[: args.pairs]]
    with tempfile.TemporaryDirectory() as scratch:
        deris, tokenizer = args.deris or DEFAULT_MODEL, args.tokenizer
        if args.random_deris:
            deris, tokenizer = save_random_deris(args.random_deris, Path(scratch)), tokenizer or DEFAULT_MODEL / "tokenizer.model"
        deris = resolve_deris(deris)  # the tokenizer and re-ranker found once, beside it: the export has neither
        settings = {"tokenizer": resolve_tokenizer(tokenizer, deris), "gate": resolve_gate(args.gate, deris), "device": "cpu"}
        reference = answers(Pipeline(deris=deris, dtype="float32", **settings), pairs)
        print(f"# {args.random_deris or deris}, re-ranker {settings['gate']}, {len(pairs)} RefShapes "
              f"test pairs, {args.threads} threads; each mode against float32")
        print("| mode | same answer | same Query-0 | same switch | answer IoU | largest p_fail diff |")
        print("|---|---|---|---|---|---|")
        for mode in args.modes:
            if mode == "onnxruntime":
                folder = export_onnx(load_deris(deris), Path(scratch) / "onnx")
                pipe = Pipeline(deris=folder, runtime="onnxruntime", **settings)
            else:
                pipe = Pipeline(deris=deris, dtype=mode, **settings)
            row = compare(reference, answers(pipe, pairs))
            print(f"| {mode} | {row['same answer']:.0%} | {row['same Query-0']:.0%} | {row['same switch']:.0%} | "
                  f"{row['answer IoU']:.4f} | {row['largest p_fail diff']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
