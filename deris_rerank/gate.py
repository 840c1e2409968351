"""Old import path of the Venice-H1 gate (kept for existing code): the gate networks now live in
`deris_rerank.venice.gate`, the decision rule in `venice.decision` and the file formats in
`venice.gate_files`."""
from .venice.decision import DecisionRule, GateDecision, apply_rule, check_tau
from .venice.gate import GATE_CLASSES, N_MASK_STATS, PACKAGED, RELEASED, GateConfig, PackagedGate, ReleasedGate, VeniceGate
from .venice.gate_files import CALIBRATED_FORMAT_NAME, FORMAT_NAME, FORMAT_VERSION, load_gate, save_gate

__all__ = [
    "CALIBRATED_FORMAT_NAME", "FORMAT_NAME", "FORMAT_VERSION", "GATE_CLASSES", "N_MASK_STATS", "PACKAGED", "RELEASED",
    "DecisionRule", "GateConfig", "GateDecision", "PackagedGate", "ReleasedGate", "VeniceGate",
    "apply_rule", "check_tau", "load_gate", "save_gate",
]
