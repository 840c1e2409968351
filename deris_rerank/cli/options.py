"""The option definitions and argument readers that several `deris-rerank` commands share.

Nothing here imports torch or the model: building the parser stays cheap (`deris-rerank --help`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses

from ..errors import install_hint

def add_tau(parser) -> None:
    """--tau, the one definition every command that takes it shares."""
    parser.add_argument("--tau", type=float, help="override the gate's failure threshold in [0, 1]: switch only if p_fail > tau")


def add_operating_point(parser) -> None:
    """--operating-point, for the commands that run a re-ranker."""
    parser.add_argument("--operating-point", metavar="NAME",
                        help="use one of the re-ranker's stored operating points instead of its own rule; the calibrated "
                        "re-ranker has 'tuned' (its rule) and 'conservative' (fewer, safer switches); --tau still overrides")


def add_device_dtype(parser, dtype: bool = True) -> None:
    """--device (and --dtype) of every command that runs a model."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8", "auto"],
                            help="float32 (default: upstream's numbers), int8 (CPU: int8 linear layers), autocast in "
                            "bfloat16 (CUDA or CPU) or float16 (CUDA), or auto (the fastest of these here, measured "
                            "once): slightly different numbers (docs/speed.md); bfloat16 is 20-30x slower on CPUs "
                            "without AVX-512 BF16 or AMX (a warning says so)")
        parser.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                            help="torch (default), or onnxruntime for a --deris folder written by `deris-rerank "
                            "export-onnx` (float32; needs the onnx extra)")


def add_refshapes_flags(parser, preset: bool = False, mode: bool = True) -> None:
    """--preset (training commands) and --refshapes-mode, shared by the commands that use RefShapes."""
    if preset:
        parser.add_argument("--preset", default="deris-tiny", help="DeRIS preset to build (default deris-tiny)")
    if mode:
        parser.add_argument("--refshapes-mode", default="ris", choices=["ris", "gres"],
                            help="RefShapes: one target per expression (ris) or also several / none (gres)")


def add_rule_overrides(parser: argparse.ArgumentParser) -> None:
    add_tau(parser)
    parser.add_argument("--temp", type=float, help="temperature applied to the failure logit")
    parser.add_argument("--margin-pred", type=float, help="minimum predicted gain of the alternative")
    parser.add_argument("--margin-gap", type=float, help="minimum gap between the two best alternatives")


def rule_overrides(args: argparse.Namespace) -> dict:
    return {"tau": args.tau, "temp": args.temp, "margin_pred": args.margin_pred, "margin_gap": args.margin_gap}


def add_model_files(group) -> None:
    """--deris and --tokenizer, shared by segment, batch and extract."""
    group.add_argument("--deris", help="DeRIS checkpoint: official .pth, converted folder or preset name, or either "
                       "on the Hugging Face Hub as hf://OWNER/REPO[@REVISION]/PATH (default: the embedded default model)")
    group.add_argument("--tokenizer", help="BEiT-3 sentencepiece model, a path or hf://... "
                       "(default: beit3.spm next to --deris or in weights/)")


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    add_model_files(group)
    group.add_argument("--gate", help="re-ranker: a Venice-H1 or calibrated gate file, a path or hf://... "
                       "(default: gate.safetensors beside --deris, or venice_h1.* in weights/)")
    group.add_argument("--no-gate", action="store_true", help="do not re-rank: DeRIS's own first choice")
    add_device_dtype(group)
    add_tau(group)
    add_operating_point(group)
    group.add_argument("--answer", choices=["single", "set"],
                       help="single: one candidate; set: none, one or several (\"no object matches\", \"all the red shapes\"; "
                       "needs a set re-ranker, or --no-gate for DeRIS's own union answer); default: set for a set re-ranker "
                       "or a GRES-trained DeRIS without one, else single")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """--engine and the Ray engine's placement flags, shared by batch and extract."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", default="local", choices=["local", "ray"],
                       help="local: this process (default); ray: Ray Data, model replicas on a cluster's GPUs/CPUs "
                       f"({install_hint('ray')}); the same outputs")
    group.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray for this run)")
    group.add_argument("--replicas", type=int, help="Ray: model replicas (default: one per GPU, or 1 without GPUs)")
    group.add_argument("--gpus-per-replica", type=float,
                       help="Ray: GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-replica", type=float, help="Ray: CPUs per replica (default 1)")
    group.add_argument("--threads", type=int,
                       help="local engine: torch's CPU threads (default: torch's own, $OMP_NUM_THREADS or the cores); "
                       "recorded with the outputs, since the last bits of the results depend on it: a Ray replica runs "
                       "with its whole --cpus-per-replica, so --threads 1 matches replicas of 1 CPU")


@contextlib.contextmanager
def local_threads(args: argparse.Namespace):
    """While the block runs, torch uses --threads CPU threads (when given); the count before is restored after.
    InputError for fewer than 1, or with --engine ray (a replica's threads follow --cpus-per-replica)."""
    if args.threads is None:
        yield
        return
    from ..errors import InputError

    if args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.engine == "ray":
        raise InputError("--threads is for the local engine; a Ray replica runs with as many torch threads as its "
                         "whole --cpus-per-replica (at least 1)")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ray_settings(args: argparse.Namespace, **pipeline):
    """(PipelineSpec, Resources) of the Ray engine from the shared flags."""
    from ..distributed import PipelineSpec, Resources, require_ray

    require_ray()
    spec = PipelineSpec(deris=args.deris, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                        runtime=args.runtime, **pipeline)
    return spec, Resources(address=args.address, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica)


def pipeline_from_args(args: argparse.Namespace):
    from ..pipeline import Pipeline

    gate = False if args.no_gate else args.gate
    return Pipeline(deris=args.deris, gate=gate, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, tau=args.tau,
                    operating_point=args.operating_point, answer=args.answer, runtime=args.runtime)


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


def add_training_run_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --quiet of the training commands; `training_log` reads --quiet."""
    add_device_dtype(parser, dtype=False)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def training_log(args: argparse.Namespace):
    """The progress-line printer a training command passes on: print, or nothing with --quiet."""
    return (lambda line: None) if args.quiet else print
