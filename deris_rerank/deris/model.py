"""DerisModel: the whole DeRIS inference graph.

    image_hi [B,3,384,384] -> Swin -> pixel decoder ---------------------.   (text-independent:
                                                                        |    `encode_image`)
    image_lo [B,3,224,224] + tokens -> BEiT-3 -> projections -> loopback decoder -> aligner
                                                                   |               |
                       masks, boxes, referring logits of every round        existence logit

Module names map to upstream's checkpoint prefixes in `deris_rerank.checkpoints`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .answer import refer_scores
from ..timing import StageTimer, stage
from .beit3 import Beit3Encoder
from .cognition import CognitionBranch
from .config import DerisConfig
from .loopback import LoopbackDecoder
from .pixel_decoder import PixelDecoder
from .swin import SwinBackbone


class ImageFeatures(NamedTuple):
    """Text-independent features of a batch of perception images; cache and reuse per image.

    mask_features [B, C, S/4, S/4]; multi_scale: 3 maps [B, C, h, w], low to high resolution.
    """

    mask_features: Tensor
    multi_scale: List[Tensor]

    def select(self, index: Tensor) -> "ImageFeatures":
        """Rows `index` (int64 [B']) of every tensor, e.g. to repeat one image for several texts."""
        return ImageFeatures(self.mask_features[index], [m[index] for m in self.multi_scale])

    @staticmethod
    def cat(parts: List["ImageFeatures"]) -> "ImageFeatures":
        """The images of `parts` one after another (batch dimension)."""
        return ImageFeatures(
            torch.cat([p.mask_features for p in parts]),
            [torch.cat([p.multi_scale[level] for p in parts]) for level in range(len(parts[0].multi_scale))],
        )


def upsample_masks(mask_logits_stride4: Tensor) -> Tensor:
    """Stride-4 mask logits [..., h, w] -> [..., 4h, 4w], exactly as upstream.

    Bilinear with align_corners=True, computed in float32 and cast back to the input dtype.
    """
    lead, (h, w) = mask_logits_stride4.shape[:-2], mask_logits_stride4.shape[-2:]
    flat = mask_logits_stride4.reshape(-1, 1, h, w).float()
    up = F.interpolate(flat, size=(4 * h, 4 * w), mode="bilinear", align_corners=True)
    return up.to(mask_logits_stride4.dtype).reshape(*lead, 4 * h, 4 * w)


@dataclass
class DerisOutput:
    """What `DerisModel.forward` returns for B pairs with N query slots (slot order).

    mask_logits_stride4 [B, N, S/4, S/4] and mask_logits [B, N, S, S] (None when asked not to
    upsample) mask logits; refer_logits [B, N, 2] (class 0 = referred); scores [B, N] referring
    probability softmax(refer_logits)[..., 0]; boxes [B, N, 4] (cx, cy, w, h in [0, 1]);
    existence_logit [B, 1]; query_embed [B, N, C] perception queries after the last round;
    cognition_embed [B, N, C] the aligner's output; text_feat [B, T, C] the expression's
    projected cognition tokens and text_padding bool [B, T] (True = padding).
    With return_rounds=True also: rounds (one dict per loopback round, see `LoopbackDecoder`),
    beit3_tokens [B, L, E] BEiT-3's output, img_feat [B, C, h, w] its projected image tokens,
    initial_queries [B, N, C]. Also readable as a mapping: `output["scores"]`.
    """

    mask_logits_stride4: Tensor
    refer_logits: Tensor
    scores: Tensor
    boxes: Tensor
    existence_logit: Tensor
    query_embed: Tensor
    cognition_embed: Tensor
    text_feat: Tensor
    text_padding: Tensor
    mask_logits: Optional[Tensor] = None
    rounds: Optional[List[Dict[str, Tensor]]] = None
    beit3_tokens: Optional[Tensor] = None
    img_feat: Optional[Tensor] = None
    initial_queries: Optional[Tensor] = None

    def __getitem__(self, name: str):
        value = getattr(self, name, None) if name in self.__dataclass_fields__ else None
        if value is None:
            raise KeyError(f"{name!r} is not in this output (present: {', '.join(self.keys())})")
        return value

    def __contains__(self, name: object) -> bool:
        return name in self.__dataclass_fields__ and getattr(self, name) is not None

    def keys(self) -> List[str]:
        """Names of the fields that are set."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


class DerisModel(nn.Module):
    """DeRIS in plain PyTorch. Build with a `DerisConfig`; load weights with `load_deris`."""

    def __init__(self, config: DerisConfig):
        super().__init__()
        self.config = config
        self.swin = SwinBackbone(config.swin)
        self.pixel_decoder = PixelDecoder(config)
        self.beit3 = Beit3Encoder(config.beit3)
        self.cognition = CognitionBranch(config)
        self.decoder = LoopbackDecoder(config)

    def encode_image(self, image_hi: Tensor, timer: Optional[StageTimer] = None) -> ImageFeatures:
        """Swin + pixel decoder on normalised perception images [B, 3, S, S] (S = config.image_size)."""
        with stage(timer, "swin"):
            features = self.swin(image_hi)
        with stage(timer, "pixel_decoder"):
            mask_features, multi_scale = self.pixel_decoder(features)
        return ImageFeatures(mask_features, list(multi_scale))

    def forward(
        self,
        image_hi: Optional[Tensor],
        image_lo: Tensor,
        tokens: Tensor,
        padding_mask: Tensor,
        batch_semantics: str = "per_sample",
        image_features: Optional[ImageFeatures] = None,
        return_rounds: bool = False,
        with_mask_logits: bool = True,
        timer: Optional[StageTimer] = None,
    ) -> DerisOutput:
        """Run DeRIS on B image-text pairs.

        image_hi [B, 3, S, S] and image_lo [B, 3, s, s]: normalised RGB (see `transforms.prepare_images`);
        `image_hi` may be None when `image_features` (from `encode_image`) is given.
        tokens int64 [B, T]; padding_mask [B, T], 1/True = padding.
        batch_semantics: "per_sample" (default; a result never depends on its batch) or
        "upstream" (upstream's batch-coupled loopback, for re-running its batched evaluation).
        return_rounds: also return every loopback round with its intermediate states (training,
        parity checks). timer: optional `StageTimer` that receives swin, pixel_decoder, beit3,
        decoder, aligner, upsample times. Returns a `DerisOutput`.
        """
        if image_features is None:
            image_features = self.encode_image(image_hi, timer)
        padding = padding_mask.bool()
        with stage(timer, "beit3"):
            encoded = self.beit3(image_lo, tokens, padding)
            beit3_tokens = self.beit3.split_tokens(encoded)
            img_feat, text_feat, queries = self.cognition.project(beit3_tokens.image_tokens, beit3_tokens.text_tokens)
        with stage(timer, "decoder"):
            rounds = self.decoder(
                image_features.multi_scale,
                image_features.mask_features,
                queries,
                text_feat,
                padding,
                img_feat,
                batch_semantics=batch_semantics,
                keep_intermediates=return_rounds,
            )
        final = rounds[-1]
        with stage(timer, "aligner"):
            cognition_embed, existence_logit = self.cognition.align(final["query"], text_feat, padding)
        out = DerisOutput(
            mask_logits_stride4=final["mask_logits_stride4"],
            refer_logits=final["refer_logits"],
            scores=refer_scores(final["refer_logits"]),
            boxes=final["boxes"],
            existence_logit=existence_logit,
            query_embed=final["query"],
            cognition_embed=cognition_embed,
            text_feat=text_feat,
            text_padding=padding,
        )
        if with_mask_logits:
            with stage(timer, "upsample"):
                out.mask_logits = upsample_masks(final["mask_logits_stride4"])
        if return_rounds:
            out.rounds, out.beit3_tokens = rounds, encoded
            out.img_feat, out.initial_queries = img_feat, queries
        return out
