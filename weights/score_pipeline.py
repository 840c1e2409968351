"""Score a pipeline's own answers on a generated RefShapes split, as a user gets them (`Result.mask`
at each image's size), with gRefCOCO's rules (`deris_rerank.workflow.set_metrics`); also DeRIS's
Query-0 and its own union answer on the same pairs.

    python weights/score_pipeline.py --split test-gres --images 1000 --seed 13 --mode gres [--deris D --gate G]
    python weights/score_pipeline.py --split test --images 1000 --seed 13 --mode ris --dtype int8

Prints one JSON line per answer kind with gIoU, cIoU, N-acc, T-acc, gIoU per kind (none / single /
multi), plain mIoU and the share of harmful answers (more than 0.01 IoU below DeRIS's union).
"""
import argparse
import json
import time
import warnings

from deris_rerank import Pipeline
from deris_rerank.data import RefShapes
from deris_rerank.errors import EmbeddedDefaultWarning
from deris_rerank.workflow.set_metrics import score_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deris", help="DeRIS model (default: the embedded default)")
    parser.add_argument("--gate", help="re-ranker file (default: the one beside the model)")
    parser.add_argument("--answer", choices=["single", "set"], help="answer kind (default: the pipeline's)")
    parser.add_argument("--split", required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--mode", default="gres", choices=["ris", "gres"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="precision mode (float32, int8, bfloat16, auto)")
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                        help="onnxruntime: --deris is a folder written by `deris-rerank export-onnx`")
    args = parser.parse_args()
    warnings.simplefilter("ignore", EmbeddedDefaultWarning)
    pipe = Pipeline(deris=args.deris, gate=args.gate, device="cpu", answer=args.answer, dtype=args.dtype, runtime=args.runtime)
    samples = RefShapes(args.split, num_images=args.images, seed=args.seed, image_size=(args.size, args.size), mode=args.mode)
    began = time.perf_counter()
    results = pipe.batch([(s.image, s.text) for s in samples], batch_size=args.batch_size)
    seconds = time.perf_counter() - began
    setting = {"split": args.split, "images": args.images, "seed": args.seed, "mode": args.mode, "pairs": len(samples),
               "dtype": pipe.precision, "runtime": pipe.runtime}
    for name, attribute in ((f"pipeline ({pipe.answer})", "mask"), ("Query-0", "default_mask"), ("DeRIS union", "deris_mask")):
        metrics = score_results(results, samples, answer=attribute)
        print(json.dumps({"answer": name, **setting, **{k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}}))
    print(json.dumps({"seconds": round(seconds, 1), "ms_per_pair": round(1000 * seconds / len(samples), 1)}))


if __name__ == "__main__":
    main()
