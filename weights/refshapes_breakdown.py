"""Where a model's answers on a RefShapes cache fail, by kind of expression: the no-target pairs
by how the grammar made them, the single-target pairs by expression family.

    python weights/refshapes_breakdown.py --cache CACHE/test --split test --images 1000 --seed 13 \
        [--mode gres] [--size 192] [--gate G.safetensors]

The cache must be one `deris-rerank extract --data refshapes` wrote with the same split, images,
seed, mode and size (its pair ids name the image and the expression, which are generated again
here to read their meaning). No-target expressions are near misses of an object: an attribute
changed ("attribute: colour" when the nearest object differs in its colour only) or a relation
turned around ("relation"). Prints two Markdown tables: for no-target pairs the share answered
empty by DeRIS's own union answer (and by the set re-ranker --gate); for single-target pairs the
mean IoU of Query-0 (and of --gate's answer) and of the best candidate, at the cache's mask size.
"""
import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from deris_rerank.data import RefShapes
from deris_rerank.rerank.files import load_gate
from deris_rerank.rerank.gate_data import load_gate_data
from deris_rerank.workflow.set_evaluation import answers_of
from deris_rerank.workflow.set_metrics import answer_ious
from deris_rerank.workflow.train_calibrated import deris_score_threshold


def no_target_kind(scene, query) -> str:
    """How a no-target query misses: the attribute fields in which the nearest object differs, or its family."""
    if query.kind != "attribute":
        return query.kind
    differing = min(([name for name, value in query.descriptor.named() if getattr(obj, name) != value]
                     for obj in scene.objects), key=len)
    return "attribute: " + ", ".join(differing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a cache split folder written by extract --data refshapes")
    parser.add_argument("--split", required=True)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mode", default="gres", choices=["ris", "gres"])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--gate", help="a set re-ranker whose answers are broken down too")
    args = parser.parse_args()
    data = load_gate_data([Path(args.cache)], masks=True)
    sets = data.require_sets(masks=True)
    refshapes = RefShapes(args.split, num_images=args.images, seed=args.seed, image_size=(args.size, args.size), mode=args.mode)
    union = (data.scores > deris_score_threshold(data)).numpy()
    n = data.scores.shape[1]
    answers = {"DeRIS union": union, "Query-0": np.arange(n)[None, :] == data.default_index.numpy()[:, None]}
    if args.gate:
        answers["set re-ranker"] = answers_of("set re-ranker", load_gate(args.gate), data)["set re-ranker"]
    shown = [name for name in answers if name != "DeRIS union"]  # in the single-target table
    ious = {name: answer_ious(sets, answers[name]) for name in shown}
    best = data.ious.max(dim=1).values.numpy()
    none_rows, single_rows = defaultdict(list), defaultdict(list)
    for row, (pair_id, targets) in enumerate(zip(data.ids, sets.num_targets.tolist())):
        image, k = (int(part) for part in pair_id.rsplit("_", 2)[1:])
        scene = refshapes.scene(image)
        query = scene.expressions[k].query
        if targets == 0:
            none_rows[no_target_kind(scene, query)].append(row)
        elif targets == 1:
            single_rows[query.kind].append(row)
    named = [name for name in answers if name != "Query-0"]
    print("| no-target expression | pairs | " + " | ".join(f"N-acc {name}" for name in named) + " |")
    print("|---|---|" + "---|" * len(named))
    for kind, rows in sorted(none_rows.items(), key=lambda item: -len(item[1])):
        cells = [f"{100 * float((~answers[name][rows].any(axis=1)).mean()):.1f}" for name in named]
        print(f"| {kind} | {len(rows)} | " + " | ".join(cells) + " |")
    print("\n| single-target family | pairs | " + " | ".join(f"mIoU {name}" for name in shown) + " | best candidate |")
    print("|---|---|" + "---|" * (len(shown) + 1))
    for kind, rows in sorted(single_rows.items(), key=lambda item: -len(item[1])):
        cells = [f"{100 * float(ious[name][rows].mean()):.1f}" for name in shown]
        print(f"| {kind} | {len(rows)} | " + " | ".join(cells) + f" | {100 * float(best[rows].mean()):.1f} |")


if __name__ == "__main__":
    main()
