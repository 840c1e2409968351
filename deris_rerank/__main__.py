"""`python -m deris_rerank` runs the `deris-rerank` command."""
import sys

from .cli import main

sys.exit(main())
