"""The `deris-rerank` console command.

Each subcommand is a small function over the library API. Mistakes a user can fix
(`DerisRerankError`) are printed as one line on stderr with exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from .errors import DerisRerankError
from .version import __version__
from .settings import (
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
    DerisTrainSettings,
    PerceptionPretrainSettings,
    TrainSettings,
)

MAX_REASONS_SHOWN = 5  # failed pairs whose reasons `batch` prints at the end


def _add_tau(parser) -> None:
    """--tau, the one definition every command that takes it shares."""
    parser.add_argument("--tau", type=float, help="override the gate's failure threshold in [0, 1]: switch only if p_fail > tau")


def _add_operating_point(parser) -> None:
    """--operating-point, for the commands that run a re-ranker."""
    parser.add_argument("--operating-point", metavar="NAME",
                        help="use one of the re-ranker's stored operating points instead of its own rule; the calibrated "
                        "re-ranker has 'tuned' (its rule) and 'conservative' (fewer, safer switches); --tau still overrides")


def _add_device_dtype(parser, dtype: bool = True) -> None:
    """--device (and --dtype) of every command that runs a model."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                            help="float32 (default), or autocast in bfloat16 (CUDA or CPU) or float16 (CUDA): "
                            "faster, slightly different numbers")


def _add_refshapes_flags(parser, preset: bool = False, mode: bool = True) -> None:
    """--preset (training commands) and --refshapes-mode, shared by the commands that use RefShapes."""
    if preset:
        parser.add_argument("--preset", default="deris-tiny", help="DeRIS preset to build (default deris-tiny)")
    if mode:
        parser.add_argument("--refshapes-mode", default="ris", choices=["ris", "gres"],
                            help="RefShapes: one target per expression (ris) or also several / none (gres)")


def _add_rule_overrides(parser: argparse.ArgumentParser) -> None:
    _add_tau(parser)
    parser.add_argument("--temp", type=float, help="temperature applied to the failure logit")
    parser.add_argument("--margin-pred", type=float, help="minimum predicted gain of the alternative")
    parser.add_argument("--margin-gap", type=float, help="minimum gap between the two best alternatives")


def _rule_overrides(args: argparse.Namespace) -> dict:
    return {"tau": args.tau, "temp": args.temp, "margin_pred": args.margin_pred, "margin_gap": args.margin_gap}


def _add_model_files(group) -> None:
    """--deris and --tokenizer, shared by segment, batch and extract."""
    group.add_argument("--deris", help="DeRIS checkpoint: official .pth, converted folder or preset name, or either "
                       "on the Hugging Face Hub as hf://OWNER/REPO[@REVISION]/PATH (default: the embedded default model)")
    group.add_argument("--tokenizer", help="BEiT-3 sentencepiece model, a path or hf://... "
                       "(default: beit3.spm next to --deris or in weights/)")


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    _add_model_files(group)
    group.add_argument("--gate", help="re-ranker: a Venice-H1 or calibrated gate file, a path or hf://... "
                       "(default: gate.safetensors beside --deris, or venice_h1.* in weights/)")
    group.add_argument("--no-gate", action="store_true", help="do not re-rank: DeRIS's own first choice")
    _add_device_dtype(group)
    _add_tau(group)
    _add_operating_point(group)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """--engine and the Ray engine's placement flags, shared by batch and extract."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", default="local", choices=["local", "ray"],
                       help="local: this process (default); ray: Ray Data, model replicas on a cluster's GPUs/CPUs "
                       "(pip install \"deris-rerank[ray]\"); the same outputs")
    group.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray for this run)")
    group.add_argument("--replicas", type=int, help="Ray: model replicas (default: one per GPU, or 1 without GPUs)")
    group.add_argument("--gpus-per-replica", type=float,
                       help="Ray: GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-replica", type=float, help="Ray: CPUs per replica (default 1)")


def _ray_settings(args: argparse.Namespace, **pipeline):
    """(PipelineSpec, Resources) of the Ray engine from the shared flags."""
    from .distributed import PipelineSpec, Resources, require_ray

    require_ray()
    spec = PipelineSpec(deris=args.deris, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, **pipeline)
    return spec, Resources(address=args.address, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica)


def _pipeline(args: argparse.Namespace):
    from .pipeline import Pipeline

    gate = False if args.no_gate else args.gate
    return Pipeline(deris=args.deris, gate=gate, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, tau=args.tau,
                    operating_point=args.operating_point)


def _summary(result, written, tau=None) -> str:
    """The printed answer for one pair; `tau`: the re-ranker's threshold, shown beside p_fail."""
    from .tokenizer import shorten_text

    top = f"candidate #{result.selected_rank} (slot {result.selected_slot}, score {result.scores[result.selected_rank]:.3f})"
    if result.switched:
        decision = f"switched to {top} from DeRIS's #0 (slot {result.default_index}, score {result.scores[0]:.3f})"
    else:
        decision = f"kept DeRIS's {top}"
    gate = "no gate" if result.p_fail is None else f"p_fail {result.p_fail:.3f}"
    if result.p_fail is not None and tau is not None:
        gate += f" {'>' if result.p_fail > tau else '<='} tau {tau:g}"
        if result.p_fail > tau and not result.switched:
            gate += " (no other candidate beat DeRIS's by the rule's margin)"
    stages = ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items())
    area = "EMPTY (nothing found)" if result.mask_empty else f"{int(result.mask.sum())} pixels"
    notes = [f"note: {note}" for note in result.notes if not note.startswith("answered by the embedded default")]
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


_POINT_FLAGS = dict(
    max_harmful=dict(type=float, help="harmful-switch budget (%%) of the 'tuned' operating point (default 5)"),
    conservative_harmful=dict(type=float, help="harmful-switch budget (%%) of the 'conservative' point (default 1)"),
    harm_confidence=dict(type=float, help="a point's harmful rate on --tune must stay within its budget at this one-sided "
                         "confidence (Wilson bound; default 0.95; 0 = the measured rate itself)"),
)
_RETRIEVAL_FLAGS = dict(
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


def add_settings_flags(parser: argparse.ArgumentParser, settings_class, skip=(), **special) -> None:
    """One `--flag-name` per field of the dataclass `settings_class` (but those named in `skip`), defaulting
    to the field's default: booleans as --x/--no-x, others typed like the default; `special[name]` replaces type/help (and may replace the default)."""
    for setting in dataclasses.fields(settings_class):
        if setting.name in skip:
            continue
        flag, value = "--" + setting.name.replace("_", "-"), setting.default
        if setting.name in special:
            parser.add_argument(flag, dest=setting.name, **{"default": value, **special[setting.name]})
        elif isinstance(value, bool):
            parser.add_argument(flag, dest=setting.name, action=argparse.BooleanOptionalAction, default=value,
                                help=f"default {'on' if value else 'off'}")
        else:
            parser.add_argument(flag, dest=setting.name, type=type(value), default=value, help=f"default {value}")


def settings_from_args(args: argparse.Namespace, settings_class):
    """The dataclass `settings_class` filled from the flags `add_settings_flags` made."""
    return settings_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class)})


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


def add_training_run_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --quiet of the training commands; `training_log` reads --quiet."""
    _add_device_dtype(parser, dtype=False)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def training_log(args: argparse.Namespace):
    """The progress-line printer a training command passes on: print, or nothing with --quiet."""
    return (lambda line: None) if args.quiet else print


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one image for one expression; write overlay + mask (+ candidates grid)."""
    image = Path(args.image)
    out_dir = Path(args.out) if args.out else image.parent
    pipe = _pipeline(args)
    result = pipe(image, args.text)
    written = result.save(out_dir, name=image.stem, candidates=args.candidates)
    tau = None if pipe.gate is None else pipe.gate.rule.tau
    print(json.dumps(result.to_json(), indent=2) if args.json else _summary(result, written, tau))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Process a manifest or a folder of images into an output folder."""
    from .batch import read_folder, read_manifest, run_batch
    from .errors import InputError

    if bool(args.manifest) == bool(args.images):
        raise InputError("give either --manifest FILE or --images FOLDER")
    if args.manifest:
        items = read_manifest(Path(args.manifest))
    else:
        texts = [args.text] if args.text else []
        if args.texts_file:
            texts += [t for t in Path(args.texts_file).read_text(encoding="utf-8").splitlines() if t.strip()]
        items = read_folder(Path(args.images), texts)
    if args.engine == "ray":
        from .distributed import run_batch as run_batch_ray

        spec, resources = _ray_settings(args, gate=False if args.no_gate else args.gate, tau=args.tau,
                                        operating_point=args.operating_point)
        summary = run_batch_ray(items, Path(args.out), spec, resources, batch_size=args.batch_size,
                                progress=not args.quiet, overwrite=args.overwrite)
    else:
        summary = run_batch(_pipeline(args), items, Path(args.out), batch_size=args.batch_size, progress=not args.quiet,
                            overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        print(f"deris-rerank: {summary['failed']} of {summary['total']} pairs failed "
              f"(all in {Path(args.out) / 'errors.jsonl'}); first reasons:", file=sys.stderr)
        for line in (Path(args.out) / "errors.jsonl").read_text(encoding="utf-8").splitlines()[:MAX_REASONS_SHOWN]:
            record = json.loads(line)
            print(f"  {record['id']}: {record['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the interactive app and the HTTP API (deris_rerank/app) until interrupted."""
    try:
        from .app.server import serve
        from .app.service import Batching, Limits, SegmentService
    except ImportError as exc:
        raise DerisRerankError(f"the app needs gradio, fastapi and uvicorn ({exc.name or exc} is missing): "
                               "pip install \"deris-rerank[app]\"") from None
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_texts=args.max_texts, queue_timeout_s=args.queue_timeout)
    batching = Batching(max_pairs=args.batch_pairs, wait_ms=args.batch_wait_ms)
    serve(SegmentService(_pipeline(args), limits, cache_size=args.cache_images, batching=batching),
          host=args.host, port=args.port)
    return 0


def _samples(args: argparse.Namespace):
    """The pairs of one split: an annotation file/folder, or generated RefShapes."""
    if args.data == "refshapes":
        from .data.refshapes import RefShapes

        size = (args.refshapes_size, args.refshapes_size)
        return list(RefShapes(args.split, num_images=args.refshapes_images, seed=args.refshapes_seed,
                              image_size=size, mode=args.refshapes_mode))
    from .data.refcoco import load_split
    from .errors import InputError

    if not args.images:
        raise InputError("--images (the COCO image folder) is needed with an annotation file")
    return load_split(args.data, Path(args.images), args.split)


def _data_source(args: argparse.Namespace) -> dict:
    """Where a split's pairs come from, for the cache's provenance: RefShapes settings, or the
    annotation file's sha256 (a refer folder: its files' names and sizes)."""
    if args.data == "refshapes":
        return {"refshapes": {"images": args.refshapes_images, "seed": args.refshapes_seed,
                              "size": args.refshapes_size, "mode": args.refshapes_mode}, "split": args.split}
    from .fileio import file_sha256

    data = Path(args.data)
    if data.is_dir():
        listing = {p.name: p.stat().st_size for p in sorted(data.iterdir()) if p.is_file()}
        return {"annotations": data.name, "files": listing, "split": args.split}
    return {"annotations": data.name, "sha256": file_sha256(data), "split": args.split}


def cmd_extract(args: argparse.Namespace) -> int:
    """Run DeRIS over a split and write its Venice-H1 feature cache."""
    from .errors import EmbeddedDefaultWarning, InputError
    from .pipeline import Pipeline
    from .workflow.extract import extract_split

    index, _, count = args.worker.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise InputError(f"--worker must look like 0/2 (this worker / number of workers), got {args.worker!r}")
    samples = _samples(args)
    settings = dict(shard_size=args.shard_size, batch_size=args.batch_size, protocol=args.iou_at,
                    worker=(int(index), int(count)), progress=not args.quiet, source=_data_source(args),
                    overwrite=args.overwrite)
    with warnings.catch_warnings():
        if args.data == "refshapes":  # the embedded default's own kind of scene: nothing to warn about
            warnings.simplefilter("ignore", EmbeddedDefaultWarning)
        if args.engine == "ray":
            from .distributed import run_extract

            spec, resources = _ray_settings(args, gate=False, query_source=args.query_source,
                                            batch_semantics=args.batch_semantics)
            counts = run_extract(samples, Path(args.out), spec, resources, **settings)
        else:
            pipe = Pipeline(deris=args.deris, gate=False, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                            query_source=args.query_source, batch_semantics=args.batch_semantics)
    if args.engine != "ray":
        counts = extract_split(pipe, samples, Path(args.out), **settings)
    print(json.dumps({"split": args.split, **counts}))
    return 1 if counts["failed"] else 0


def cmd_train_gate(args: argparse.Namespace) -> int:
    """Train a Venice-H1 gate (or, with --arch calibrated, the calibrated re-ranker) on caches;
    pick its decision settings on the tuning caches."""
    from .rerank.files import save_gate
    from .devices import resolve_device
    from .rerank.gate_data import load_gate_data
    from .workflow.train_gate import choose_rule, train_gate

    device = resolve_device(args.device)
    if args.arch == "calibrated":
        return _train_calibrated(args, device)
    settings = settings_from_args(args, TrainSettings)
    gate = train_gate(load_gate_data([Path(p) for p in args.train]), settings, device=device, log=training_log(args))
    gate.rule, tuned = choose_rule(gate, load_gate_data([Path(p) for p in args.tune]), settings)
    written = save_gate(gate.cpu(), args.out)
    print(json.dumps({"gate": str(written), "rule": gate.settings()["rule"], **tuned}))
    return 0


def _train_calibrated(args: argparse.Namespace, device) -> int:
    from .rerank.files import save_calibrated
    from .workflow.train_calibrated import choose_operating_points, settings_record, train_calibrated
    from .rerank.gate_data import load_gate_data

    settings = settings_from_args(args, CalibratedSettings)
    train = load_gate_data([Path(p) for p in args.train])
    tune = load_gate_data([Path(p) for p in args.tune])
    tune.require_text()
    reranker = train_calibrated(train, settings, device=device, log=training_log(args), monitor=None if args.quiet else tune)
    if settings.retrieval:
        from .workflow.retrieval import choose_retrieval

        memory, reranker.rule, reranker.operating_points, tuned = choose_retrieval(reranker, tune, settings, train=train)
        reranker.attach_memory(memory)
    else:
        reranker.rule, reranker.operating_points, tuned = choose_operating_points(reranker, tune, settings)
    written = save_calibrated(reranker.cpu(), args.out, extra={**settings_record(settings), "tuning": tuned})
    print(json.dumps({"gate": str(written), "rule": reranker.settings()["rule"],
                      "operating_points": reranker.settings()["operating_points"], **tuned}))
    return 0


def load_calibrated_for(path: str, purpose: str):
    """(resolved path, CalibratedReranker) of a trained calibrated re-ranker; InputError for a Venice-H1 gate."""
    from .errors import InputError
    from .model_files import resolve_gate
    from .rerank.calibrated import CalibratedReranker
    from .rerank.files import load_gate

    gate_path = resolve_gate(path, None)
    reranker = load_gate(gate_path)
    if not isinstance(reranker, CalibratedReranker):
        raise InputError(f"{path} is a Venice-H1 gate; {purpose} needs a calibrated re-ranker (train-gate --arch calibrated)")
    return gate_path, reranker


def save_beside_sidecar(reranker, gate_path: Path, out: str, extra: dict, summary: dict) -> int:
    """Write `reranker` to OUT.safetensors + OUT.json, keeping its sidecar's records (training...)
    updated by `extra`, and print the new rule and operating points with `summary` as JSON."""
    from .fileio import read_json
    from .rerank.files import save_calibrated

    sidecar = read_json(gate_path.with_suffix(".json"), "gate settings")
    kept = {k: v for k, v in sidecar.items() if k not in ("format", "format_version", "config", "rule", "operating_points", "retrieval")}
    written = save_calibrated(reranker, out, extra={**kept, **extra})
    shown = {key: reranker.settings()[key] for key in ("rule", "retrieval", "operating_points") if key in reranker.settings()}
    print(json.dumps({"gate": str(written), **shown, **summary}))
    return 0


def cmd_add_memory(args: argparse.Namespace) -> int:
    """Give a trained calibrated re-ranker a retrieval memory; re-pick its weight and operating points on --tune."""
    from .errors import InputError
    from .rerank.gate_data import load_gate_data
    from .workflow.retrieval import choose_retrieval

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
    from .rerank.gate_data import load_gate_data
    from .workflow.train_calibrated import choose_operating_points

    picked_with = {name: getattr(args, name) for name in POINT_RULE_SETTINGS}
    gate_path, reranker = load_calibrated_for(args.gate, "re-picking operating points")
    tune = load_gate_data([Path(p) for p in args.tune])
    reranker.rule, reranker.operating_points, tuned = choose_operating_points(reranker, tune, CalibratedSettings(**picked_with))
    return save_beside_sidecar(reranker, gate_path, args.out, {"retuning": picked_with, "tuning": tuned}, tuned)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics of DeRIS alone, with the gate, and the oracle, per split and overall."""
    from .rerank.files import load_gate
    from .workflow.evaluate import evaluate_caches, markdown

    gates = {Path(path).stem: load_gate(path, tau=args.tau, operating_point=args.operating_point) for path in args.gate or []}
    report = evaluate_caches([Path(p) for p in args.cache], next(iter(gates.values()), None), Path(args.out))
    print(markdown(report))
    if len(gates) > 1:
        from .fileio import atomic_write
        from .workflow.ablation import ablation_markdown, ablation_rows
        from .rerank.gate_data import load_gate_data

        table = ablation_markdown(ablation_rows(load_gate_data([Path(p) for p in args.cache]), gates))
        atomic_write(Path(args.out) / "ablation.md", lambda tmp: Path(tmp).write_text("# Ablation\n\n" + table))
        print(table)
    return 0


def cmd_pretrain_perception(args: argparse.Namespace) -> int:
    """Pre-train a preset's Swin on RefShapes object crops; writes OUT (safetensors)."""
    from .data.refshapes import RefShapes
    from .deris.config import DerisConfig
    from .devices import resolve_device
    from .training.pretrain_perception import pretrain_perception

    config = DerisConfig.preset(args.preset)
    dataset = RefShapes("train", num_images=args.train_images, seed=args.seed, image_size=(config.image_size, config.image_size))
    settings = settings_from_args(args, PerceptionPretrainSettings)
    pretrain_perception(config, dataset, Path(args.out), settings, device=resolve_device(args.device), log=training_log(args))
    print(json.dumps({"perception": args.out}))
    return 0


def cmd_train_deris(args: argparse.Namespace) -> int:
    """Train a DeRIS preset on RefShapes; writes OUT/model (+ tokenizer) and OUT/checkpoint.pt."""
    from .data.refshapes import RefShapes, corpus
    from .devices import resolve_device
    from .deris.config import DerisConfig
    from .errors import InputError
    from .hub import local_path
    from .training.tokenizer import train_word_tokenizer
    from .training.train_deris import train_deris

    out = Path(args.out)
    config = DerisConfig.preset(args.preset)
    size = (config.image_size, config.image_size)
    dataset = RefShapes("train", num_images=args.train_images, seed=args.seed, image_size=size, mode=args.refshapes_mode)
    tokenizer = local_path(args.tokenizer) if args.tokenizer else out / "tokenizer.model"
    if not tokenizer.is_file():
        train_word_tokenizer(corpus(20_000, seed=args.seed), tokenizer, max_pieces=config.beit3.vocab_size - 2)
    settings = settings_from_args(args, DerisTrainSettings)
    device = resolve_device(args.device)
    if args.init and args.init_perception:
        raise InputError("give --init (a whole model to fine-tune) or --init-perception (Swin weights), not both")
    init = local_path(args.init_perception) if args.init_perception else None
    train_deris(config, dataset, tokenizer, out, settings, device=device, log=training_log(args),
                init_perception=init, init_model=local_path(args.init) if args.init else None)
    print(json.dumps({"model": str(out / "model"), "tokenizer": str(out / "model" / "tokenizer.model")}))
    return 0


def cmd_convert_gate(args: argparse.Namespace) -> int:
    """Convert a Venice-H1 gate checkpoint to safetensors + JSON."""
    from .rerank.files import load_gate, save_gate

    gate = load_gate(args.checkpoint, **_rule_overrides(args))
    written = save_gate(gate, args.output)
    print(f"wrote {written} and {written.with_suffix('.json')}")
    print(json.dumps(gate.settings(), indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an official DeRIS checkpoint to safetensors + config.json."""
    from .checkpoints import load_deris, save_deris

    model = load_deris(args.checkpoint, config=args.preset)
    folder = save_deris(model, args.output)
    print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'} (preset {model.config.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deris-rerank",
        description="DeRIS referring segmentation re-ranked by the Venice-H1 failure gate.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    _add_pipeline_options(segment)
    segment.set_defaults(run=cmd_segment)

    app = commands.add_parser(
        "app",
        help="serve the interactive app and the HTTP API (pip install \"deris-rerank[app]\")",
        description="A Gradio page at / and POST /api/segment on one server; one model instance, requests take turns "
                    "(or share model calls: --batch-pairs).",
    )
    app.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, this machine only; "
                     "0.0.0.0 opens it to the network)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    app.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted, MiB (default 20)")
    app.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image accepted, pixels (default 40,000,000)")
    app.add_argument("--max-texts", type=int, default=16, help="most expressions per request (default 16)")
    app.add_argument("--queue-timeout", type=float, default=60.0,
                     help="longest wait for the model, seconds; a request waiting longer gets 429 (default 60)")
    app.add_argument("--cache-images", type=int, default=4, help="images whose encoded features are kept (default 4)")
    app.add_argument("--batch-pairs", type=int, default=1,
                     help="most (image, expression) pairs one model call answers, from several requests; "
                          "1 runs one request at a time (default 1; see README, Concurrency)")
    app.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="how long the oldest waiting request waits for others to join its model call, "
                          "milliseconds; 0: only those already waiting (default 5; only with --batch-pairs above 1)")
    _add_pipeline_options(app)
    app.set_defaults(run=cmd_app)

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
    _add_pipeline_options(batch)
    _add_engine_options(batch)
    batch.set_defaults(run=cmd_batch)

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
    _add_refshapes_flags(extract)
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.add_argument("--overwrite", action="store_true",
                         help="remove the split's existing shards first (needed when they were made with other "
                         "settings or data)")
    model = extract.add_argument_group("model")
    _add_model_files(model)
    _add_device_dtype(model)
    _add_engine_options(extract)
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
    train.add_argument("--arch", default="venice", choices=["venice", "calibrated"],
                       help="venice: the released Venice-H1 architecture (default); calibrated: the calibrated "
                       "re-ranker, which also reads the expression (needs caches with the text-aware fields)")
    add_settings_flags(train, TrainSettings, features=dict(
        choices=sorted(FEATURE_SETS), help="feature ablation: full, base (no grid signatures) or one grid scale"))
    calibrated = train.add_argument_group("calibrated re-ranker (--arch calibrated; it shares the flags above from --lr "
                                          "to --dropout)")
    add_settings_flags(calibrated, CalibratedSettings, skip=SHARED_SETTINGS, fusion=dict(
        choices=list(FUSIONS), help="learned: DeRIS's log-score + a learned weight x the calibrated logit (default); "
        "none: the calibrated logit alone"), **_POINT_FLAGS, **_RETRIEVAL_FLAGS)
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
        **{**_POINT_FLAGS, **_RETRIEVAL_FLAGS, "retrieval": dict(type=int, default=32, help="k, the neighbours read (default 32)")},
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
        settings=POINT_RULE_SETTINGS, **_POINT_FLAGS,
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
    _add_tau(evaluate)
    _add_operating_point(evaluate)
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.set_defaults(run=cmd_evaluate)

    train_deris = commands.add_parser(
        "train-deris",
        help="train a DeRIS preset on RefShapes (checkpoints and resumes)",
        description="Trains a DeRIS preset from scratch on generated RefShapes pairs: Hungarian matching to all "
        "instances, BCE + Dice masks, referring and existence losses on every loopback round. Writes OUT/model "
        "(model.safetensors + config.json + tokenizer.model) and resumes from OUT/checkpoint.pt.",
    )
    _add_refshapes_flags(train_deris, preset=True)
    train_deris.add_argument("--out", required=True, help="run folder")
    train_deris.add_argument("--train-images", type=int, default=200_000, help="RefShapes images to draw pairs from")
    train_deris.add_argument("--tokenizer", help="sentencepiece model (default: train one on the RefShapes grammar)")
    add_settings_flags(train_deris, DerisTrainSettings)
    train_deris.add_argument("--init-perception", help="Swin weights from `deris-rerank pretrain-perception`")
    train_deris.add_argument("--init", help="a whole DeRIS model of this preset to fine-tune from (our format: a folder "
                             "such as deris_rerank/embedded/deris-tiny, or hf://...); pass its --tokenizer too")
    add_training_run_flags(train_deris)
    train_deris.set_defaults(run=cmd_train_deris)

    pretrain = commands.add_parser(
        "pretrain-perception",
        help="pre-train a preset's Swin on RefShapes object crops (for train-deris --init-perception)",
        description="Trains the preset's Swin to tell each RefShapes object's shape, colour, size and style from a "
        "crop centred on it; writes the Swin's weights (safetensors) to OUT.",
    )
    _add_refshapes_flags(pretrain, preset=True, mode=False)
    pretrain.add_argument("--out", required=True, help="output file, e.g. runs/perception.safetensors")
    pretrain.add_argument("--train-images", type=int, default=200_000, help="RefShapes images to draw scenes from")
    add_settings_flags(pretrain, PerceptionPretrainSettings)
    add_training_run_flags(pretrain)
    pretrain.set_defaults(run=cmd_pretrain_perception)

    convert = commands.add_parser(
        "convert",
        help="convert an official DeRIS checkpoint (.pth) to safetensors + config.json",
        description="Read an official DeRIS checkpoint safely (weights_only) and write OUT_DIR/model.safetensors "
        "and OUT_DIR/config.json (with the weights' sha256), so later loads never touch pickle.",
    )
    convert.add_argument("checkpoint", help="official DeRIS .pth file (a path or hf://OWNER/REPO[@REVISION]/PATH)")
    convert.add_argument("output", help="output folder")
    convert.add_argument("--preset", help="deris-l-refcoco, deris-b-refcoco, deris-l-grefcoco or deris-b-grefcoco "
                         "(default: detected from the checkpoint's shapes)")
    convert.set_defaults(run=cmd_convert)

    convert_gate = commands.add_parser(
        "convert-gate",
        help="convert a Venice-H1 gate checkpoint (.pt/.pth) to safetensors + JSON",
        description="Read a Venice-H1 gate checkpoint safely and write OUTPUT.safetensors and OUTPUT.json.",
    )
    convert_gate.add_argument("checkpoint", help="Venice-H1 .pt/.pth file, or one of ours (.safetensors); a path or hf://...")
    convert_gate.add_argument("output", help="output path; .safetensors and .json are written beside it")
    _add_rule_overrides(convert_gate)
    convert_gate.set_defaults(run=cmd_convert_gate)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"deris-rerank: warning: {message}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.run(args)
    except DerisRerankError as exc:
        print(f"deris-rerank: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deris-rerank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
