"""deris-rerank: DeRIS referring segmentation in plain PyTorch, re-ranked by Venice-H1 or the calibrated re-ranker.

The public names below are imported on first use (PEP 562), so `import deris_rerank.rerank.files` or
`deris-rerank --version` loads only what it needs (loading a gate never builds the DeRIS model).
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import CheckpointError, DerisRerankError, InputError
from .version import __version__

# public name -> the module that defines it
_LAZY = {
    "Candidates": ".candidates",
    "load_deris": ".checkpoints",
    "save_deris": ".checkpoints",
    "DerisConfig": ".deris.config",
    "DerisModel": ".deris.model",
    "DerisOutput": ".deris.model",
    "DecisionRule": ".rerank.decision",
    "GateDecision": ".rerank.decision",
    "GateConfig": ".rerank.venice",
    "VeniceGate": ".rerank.venice",
    "CalibratedReranker": ".rerank.calibrated",
    "load_gate": ".rerank.files",
    "save_gate": ".rerank.files",
    "save_calibrated": ".rerank.files",
    "EncodedImage": ".pipeline",
    "Pipeline": ".pipeline",
    "Result": ".result",
    "grid_signatures": ".rerank.signatures",
    "mask_statistics": ".rerank.signatures",
    "Beit3Tokenizer": ".tokenizer",
}

__all__ = sorted([*_LAZY, "CheckpointError", "DerisRerankError", "InputError", "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'deris_rerank' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return __all__
