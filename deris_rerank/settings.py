"""The settings of the training commands, as plain dataclasses (no torch): the CLI builds its
flags from them without importing training code, and the trainers import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Tuple

GRID_SIZES: Tuple[int, ...] = (4, 8, 16)  # the grid-signature scales (side lengths)
FEATURE_SETS: Dict[str, Tuple[int, ...]] = {"full": GRID_SIZES, "base": (), "grid4": (4,), "grid8": (8,), "grid16": (16,)}
FUSIONS = ("learned", "none")


@dataclass
class GateTrainingSettings:
    """The knobs both re-ranker recipes have, with the same flags and defaults (the Venice-H1 card's)."""

    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 512
    epochs: int = 20
    warmup_epochs: int = 3
    seed: int = 42
    hidden_dim: int = 512
    n_layers: int = 3
    n_heads: int = 8
    dropout: float = 0.1


@dataclass
class TrainSettings(GateTrainingSettings):
    """Every knob of the Venice-H1 recipe (defaults: the Venice-H1 card)."""

    focal_gamma: float = 2.0
    gain_weight: float = 5.0
    smooth_l1_beta: float = 0.1
    amp: bool = True
    features: str = "full"
    tune_temp: bool = False
    tune_margin: bool = False


@dataclass
class CalibratedSettings(GateTrainingSettings):
    """Every knob of the calibrated recipe, beyond those it shares with the Venice-H1 recipe.

    retrieval: k of the retrieval memory (0 = no memory, the default); the other retrieval_* and
    memory_* fields (RETRIEVAL_SETTINGS) say how it is built (see `workflow.retrieval`).
    sets: train a set re-ranker (answers of no object or several; needs caches extracted with the
    set fields, e.g. RefShapes in gres mode); set_existence / set_overlap: its optional inputs;
    member_weight / kind_weight: its two extra losses; set_max_harmful / set_conservative_harmful:
    the budgets (%) of its "tuned" and "conservative" set points, harmful meaning an answer more
    than 0.01 IoU below DeRIS's own union answer."""

    target_temperature: float = 0.05
    aux_weight: float = 0.5
    failure_weight: float = 1.0
    fusion_lr_scale: float = 20.0
    text: bool = True
    fusion: str = "learned"
    geometry: bool = False
    max_harmful: float = 5.0
    conservative_harmful: float = 1.0
    harm_confidence: float = 0.95
    retrieval: int = 0
    memory_size: int = 20000
    memory_source: str = "train"
    retrieval_keys: str = "cand_text"
    retrieval_values: str = "gain"
    retrieval_temperature: float = 0.1
    memory_dtype: str = "float16"
    sets: bool = False
    set_existence: bool = False
    set_overlap: bool = False
    member_weight: float = 1.0
    kind_weight: float = 1.0
    set_max_harmful: float = 8.0
    set_conservative_harmful: float = 3.0


# how operating points are picked on the tuning split (retune); add-memory also draws its memory with the seed
POINT_RULE_SETTINGS = ("max_harmful", "conservative_harmful", "harm_confidence", "set_max_harmful", "set_conservative_harmful")
POINT_SETTINGS = ("seed", *POINT_RULE_SETTINGS)
RETRIEVAL_SETTINGS = ("retrieval", "memory_size", "memory_source", "retrieval_keys", "retrieval_values",
                      "retrieval_temperature", "memory_dtype")
MEMORY_SOURCES = ("train", "tune")
RETRIEVAL_KEY_SPACES = ("cand", "cand_text")
RETRIEVAL_VALUE_KINDS = ("gain", "iou")
MEMORY_DTYPES = ("float16", "float32")
SHARED_SETTINGS = tuple(f.name for f in fields(GateTrainingSettings))


@dataclass
class DerisTrainSettings:
    """Knobs of `train_deris` (defaults sized for DeRIS-tiny on a CPU)."""

    steps: int = 6000
    batch_size: int = 16
    lr: float = 8e-4
    weight_decay: float = 0.05
    warmup_steps: int = 300
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    num_workers: int = 1
    non_referent_rate: float = 0.15  # gres data only: DeRIS's non-referent sample conversion (its gRefCOCO rate)
    turn_around_rate: float = 0.0  # gres data only: chance that a directed expression is joined by its turned-around version


@dataclass
class PerceptionPretrainSettings:
    """Knobs of `pretrain_perception` (defaults: a few minutes for DeRIS-tiny on a CPU)."""

    steps: int = 1500
    objects_per_step: int = 64
    crop_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
