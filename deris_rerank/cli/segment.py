"""`deris-rerank segment` (one image, one expression) and `deris-rerank batch` (many pairs, resumable)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_engine_options, add_pipeline_options, local_threads, pipeline_from_args, ray_settings

MAX_REASONS_SHOWN = 5  # failed pairs whose reasons `batch` prints at the end


def summary(result, written, tau=None) -> str:
    """The printed answer for one pair; `tau`: the re-ranker's threshold, shown beside p_fail."""
    from ..tokenizer import shorten_text

    if result.answer == "set":
        decision = set_decision(result)
    else:
        top = f"candidate #{result.selected_rank} (slot {result.selected_slot}, score {result.scores[result.selected_rank]:.3f})"
        if result.switched:
            decision = f"switched to {top} from DeRIS's #0 (slot {result.default_index}, score {result.scores[0]:.3f})"
        else:
            decision = f"kept DeRIS's {top}"
    gate = "no gate" if result.p_fail is None else f"p_fail {result.p_fail:.3f}"
    if result.p_no_target is not None:
        gate += f", p(no object) {result.p_no_target:.3f}"
    if result.p_fail is not None and tau is not None and result.answer == "single":
        gate += f" {'>' if result.p_fail > tau else '<='} tau {tau:g}"
        if result.p_fail > tau and not result.switched:
            gate += " (no other candidate beat DeRIS's by the rule's margin)"
    stages = ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items())
    area = "EMPTY (nothing found)" if result.mask_empty else f"{int(result.mask.sum())} pixels"
    notes = [f"note: {note}" for note in result.notes
             if not note.startswith(("answered by the embedded default", "no object matches", f"{result.object_count} objects match"))]
    return "\n".join(
        [
            f"{shorten_text(result.text)}: {decision}; {gate}",
            f"mask: {area}",
            "scores: " + " ".join(f"{s:.3f}" for s in result.scores),
            *notes,
            f"time: {sum(result.timings.values()):.0f} ms ({stages})",
            "wrote: " + ", ".join(str(p) for p in written.values()),
        ]
    )


def set_decision(result) -> str:
    """A set answer in words: no object, one candidate or several, and whether it is DeRIS's own."""
    if result.object_count == 0:
        what = "no object matches"
    else:
        ranks = ", ".join(f"#{rank}" for rank in result.selected_ranks)
        what = f"{result.object_count} object{'s' if result.object_count > 1 else ''}: candidate{'s' if result.object_count > 1 else ''} {ranks}"
    return f"{what} ({'another answer than' if result.switched else 'the same as'} DeRIS's own union answer)"


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one image for one expression; write overlay + mask (+ candidates grid)."""
    image = Path(args.image)
    out_dir = Path(args.out) if args.out else image.parent
    pipe = pipeline_from_args(args)
    result = pipe(image, args.text)
    written = result.save(out_dir, name=image.stem, candidates=args.candidates)
    tau = None if pipe.gate is None else pipe.gate.rule.tau
    print(json.dumps(result.to_json(), indent=2) if args.json else summary(result, written, tau))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Process a manifest or a folder of images into an output folder."""
    from ..batch import read_folder, read_manifest, read_texts, run_batch
    from ..errors import InputError

    if bool(args.manifest) == bool(args.images):
        raise InputError("give either --manifest FILE or --images FOLDER")
    if args.manifest:
        items = read_manifest(Path(args.manifest))
    else:
        texts = [args.text] if args.text else []
        if args.texts_file:
            texts += read_texts(Path(args.texts_file))
        items = read_folder(Path(args.images), texts)
    with local_threads(args):
        if args.engine == "ray":
            from ..distributed import run_batch as run_batch_ray

            spec, resources = ray_settings(args, gate=False if args.no_gate else args.gate, tau=args.tau,
                                            operating_point=args.operating_point, answer=args.answer)
            summary = run_batch_ray(items, Path(args.out), spec, resources, batch_size=args.batch_size,
                                    progress=not args.quiet, overwrite=args.overwrite)
        else:
            summary = run_batch(pipeline_from_args(args), items, Path(args.out), batch_size=args.batch_size,
                                progress=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        print(f"deris-rerank: {summary['failed']} of {summary['total']} pairs failed "
              f"(all in {Path(args.out) / 'errors.jsonl'}); first reasons:", file=sys.stderr)
        for line in (Path(args.out) / "errors.jsonl").read_text(encoding="utf-8").splitlines()[:MAX_REASONS_SHOWN]:
            record = json.loads(line)
            print(f"  {record['id']}: {record['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def add_commands(commands) -> None:
    """Add `segment`, `batch` to the `deris-rerank` subcommands."""
    segment = commands.add_parser(
        "segment",
        help="segment one image for a referring expression",
        description="Write <image>_overlay.png, <image>_mask.png and <image>.json next to the image (or under --out) "
        "and print a summary.",
    )
    segment.add_argument("--image", required=True, help="image file")
    segment.add_argument("--text", required=True, help='referring expression, e.g. "man on left"')
    segment.add_argument("--out", help="output folder (default: the image's folder)")
    segment.add_argument("--json", action="store_true", help="print the result as JSON instead of the summary")
    segment.add_argument("--candidates", action="store_true", help="also save a grid of all candidates with scores")
    add_pipeline_options(segment)
    segment.set_defaults(run=cmd_segment)

    batch = commands.add_parser(
        "batch",
        help="process many image-text pairs (resumable)",
        description="Input: --manifest (JSONL or CSV with image, text[, id]) or --images FOLDER with --text or "
        "--texts-file. Output: masks/<id>.png, results.jsonl, errors.jsonl, summary.json, run.json. A rerun with "
        "the same --out and the same settings skips finished ids; with other settings it stops (exit 2) unless "
        "--overwrite is given. Exit code 1 when any pair failed.",
    )
    batch.add_argument("--manifest", help="JSONL or CSV manifest; image paths relative to it")
    batch.add_argument("--images", help="folder of images")
    batch.add_argument("--text", help="one expression for every image of --images")
    batch.add_argument("--texts-file", help="one expression per line, each applied to every image of --images")
    batch.add_argument("--out", required=True, help="output folder")
    batch.add_argument("--batch-size", type=int, default=8, help="pairs per model run (default 8)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--overwrite", action="store_true",
                       help="start afresh: remove earlier results in --out (needed when they were made with other "
                       "settings or for other inputs)")
    add_pipeline_options(batch)
    add_engine_options(batch)
    batch.set_defaults(run=cmd_batch)
