"""DerisModel: the whole DeRIS inference graph.

    image_hi [B,3,384,384] -> Swin -> pixel decoder ---------------------.   (text-independent:
                                                                        |    `encode_image`)
    image_lo [B,3,224,224] + tokens -> BEiT-3 -> projections -> loopback decoder -> aligner
                                                                   |               |
                       masks, boxes, referring logits of every round        existence logit

Module names map to upstream's checkpoint prefixes in `deris_rerank.checkpoints`.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..preprocess import refer_scores
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


def upsample_masks(mask_logits_stride4: Tensor) -> Tensor:
    """Stride-4 mask logits [..., h, w] -> [..., 4h, 4w], exactly as upstream.

    Bilinear with align_corners=True, computed in float32 and cast back to the input dtype.
    """
    lead, (h, w) = mask_logits_stride4.shape[:-2], mask_logits_stride4.shape[-2:]
    flat = mask_logits_stride4.reshape(-1, 1, h, w).float()
    up = F.interpolate(flat, size=(4 * h, 4 * w), mode="bilinear", align_corners=True)
    return up.to(mask_logits_stride4.dtype).reshape(*lead, 4 * h, 4 * w)


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
    ) -> Dict[str, Tensor]:
        """Run DeRIS on B image-text pairs.

        image_hi [B, 3, S, S] and image_lo [B, 3, s, s]: normalised RGB (see `preprocess`);
        `image_hi` may be None when `image_features` (from `encode_image`) is given.
        tokens int64 [B, T]; padding_mask [B, T], 1/True = padding.
        batch_semantics: "per_sample" (default; a result never depends on its batch) or
        "upstream" (upstream's batch-coupled loopback, for re-running its batched evaluation).
        timer: optional `StageTimer` that receives swin, pixel_decoder, beit3, decoder, aligner,
        upsample times.

        Returns a dict:
          mask_logits_stride4 [B, N, S/4, S/4]; mask_logits [B, N, S, S] (unless with_mask_logits=False);
          refer_logits [B, N, 2]; scores [B, N] (referring probability); boxes [B, N, 4]
          (normalised cx, cy, w, h); existence_logit [B, 1]; query_embed [B, N, C] (perception
          queries after the last round); cognition_embed [B, N, C] (aligner output);
          text_feat [B, T, C] (the cognition branch's text token features: BEiT-3's text
          tokens projected to the decoder width, what the decoder and aligner attend to);
          text_padding bool [B, T] (True = padding, the tokens the text features exclude);
          and with return_rounds=True, `rounds`: one dict per loopback round.
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
            )
        final = rounds[-1]
        with stage(timer, "aligner"):
            cognition_embed, existence_logit = self.cognition.align(final["query"], text_feat, padding)
        out = {
            "mask_logits_stride4": final["mask_logits_stride4"],
            "refer_logits": final["refer_logits"],
            "scores": refer_scores(final["refer_logits"]),
            "boxes": final["boxes"],
            "existence_logit": existence_logit,
            "query_embed": final["query"],
            "cognition_embed": cognition_embed,
            "text_feat": text_feat,
            "text_padding": padding,
        }
        if with_mask_logits:
            with stage(timer, "upsample"):
                out["mask_logits"] = upsample_masks(final["mask_logits_stride4"])
        if return_rounds:
            out["rounds"] = rounds
            out["beit3_tokens"] = encoded
            out["img_feat"], out["initial_queries"] = img_feat, queries
        return out
