"""The `deris-rerank` console command.

Each subcommand is a small function over the library API, in the module of its group: segment.py
(segment, batch), app.py, workflow.py (extract, train-gate, add-memory, retune, evaluate),
training.py (train-deris, pretrain-perception), data.py (refshapes), convert.py (convert, convert-gate, export-onnx), doctor.py; options.py
holds the options several commands share. Mistakes a user can fix (`DerisRerankError`) are printed
as one line on stderr with exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from ..errors import DerisRerankError
from ..version import __version__
from . import app, convert, data, doctor, segment, training, workflow


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deris-rerank",
        description="DeRIS referring segmentation, re-ranked by Venice-H1 or the calibrated re-ranker.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (segment, app, workflow, training, data, convert, doctor):
        group.add_commands(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"deris-rerank: warning: {message}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 ('\udcff') is printed escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
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
