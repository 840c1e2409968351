"""The `deris-rerank` console command.

Each subcommand is a small function over the library API. Mistakes a user can fix
(`DerisRerankError`) are printed as one line on stderr with exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .errors import DerisRerankError
from .version import __version__


def _add_rule_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tau", type=float, help="failure threshold: switch only if p_fail > tau")
    parser.add_argument("--temp", type=float, help="temperature applied to the failure logit")
    parser.add_argument("--margin-pred", type=float, help="minimum predicted gain of the alternative")
    parser.add_argument("--margin-gap", type=float, help="minimum gap between the two best alternatives")


def _rule_overrides(args: argparse.Namespace) -> dict:
    return {"tau": args.tau, "temp": args.temp, "margin_pred": args.margin_pred, "margin_gap": args.margin_gap}


def cmd_convert_gate(args: argparse.Namespace) -> int:
    """Convert a Venice-H1 gate checkpoint to safetensors + JSON."""
    from .gate import load_gate, save_gate

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

    convert = commands.add_parser(
        "convert",
        help="convert an official DeRIS checkpoint (.pth) to safetensors + config.json",
        description="Read an official DeRIS checkpoint safely (weights_only) and write OUT_DIR/model.safetensors "
        "and OUT_DIR/config.json (with the weights' sha256), so later loads never touch pickle.",
    )
    convert.add_argument("checkpoint", help="official DeRIS .pth file")
    convert.add_argument("output", help="output folder")
    convert.add_argument("--preset", help="deris-l-refcoco, deris-b-refcoco, deris-l-grefcoco or deris-b-grefcoco "
                         "(default: detected from the checkpoint's shapes)")
    convert.set_defaults(run=cmd_convert)

    convert_gate = commands.add_parser(
        "convert-gate",
        help="convert a Venice-H1 gate checkpoint (.pt/.pth) to safetensors + JSON",
        description="Read a Venice-H1 gate checkpoint safely and write OUTPUT.safetensors and OUTPUT.json.",
    )
    convert_gate.add_argument("checkpoint", help="Venice-H1 .pt/.pth file, or one of ours (.safetensors)")
    convert_gate.add_argument("output", help="output path; .safetensors and .json are written beside it")
    _add_rule_overrides(convert_gate)
    convert_gate.set_defaults(run=cmd_convert_gate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
