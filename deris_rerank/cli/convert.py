"""Conversion: `deris-rerank convert` (official DeRIS files), `convert-gate` (Venice-H1) and `export-onnx`."""
from __future__ import annotations

import argparse
import json

from .options import add_rule_overrides, rule_overrides

def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an official DeRIS checkpoint to safetensors + config.json."""
    from ..checkpoints import load_deris, save_deris

    model = load_deris(args.checkpoint, config=args.preset)
    folder = save_deris(model, args.output)
    print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'} (preset {model.config.name})")
    return 0


def cmd_convert_gate(args: argparse.Namespace) -> int:
    """Convert a Venice-H1 gate checkpoint to safetensors + JSON."""
    from ..rerank.files import load_gate, save_gate

    gate = load_gate(args.checkpoint, **rule_overrides(args))
    written = save_gate(gate, args.output)
    print(f"wrote {written} and {written.with_suffix('.json')}")
    print(json.dumps(gate.settings(), indent=2))
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export a DeRIS model as ONNX (two graphs), with the tokenizer and re-ranker found beside it."""
    import shutil

    from ..checkpoints import load_deris
    from ..model_files import DERIS_BESIDE, model_folder, resolve_deris
    from ..onnx_export import export_onnx, import_onnx

    import_onnx()  # the missing extra in one line, before loading anything
    source = resolve_deris(args.model)
    folder = export_onnx(load_deris(source), args.output, opset=args.opset)
    copied = []
    for name in DERIS_BESIDE:  # what a pipeline looks for beside the model
        found = model_folder(source) / name
        if found.is_file():
            shutil.copyfile(found, folder / name)
            copied.append(name)
    print(f"wrote {folder}/image_encoder.onnx and expression.onnx (checked against PyTorch: see config.json)"
          + (f"; copied {', '.join(copied)}" if copied else ""))
    print(f"run it: deris-rerank segment --deris {folder} --runtime onnxruntime --image IMAGE --text TEXT")
    return 0


def add_commands(commands) -> None:
    """Add `convert`, `convert_gate` to the `deris-rerank` subcommands."""
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
    add_rule_overrides(convert_gate)
    convert_gate.set_defaults(run=cmd_convert_gate)

    export = commands.add_parser(
        "export-onnx",
        help="export a DeRIS model as ONNX, to run with --runtime onnxruntime",
        description="Write OUT/image_encoder.onnx (run once per image) and OUT/expression.onnx (per expression), "
        "checked with onnx.checker and against PyTorch, with config.json; the tokenizer and re-ranker found beside "
        "MODEL are copied beside them. Needs the onnx extra.",
    )
    export.add_argument("model", help="DeRIS model: a converted folder (e.g. deris_rerank/embedded/deris-tiny), an "
                        "official .pth or a preset name")
    export.add_argument("output", help="output folder")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.set_defaults(run=cmd_export_onnx)
