"""Training-only instance-attribute heads: the stand-in for a pre-trained perception branch.

Upstream starts DeRIS from a perception branch pre-trained for instance segmentation with
category labels, so its pixel features and queries already say *what* each object is. Trained
from scratch with masks alone, DeRIS-tiny's do not: linear probes on its pixel-decoder maps
read an object's colour at 40-60% (75-99% in the first Swin stage) and its shape at chance,
and on its queries both near chance, so the referring head has nothing to compare the text
with. When the data labels every instance (RefShapes: shape, colour, size, style), these
heads predict the labels (1) from each pixel-decoder map averaged over the instance's true
mask, (2) from the decoder queries matched to the instance and (3) the referent's labels from
the text features (`losses.referent_attribute_loss`). None of this is exported.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.refshapes import COLOURS, SHAPES, SIZES, STYLES

# Per-instance labels RefShapes gives: attributes int64 [K, 4] index these, in this order.
ATTRIBUTE_VOCABULARIES: Tuple[Tuple[str, Sequence[str]], ...] = (
    ("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES), ("style", STYLES)
)


def attribute_labels(objects: Sequence) -> Tensor:
    """int64 [K, 4]: each object's (shape, colour, size, style) index in ATTRIBUTE_VOCABULARIES.

    objects: K RefShapes `SceneObject`s (anything with those four attributes)."""
    labels = [[values.index(getattr(obj, name)) for name, values in ATTRIBUTE_VOCABULARIES] for obj in objects]
    return torch.tensor(labels, dtype=torch.long).reshape(len(labels), len(ATTRIBUTE_VOCABULARIES))


class AttributeHead(nn.Module):
    """Features [..., C] -> one logit tensor [..., V_a] per attribute (LayerNorm + Linear)."""

    def __init__(self, dim: int, vocabulary_sizes: Sequence[int]):
        super().__init__()
        self.sizes = list(vocabulary_sizes)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, sum(self.sizes))

    def forward(self, features: Tensor) -> List[Tensor]:
        return list(self.linear(self.norm(features)).split(self.sizes, dim=-1))


class AttributeHeads(nn.Module):
    """`queries`: for the decoder queries [B, N, C]; `maps[l]`: for feature map l (C channels each);
    `text`: for the pooled text features [B, C] (the referent's attributes)."""

    def __init__(self, dim: int, num_maps: int, vocabulary_sizes: Sequence[int] = tuple(len(v) for _, v in ATTRIBUTE_VOCABULARIES)):
        super().__init__()
        self.queries = AttributeHead(dim, vocabulary_sizes)
        self.maps = nn.ModuleList(AttributeHead(dim, vocabulary_sizes) for _ in range(num_maps))
        self.text = AttributeHead(dim, vocabulary_sizes)


def attribute_cross_entropy(logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """Mean over attributes of the CE of logits[a] [M, V_a] against labels[:, a] (labels int64 [M, A])."""
    return torch.stack([F.cross_entropy(x.float(), labels[:, a]) for a, x in enumerate(logits)]).mean()


def pooled_attribute_loss(
    feature_maps: Sequence[Tensor], instances: Sequence[Tensor], attributes: Sequence[Tensor], heads: Sequence[AttributeHead]
) -> Tensor:
    """Mean over maps of the attribute CE read from mask-averaged features.

    feature_maps: L maps [B, C, h_l, w_l]; instances[b] float [K_b, h, w] (0/1, any resolution;
    area-resized to each map); attributes[b] int64 [K_b, A]; heads: L heads.
    """
    labels = torch.cat(list(attributes))
    if labels.shape[0] == 0:
        return feature_maps[0].sum() * 0
    losses = []
    for fmap, head in zip(feature_maps, heads):
        pooled = []
        for b, masks in enumerate(instances):
            weights = F.interpolate(masks[:, None].to(fmap.dtype), size=fmap.shape[-2:], mode="area")[:, 0]
            total = weights.sum((1, 2)).clamp(min=1e-6)[:, None]
            pooled.append(torch.einsum("khw,chw->kc", weights, fmap[b]) / total)
        losses.append(attribute_cross_entropy(head(torch.cat(pooled)), labels))
    return torch.stack(losses).mean()
