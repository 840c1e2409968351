"""deris-rerank: DeRIS referring segmentation in plain PyTorch with the Venice-H1 failure gate."""
from .errors import CheckpointError, DerisRerankError, InputError
from .gate import DecisionRule, GateConfig, GateDecision, VeniceGate, load_gate, save_gate
from .signatures import grid_signatures, mask_statistics
from .version import __version__

__all__ = [
    "CheckpointError",
    "DecisionRule",
    "DerisRerankError",
    "GateConfig",
    "GateDecision",
    "InputError",
    "VeniceGate",
    "__version__",
    "grid_signatures",
    "load_gate",
    "mask_statistics",
    "save_gate",
]
