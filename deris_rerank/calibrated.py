"""Old import path of the calibrated re-ranker (kept for existing code): it now lives in
`deris_rerank.venice.calibrated`, its files in `venice.gate_files`."""
from .venice.calibrated import CALIBRATED, GEOMETRY_DIM, LOG_SCORE_FLOOR, CalibratedConfig, CalibratedReranker, CalibrationLayer, mask_geometry
from .venice.gate_files import CALIBRATED_FORMAT_NAME as FORMAT_NAME
from .venice.gate_files import CALIBRATED_FORMAT_VERSION as FORMAT_VERSION
from .venice.gate_files import calibrated_from_files, save_calibrated

__all__ = [
    "CALIBRATED", "FORMAT_NAME", "FORMAT_VERSION", "GEOMETRY_DIM", "LOG_SCORE_FLOOR",
    "CalibratedConfig", "CalibratedReranker", "CalibrationLayer", "calibrated_from_files", "mask_geometry", "save_calibrated",
]
