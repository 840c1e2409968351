"""Referring-segmentation datasets: annotation readers (RefCOCO family) and RefShapes (synthetic)."""
from .refcoco import list_splits, load_split, read_grefcoco, read_refer, read_seqtr, write_seqtr
from .refshapes import RefShapes, corpus, write_refshapes
from .sample import ReferringSample

__all__ = [
    "RefShapes",
    "ReferringSample",
    "corpus",
    "list_splits",
    "load_split",
    "read_grefcoco",
    "read_refer",
    "read_seqtr",
    "write_refshapes",
    "write_seqtr",
]
