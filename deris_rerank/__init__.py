"""deris-rerank: DeRIS referring segmentation in plain PyTorch with the Venice-H1 failure gate."""
from .candidates import Candidates
from .checkpoints import load_deris, save_deris
from .deris.config import DerisConfig
from .deris.model import DerisModel
from .errors import CheckpointError, DerisRerankError, InputError
from .gate import DecisionRule, GateConfig, GateDecision, VeniceGate, load_gate, save_gate
from .pipeline import EncodedImage, Pipeline
from .result import Result
from .signatures import grid_signatures, mask_statistics
from .version import __version__

__all__ = [
    "Candidates",
    "CheckpointError",
    "DecisionRule",
    "DerisConfig",
    "DerisModel",
    "DerisRerankError",
    "EncodedImage",
    "GateConfig",
    "GateDecision",
    "InputError",
    "Pipeline",
    "Result",
    "VeniceGate",
    "__version__",
    "grid_signatures",
    "load_deris",
    "load_gate",
    "mask_statistics",
    "save_deris",
    "save_gate",
]
