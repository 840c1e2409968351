"""The re-ranker workflow: `extract` (feature caches), `train-gate`, `add-memory`, `retune` and `evaluate`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

from ..settings import (
    FEATURE_SETS,
    FUSIONS,
    MEMORY_DTYPES,
    MEMORY_SOURCES,
    POINT_RULE_SETTINGS,
    POINT_SETTINGS,
    RETRIEVAL_KEY_SPACES,
    RETRIEVAL_SETTINGS,
    RETRIEVAL_VALUE_KINDS,
    SHARED_SETTINGS,
    CalibratedSettings,
    TrainSettings,
)
from .options import (
    add_device_dtype,
    add_engine_options,
    add_model_files,
    add_operating_point,
    add_refshapes_flags,
    add_settings_flags,
    add_tau,
    add_training_run_flags,
    local_threads,
    ray_settings,
    settings_from_args,
    training_log,
)

POINT_FLAGS = dict(
    max_harmful=dict(type=float, help="harmful-switch budget (%%) of the 'tuned' operating point (default 5)"),
    conservative_harmful=dict(type=float, help="harmful-switch budget (%%) of the 'conservative' point (default 1)"),
    harm_confidence=dict(type=float, help="a point's harmful rate on --tune must stay within its budget at this one-sided "
                         "confidence (Wilson bound; default 0.95; 0 = the measured rate itself)"),
    set_max_harmful=dict(type=float, help="set re-rankers: budget (%%) of answers more than 0.01 IoU below DeRIS's own "
                         "union answer, for the 'tuned' set point (default 8)"),
    set_conservative_harmful=dict(type=float, help="set re-rankers: the same budget for the 'conservative' set point (default 3)"),
)
SET_FLAGS = dict(
    sets=dict(action=argparse.BooleanOptionalAction, help="a set re-ranker: answers may be no object or several (GRES; "
              "needs caches with the set fields, e.g. extract --refshapes-mode gres; default off)"),
    set_existence=dict(action=argparse.BooleanOptionalAction, help="set re-ranker input: DeRIS's existence logit (default off)"),
    set_overlap=dict(action=argparse.BooleanOptionalAction, help="set re-ranker input: each candidate's overlap with the "
                     "others (default off)"),
    member_weight=dict(type=float, help="set re-ranker: weight of the membership loss (default 1)"),
    kind_weight=dict(type=float, help="set re-ranker: weight of the no-object / one / several loss (default 1)"),
)


RETRIEVAL_FLAGS = dict(
    retrieval=dict(type=int, help="k: give the re-ranker a retrieval memory read by its k nearest entries (default 0: none)"),
    memory_size=dict(type=int, help="entries (candidates) kept in the memory, a seeded draw; 0 = all (default 20000)"),
    memory_source=dict(choices=list(MEMORY_SOURCES), help="candidates of the training caches (default) or of the tuning "
                       "caches (then the weight is chosen out-of-fold on tuning halves)"),
    retrieval_keys=dict(choices=list(RETRIEVAL_KEY_SPACES), help="memory keys: the re-ranker's candidate representation "
                        "(cand) or it joined with its pooled text (cand_text, default)"),
    retrieval_values=dict(choices=list(RETRIEVAL_VALUE_KINDS), help="memory values: IoU gain over Query-0 (default) or IoU"),
    retrieval_temperature=dict(type=float, help="softmax temperature over the neighbours' cosine similarities (default 0.1)"),
    memory_dtype=dict(choices=list(MEMORY_DTYPES), help="dtype of the stored keys (default float16)"),
)


def add_reranker_edit_command(commands, name: str, help: str, description: str, settings, **special) -> argparse.ArgumentParser:
    """A command that reads a trained calibrated re-ranker (--gate) and a tuning cache (--tune) and
    writes a changed copy (--out), with flags for the CalibratedSettings fields named in `settings`."""
    parser = commands.add_parser(name, help=help, description=description + " Writes OUT.safetensors + OUT.json; "
                                 "the input file is not changed.")
    parser.add_argument("--gate", required=True, help="a calibrated re-ranker (.safetensors; a path or hf://...)")
    parser.add_argument("--tune", nargs="+", required=True, help="tuning cache split folders (not the evaluation split)")
    parser.add_argument("--out", required=True, help="output path (OUT.safetensors + OUT.json)")
    add_settings_flags(parser, CalibratedSettings, skip=[f.name for f in dataclasses.fields(CalibratedSettings)
                                                         if f.name not in settings], **special)
    return parser


def samples_from_args(args: argparse.Namespace):
    """The pairs of one split: an annotation file/folder, or generated RefShapes."""
    if args.data == "refshapes":
        from ..data.refshapes import RefShapes

        size = (args.refshapes_size, args.refshapes_size)
        return list(RefShapes(args.split, num_images=args.refshapes_images, seed=args.refshapes_seed,
                              image_size=size, mode=args.refshapes_mode))
    from ..data.refcoco import load_split
    from ..errors import InputError

    if not args.images:
        raise InputError("--images (the COCO image folder) is needed with an annotation file")
    return load_split(args.data, Path(args.images), args.split)


def data_source(args: argparse.Namespace) -> dict:
    """Where a split's pairs come from, for the cache's provenance: RefShapes settings, or the
    annotation file's sha256 (a refer folder: its files' names and sizes)."""
    if args.data == "refshapes":
        return {"refshapes": {"images": args.refshapes_images, "seed": args.refshapes_seed,
                              "size": args.refshapes_size, "mode": args.refshapes_mode}, "split": args.split}
    from ..fileio import file_sha256

    data = Path(args.data)
    if data.is_dir():
        listing = {p.name: p.stat().st_size for p in sorted(data.iterdir()) if p.is_file()}
        return {"annotations": data.name, "files": listing, "split": args.split}
    return {"annotations": data.name, "sha256": file_sha256(data), "split": args.split}


def cmd_extract(args: argparse.Namespace) -> int:
    """Run DeRIS over a split and write its Venice-H1 feature cache."""
    from ..errors import EmbeddedDefaultWarning, InputError
    from ..pipeline import Pipeline
    from ..workflow.extract import extract_split

    index, _, count = args.worker.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise InputError(f"--worker must look like 0/2 (this worker / number of workers), got {args.worker!r}")
    samples = samples_from_args(args)
    settings = dict(shard_size=args.shard_size, batch_size=args.batch_size, protocol=args.iou_at,
                    worker=(int(index), int(count)), progress=not args.quiet, source=data_source(args),
                    overwrite=args.overwrite)
    with local_threads(args):
        with warnings.catch_warnings():
            if args.data == "refshapes":  # the embedded default's own kind of scene: nothing to warn about
                warnings.simplefilter("ignore", EmbeddedDefaultWarning)
            if args.engine == "ray":
                from ..distributed import run_extract

                spec, resources = ray_settings(args, gate=False, query_source=args.query_source,
                                                batch_semantics=args.batch_semantics)
                counts = run_extract(samples, Path(args.out), spec, resources, **settings)
            else:
                pipe = Pipeline(deris=args.deris, gate=False, tokenizer=args.tokenizer, device=args.device,
                                dtype=args.dtype, query_source=args.query_source, batch_semantics=args.batch_semantics,
                                runtime=args.runtime)
        if args.engine != "ray":
            counts = extract_split(pipe, samples, Path(args.out), **settings)
    print(json.dumps({"split": args.split, **counts}))
    return 1 if counts["failed"] else 0


def cmd_train_gate(args: argparse.Namespace) -> int:
    """Train a Venice-H1 gate (or, with --arch calibrated, the calibrated re-ranker) on caches;
    pick its decision settings on the tuning caches."""
    from ..devices import resolve_device
    from ..errors import InputError
    from ..rerank.files import save_gate
    from ..rerank.gate_data import load_gate_data
    from ..workflow.train_gate import choose_rule, train_gate

    device = resolve_device(args.device)
    if args.arch == "calibrated":
        return train_calibrated_from_args(args, device)
    if args.init:
        raise InputError("--init starts a calibrated re-ranker from a trained one: add --arch calibrated")
    settings = settings_from_args(args, TrainSettings)
    gate = train_gate(load_gate_data([Path(p) for p in args.train]), settings, device=device, log=training_log(args))
    gate.rule, tuned = choose_rule(gate, load_gate_data([Path(p) for p in args.tune]), settings)
    written = save_gate(gate.cpu(), args.out)
    print(json.dumps({"gate": str(written), "rule": gate.settings()["rule"], **tuned}))
    return 0


def train_calibrated_from_args(args: argparse.Namespace, device) -> int:
    from ..errors import InputError
    from ..rerank.files import save_calibrated
    from ..workflow.train_calibrated import pick_points, settings_record, train_calibrated
    from ..rerank.gate_data import load_gate_data

    settings = settings_from_args(args, CalibratedSettings)
    if settings.sets and settings.retrieval:
        raise InputError("--retrieval is for single-candidate re-rankers; leave it out with --sets")
    if (settings.set_existence or settings.set_overlap) and not settings.sets:
        raise InputError("--set-existence and --set-overlap are inputs of a set re-ranker: add --sets")
    init = load_calibrated_for(args.init, "--init")[1] if args.init else None
    train = load_gate_data([Path(p) for p in args.train])
    tune = load_gate_data([Path(p) for p in args.tune], masks=settings.sets)
    tune.require_text()
    if settings.sets:
        tune.require_sets(masks=True)
    reranker = train_calibrated(train, settings, device=device, log=training_log(args), monitor=None if args.quiet else tune,
                                init=init)
    if settings.retrieval:
        from ..workflow.retrieval import choose_retrieval

        memory, reranker.rule, reranker.operating_points, tuned = choose_retrieval(reranker, tune, settings, train=train)
        reranker.attach_memory(memory)
    else:
        tuned = pick_points(reranker, tune, settings)
    written = save_calibrated(reranker.cpu(), args.out, extra={**settings_record(settings), "tuning": tuned})
    shown = {key: reranker.settings()[key] for key in ("rule", "operating_points", "set_rule", "set_operating_points")
             if key in reranker.settings()}
    print(json.dumps({"gate": str(written), **shown, **tuned}))
    return 0


def load_calibrated_for(path: str, purpose: str):
    """(resolved path, CalibratedReranker) of a trained calibrated re-ranker; InputError for a Venice-H1 gate."""
    from ..errors import InputError
    from ..model_files import resolve_gate
    from ..rerank.calibrated import CalibratedReranker
    from ..rerank.files import load_gate

    gate_path = resolve_gate(path, None)
    reranker = load_gate(gate_path)
    if not isinstance(reranker, CalibratedReranker):
        raise InputError(f"{path} is a Venice-H1 gate; {purpose} needs a calibrated re-ranker (train-gate --arch calibrated)")
    return gate_path, reranker


def save_beside_sidecar(reranker, gate_path: Path, out: str, extra: dict, summary: dict) -> int:
    """Write `reranker` to OUT.safetensors + OUT.json, keeping its sidecar's records (training...)
    updated by `extra`, and print the new rule and operating points with `summary` as JSON."""
    from ..fileio import read_json
    from ..rerank.files import save_calibrated

    sidecar = read_json(gate_path.with_suffix(".json"), "gate settings")
    kept = {k: v for k, v in sidecar.items() if k not in ("format", "format_version", "config", "rule", "operating_points", "retrieval",
                                                    "set_rule", "set_operating_points")}
    written = save_calibrated(reranker, out, extra={**kept, **extra})
    shown = {key: reranker.settings()[key] for key in ("rule", "retrieval", "operating_points", "set_rule", "set_operating_points")
             if key in reranker.settings()}
    print(json.dumps({"gate": str(written), **shown, **summary}))
    return 0


def cmd_add_memory(args: argparse.Namespace) -> int:
    """Give a trained calibrated re-ranker a retrieval memory; re-pick its weight and operating points on --tune."""
    from ..errors import InputError
    from ..rerank.gate_data import load_gate_data
    from ..workflow.retrieval import choose_retrieval

    settings = CalibratedSettings(**{name: getattr(args, name) for name in (*RETRIEVAL_SETTINGS, *POINT_SETTINGS)})
    if settings.retrieval < 1:
        raise InputError(f"--retrieval (k, the neighbours read) must be at least 1, got {settings.retrieval}")
    gate_path, reranker = load_calibrated_for(args.gate, "a retrieval memory")
    reranker.attach_memory(None)
    train = load_gate_data([Path(p) for p in args.train]) if args.train else None
    tune = load_gate_data([Path(p) for p in args.tune])
    memory, reranker.rule, reranker.operating_points, tuned = choose_retrieval(reranker, tune, settings, train=train)
    reranker.attach_memory(memory)
    built = {name: getattr(settings, name) for name in (*RETRIEVAL_SETTINGS, *POINT_SETTINGS)}
    return save_beside_sidecar(reranker, gate_path, args.out, {"memory_building": built, "tuning": tuned}, tuned)


def cmd_retune(args: argparse.Namespace) -> int:
    """Re-pick a calibrated re-ranker's operating points on --tune; its weights (and memory) stay as they are."""
    from ..rerank.gate_data import load_gate_data
    from ..workflow.train_calibrated import pick_points

    picked_with = {name: getattr(args, name) for name in POINT_RULE_SETTINGS}
    gate_path, reranker = load_calibrated_for(args.gate, "re-picking operating points")
    tune = load_gate_data([Path(p) for p in args.tune], masks=reranker.config.sets)
    tuned = pick_points(reranker, tune, CalibratedSettings(**picked_with))
    return save_beside_sidecar(reranker, gate_path, args.out, {"retuning": picked_with, "tuning": tuned}, tuned)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics of DeRIS alone, with the gate, and the oracle, per split and overall."""
    from ..rerank.files import load_gate
    from ..workflow.evaluate import evaluate_caches, markdown

    gates = {Path(path).stem: load_gate(path, tau=args.tau, operating_point=args.operating_point) for path in args.gate or []}
    report = evaluate_caches([Path(p) for p in args.cache], next(iter(gates.values()), None), Path(args.out),
                             set_gates=gates, tune_paths=[Path(p) for p in args.tune or []])
    print(markdown(report))
    if len(gates) > 1:
        from ..fileio import atomic_write
        from ..workflow.ablation import ablation_markdown, ablation_rows
        from ..rerank.gate_data import load_gate_data

        table = ablation_markdown(ablation_rows(load_gate_data([Path(p) for p in args.cache]), gates))
        atomic_write(Path(args.out) / "ablation.md", lambda tmp: Path(tmp).write_text("# Ablation\n\n" + table))
        print(table)
    return 0


def add_commands(commands) -> None:
    """Add `extract`, `train`, `add_memory`, `retune`, `evaluate` to the `deris-rerank` subcommands."""
    extract = commands.add_parser(
        "extract",
        help="run DeRIS over a split and write its Venice-H1 feature cache",
        description="Writes OUT/<split>/shard_*.safetensors (resumable: complete shards are skipped). --data is "
        "an annotation file (SeqTR-style mixed JSON, gRefCOCO JSON) or a refer folder (refs(unc).p + instances.json), "
        "or 'refshapes' for generated RefShapes data.",
    )
    extract.add_argument("--data", required=True, help="annotation file / refer folder, or 'refshapes'")
    extract.add_argument("--split", required=True, help="split name, e.g. val_refcoco_unc (RefShapes: any name)")
    extract.add_argument("--images", help="image folder (e.g. COCO train2014) for annotation files")
    extract.add_argument("--out", required=True, help="cache folder")
    extract.add_argument("--iou-at", default="384", choices=["384", "original"],
                         help="IoU at the 384 input (DeRIS's evaluation, default) or at the original image size")
    extract.add_argument("--shard-size", type=int, default=10_000, help="pairs per shard (default 10000)")
    extract.add_argument("--batch-size", type=int, default=8, help="pairs per model run (default 8)")
    extract.add_argument("--worker", default="0/1", help="i/K: this process takes shards k with k %% K == i")
    extract.add_argument("--query-source", default="perception", choices=["perception", "cognition"],
                         help="which DeRIS embedding the Venice-H1 fields hold: the perception queries (default, as "
                         "the Venice-H1 caches) or the cognition aligner's")
    extract.add_argument("--batch-semantics", default="per_sample", choices=["per_sample", "upstream"],
                         help="upstream: reproduce upstream's batch-coupled loopback (results depend on the batch)")
    extract.add_argument("--refshapes-images", type=int, default=1000, help="RefShapes: number of images")
    extract.add_argument("--refshapes-seed", type=int, default=0, help="RefShapes: seed")
    extract.add_argument("--refshapes-size", type=int, default=256, help="RefShapes: image side in pixels")
    add_refshapes_flags(extract)
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.add_argument("--overwrite", action="store_true",
                         help="remove the split's existing shards first (needed when they were made with other "
                         "settings or data)")
    model = extract.add_argument_group("model")
    add_model_files(model)
    add_device_dtype(model)
    add_engine_options(extract)
    extract.set_defaults(run=cmd_extract)

    train = commands.add_parser(
        "train-gate",
        help="train a Venice-H1 gate on feature caches",
        description="Trains the released Venice-H1 architecture (recipe of the Venice-H1 card by default) and picks "
        "tau (optionally temperature and margin) on the --tune caches, never on evaluation data. Writes "
        "OUT.safetensors + OUT.json.",
    )
    train.add_argument("--train", nargs="+", required=True, help="training cache split folders")
    train.add_argument("--tune", nargs="+", required=True, help="tuning cache split folders (not the evaluation split)")
    train.add_argument("--out", required=True, help="output path (OUT.safetensors + OUT.json)")
    train.add_argument("--init", help="--arch calibrated: start from this trained calibrated re-ranker's weights (same "
                       "sizes and inputs; e.g. the re-ranker of the model a DeRIS was fine-tuned from), not from random ones")
    train.add_argument("--arch", default="venice", choices=["venice", "calibrated"],
                       help="venice: the released Venice-H1 architecture (default); calibrated: the calibrated "
                       "re-ranker, which also reads the expression (needs caches with the text-aware fields)")
    add_settings_flags(train, TrainSettings, features=dict(
        choices=sorted(FEATURE_SETS), help="feature ablation: full, base (no grid signatures) or one grid scale"))
    calibrated = train.add_argument_group("calibrated re-ranker (--arch calibrated; it shares the flags above from --lr "
                                          "to --dropout)")
    add_settings_flags(calibrated, CalibratedSettings, skip=SHARED_SETTINGS, fusion=dict(
        choices=list(FUSIONS), help="learned: DeRIS's log-score + a learned weight x the calibrated logit (default); "
        "none: the calibrated logit alone"), **POINT_FLAGS, **RETRIEVAL_FLAGS, **SET_FLAGS)
    add_training_run_flags(train)
    train.set_defaults(run=cmd_train_gate)

    add_memory = add_reranker_edit_command(
        commands, "add-memory",
        help="give a trained calibrated re-ranker a retrieval memory",
        description="Keys the candidates of --train (or, with --memory-source tune, of --tune) in the re-ranker's own "
        "space, keeps --memory-size of them (seeded) with their IoU gain over Query-0 (or IoU), and picks the ensemble "
        "weight (0 = no retrieval) and the operating points on --tune (out-of-fold halves when the memory holds tuning "
        "pairs).",
        settings=(*RETRIEVAL_SETTINGS, *POINT_SETTINGS),
        **{**POINT_FLAGS, **RETRIEVAL_FLAGS, "retrieval": dict(type=int, default=32, help="k, the neighbours read (default 32)")},
    )
    add_memory.add_argument("--train", nargs="+", help="caches whose candidates fill the memory (--memory-source train)")
    add_memory.set_defaults(run=cmd_add_memory)

    retune = add_reranker_edit_command(
        commands, "retune",
        help="re-pick a calibrated re-ranker's operating points on a tuning cache",
        description="Picks the 'tuned' and 'conservative' operating points (threshold and margin) of a trained "
        "calibrated re-ranker on --tune with the rule train-gate uses (the most mIoU whose harmful-switch rate stays "
        "within --max-harmful / --conservative-harmful at --harm-confidence). The weights and any retrieval memory "
        "are kept.",
        settings=POINT_RULE_SETTINGS, **POINT_FLAGS,
    )
    retune.set_defaults(run=cmd_retune)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics of DeRIS, DeRIS + gate and the oracle on feature caches",
        description="Writes OUT/metrics.json, OUT/metrics.md and plots (roc.png, coverage_risk.png, per_split.png) "
        "and prints the table with its protocol.",
    )
    evaluate.add_argument("--cache", nargs="+", required=True, help="cache split folders to evaluate")
    evaluate.add_argument("--gate", nargs="+", help="gate / re-ranker checkpoint, a path or hf://... (omit to evaluate DeRIS alone); "
                          "several: the tables are for the first, and OUT/ablation.md compares them all")
    add_tau(evaluate)
    add_operating_point(evaluate)
    evaluate.add_argument("--tune", nargs="+", help="tuning caches (not the evaluation split): for GRES caches, the set "
                          "table adds DeRIS's union answer at its best threshold on them")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.set_defaults(run=cmd_evaluate)
