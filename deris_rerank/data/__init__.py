"""Referring-segmentation datasets: annotation readers (RefCOCO family) and RefShapes (synthetic)."""
from .sample import ReferringSample

__all__ = ["ReferringSample"]
