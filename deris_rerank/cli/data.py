"""`deris-rerank refshapes`: write generated RefShapes scenes (the embedded default's kind of image) to a folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_refshapes(args: argparse.Namespace) -> int:
    """Write OUT/images/*.png, OUT/refshapes.json (for extract --data) and OUT/manifest.jsonl (for batch --manifest)."""
    from ..data.refshapes import RefShapes, write_refshapes
    from ..errors import InputError

    if args.images < 1:
        raise InputError(f"--images must be at least 1, got {args.images}")
    dataset = RefShapes(args.split, num_images=args.images, seed=args.seed, image_size=(args.size, args.size), mode=args.mode)
    annotations = write_refshapes(Path(args.out), [dataset])
    print(json.dumps({"images": str(Path(args.out) / "images"), "pairs": len(dataset), "annotations": str(annotations),
                      "manifest": str(Path(args.out) / "manifest.jsonl")}))
    return 0


def add_commands(commands) -> None:
    """Add `refshapes` to the `deris-rerank` subcommands."""
    refshapes = commands.add_parser(
        "refshapes",
        help="write generated RefShapes scenes and their expressions (images the embedded default knows)",
        description="Generates RefShapes scenes (coloured shapes; 2-4 expressions each) and writes OUT/images/<id>.png, "
        "OUT/refshapes.json (annotations with target masks, for `extract --data OUT/refshapes.json --images OUT/images`) "
        "and OUT/manifest.jsonl (for `batch --manifest`). The same seed, split and size give the same scenes.",
    )
    refshapes.add_argument("--out", required=True, help="output folder")
    refshapes.add_argument("--images", type=int, default=10, help="number of scenes (default 10)")
    refshapes.add_argument("--seed", type=int, default=7, help="seed (default 7)")
    refshapes.add_argument("--split", default="demo", help="split name; it seeds the scenes too (default demo)")
    refshapes.add_argument("--size", type=int, default=192, help="image side in pixels (default 192, the embedded default's)")
    refshapes.add_argument("--mode", default="ris", choices=["ris", "gres"],
                           help="ris: one target per expression; gres: also several or none (default ris)")
    refshapes.set_defaults(run=cmd_refshapes)
