"""Demo: segment an image for a referring expression.

    python demo/segment.py --image photo.jpg --text "man on left"

Same as `deris-rerank segment`; see `--help` for the options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from deris_rerank.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
