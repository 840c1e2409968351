"""DeRIS model configuration and the named presets of the official checkpoints.

Sizes that upstream hard-codes (3 feature levels, 4 sampling points, GroupNorm 32,
8 attention heads in the pixel decoder, decoder, loopback and aligner, aligner FFN 512,
aligner depth 3) are fields here too, with upstream's values as defaults, so a small
preset is the same model class with other numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

from ..errors import CheckpointError


@dataclass(frozen=True)
class SwinConfig:
    """mmseg-style Swin Transformer (the perception backbone)."""

    embed_dim: int = 128
    depths: Tuple[int, ...] = (2, 2, 18, 2)
    num_heads: Tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_chans: int = 3

    @property
    def stage_dims(self) -> Tuple[int, ...]:
        """Channels of res2..res5: embed_dim * (1, 2, 4, 8)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class Beit3Config:
    """Multiway BEiT-3 encoder (the cognition branch)."""

    embed_dim: int = 1024
    num_heads: int = 16
    ffn_dim: int = 4096
    num_layers: int = 24
    vocab_size: int = 64010
    img_size: int = 224
    patch_size: int = 16
    max_text_positions: int = 1024
    layernorm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


TASKS = ("ris", "gres")


@dataclass(frozen=True)
class DerisConfig:
    """A whole DeRIS model. `hidden_dim` is C: pixel-decoder conv/mask dim and decoder width."""

    name: str = "custom"
    swin: SwinConfig = field(default_factory=SwinConfig)
    beit3: Beit3Config = field(default_factory=Beit3Config)
    hidden_dim: int = 256
    num_queries: int = 10
    max_tokens: int = 20
    image_size: int = 384  # perception (Swin) input side
    score_threshold: float = 0.9  # DeRIS's own answer: union of candidates with score > this
    mask_threshold: float = 0.5
    num_heads: int = 8
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn: int = 1024
    num_feature_levels: int = 3
    num_points: int = 4
    group_norm_groups: int = 32
    decoder_layers: int = 3
    decoder_ffn: int = 2048
    aligner_layers: int = 3
    aligner_ffn: int = 512
    task: str = "ris"  # what it was trained for: "ris" (one referent) or "gres" (none, one or several); not architecture

    @property
    def image_size_lo(self) -> int:
        """Cognition (BEiT-3) input side."""
        return self.beit3.img_size

    @property
    def loopback_rounds(self) -> int:
        """One round on the initial queries plus one after each decoder layer."""
        return self.decoder_layers + 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CheckpointError(f"DeRIS config task must be one of {', '.join(TASKS)}, got {self.task!r}")

    @classmethod
    def preset(cls, name: str) -> "DerisConfig":
        """One of `PRESETS`: deris-l-refcoco, deris-b-refcoco, deris-l-grefcoco, deris-b-grefcoco."""
        by_name = {key.lower(): config for key, config in PRESETS.items()}
        if name.lower() not in by_name:
            raise CheckpointError(f"unknown DeRIS preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return by_name[name.lower()]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "DeRIS config") -> "DerisConfig":
        """Inverse of `to_dict`. Raises CheckpointError naming `origin` for unknown or missing fields."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{origin}: 'config' must be a JSON object")
        data = dict(data)
        swin = _checked_fields(SwinConfig, data.pop("swin", {}), f"{origin} (config.swin)")
        beit3 = _checked_fields(Beit3Config, data.pop("beit3", {}), f"{origin} (config.beit3)")
        top = _checked_fields(cls, data, f"{origin} (config)", ignore=("swin", "beit3"))
        return cls(swin=SwinConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in swin.items()}),
                   beit3=Beit3Config(**beit3), **top)


def _checked_fields(dataclass_type, values: Any, origin: str, ignore: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """`values` as a dict, after checking that it names only fields of `dataclass_type` and every required one."""
    if not isinstance(values, Mapping):
        raise CheckpointError(f"{origin}: expected a JSON object")
    fields = {f.name: f for f in dataclasses.fields(dataclass_type) if f.name not in ignore}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(
            f"{origin} has unknown field(s) {', '.join(map(repr, unknown))}: written by a newer deris-rerank or "
            f"edited by hand; upgrade deris-rerank or convert the checkpoint again"
        )
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{origin} lacks the field(s) {', '.join(map(repr, missing))}; convert the checkpoint again")
    return dict(values)


_SWIN_B = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)
_SWIN_S = SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)
_BEIT3_LARGE = Beit3Config(embed_dim=1024, num_heads=16, ffn_dim=4096, num_layers=24)
_BEIT3_BASE = Beit3Config(embed_dim=768, num_heads=12, ffn_dim=3072, num_layers=12)

# DeRIS-tiny: the same model with small sizes, for the embedded default trained on RefShapes
# (192 px perception input, 128 px cognition input, a token table of 128 rows: room for a
# sentencepiece model of up to 126 pieces trained on the RefShapes grammar). Its answer
# threshold, 0.6, is the one of 0.3 ... 0.9 with the best DeRIS-union mIoU on RefShapes
# gate-tune images (docs/training.md says how it was measured).
DERIS_TINY = DerisConfig(
    "deris-tiny",
    SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=6),
    Beit3Config(embed_dim=96, num_heads=4, ffn_dim=384, num_layers=3, vocab_size=128,
                img_size=128, max_text_positions=64),
    hidden_dim=64,
    image_size=192,
    num_heads=4,
    pixel_decoder_layers=2,
    pixel_decoder_ffn=256,
    decoder_ffn=256,
    aligner_ffn=128,
    score_threshold=0.6,
)

# DeRIS-L uses Swin-B and BEiT-3 large; DeRIS-B uses Swin-S and BEiT-3 base (see the manifests).
PRESETS: Dict[str, DerisConfig] = {
    "deris-l-refcoco": DerisConfig("deris-l-refcoco", _SWIN_B, _BEIT3_LARGE),
    "deris-b-refcoco": DerisConfig("deris-b-refcoco", _SWIN_S, _BEIT3_BASE),
    "deris-l-grefcoco": DerisConfig("deris-l-grefcoco", _SWIN_B, _BEIT3_LARGE, num_queries=20, max_tokens=50, task="gres"),
    "deris-b-grefcoco": DerisConfig(
        "deris-b-grefcoco", _SWIN_S, _BEIT3_BASE, num_queries=20, max_tokens=50, score_threshold=0.7, task="gres"
    ),
    "deris-tiny": DERIS_TINY,
}
# The official checkpoints' file names as released upstream (the presets deris-tiny has none).
UPSTREAM_CHECKPOINT_NAMES: Dict[str, str] = {
    "deris-l-refcoco": "DERIS-L-refcoco.pth",
    "deris-b-refcoco": "DERIS-B-refcoco.pth",
    "deris-l-grefcoco": "DERIS-L-grefcoco.pth",
    "deris-b-grefcoco": "DERIS-B-grefcoco.pth",
}
