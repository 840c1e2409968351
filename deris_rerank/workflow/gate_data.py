"""Old import path of `GateData` (kept for existing code): now `deris_rerank.venice.gate_data`."""
from ..venice.gate_data import CACHE_TEXT_FIELDS, GateData, gate_outputs, load_gate_data

__all__ = ["CACHE_TEXT_FIELDS", "GateData", "gate_outputs", "load_gate_data"]
