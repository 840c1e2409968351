"""Perception pre-training on object crops: the stand-in for upstream's pre-trained Swin.

Upstream's Swin comes pre-trained (ImageNet, then instance segmentation). From scratch, whole
RefShapes scenes teach colour, size and style quickly but an object's *shape* very slowly (the
pixel features barely separate shapes after DeRIS-tiny's whole 6,000-step run), while the same
Swin classifies shapes from crops centred on one object within a few hundred steps. So this
stage trains the model's own Swin on native-scale crops (`crop_size` px around each instance's
centre, no resizing, so the features transfer to whole scenes) to predict the instance's
shape, colour, size and style from its max-pooled last stage; `train-deris --init-perception
FILE` then starts DeRIS from these Swin weights. Only the Swin is saved.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from ..data.refshapes import RefShapes
from ..deris.config import DerisConfig
from ..deris.swin import SwinBackbone
from ..fileio import atomic_write
from ..settings import PerceptionPretrainSettings
from ..transforms import prepare_images
from .attributes import ATTRIBUTE_VOCABULARIES, AttributeHead, attribute_cross_entropy, attribute_labels




def object_crops(image: Tensor, centres: Sequence[Tuple[float, float]], crop_size: int) -> Tensor:
    """Crops [K, 3, c, c] of a normalised image [3, H, W], each centred on (x, y) in pixels; zero outside."""
    half = crop_size // 2
    padded = F.pad(image, (half, half, half, half))
    offsets = torch.arange(crop_size, device=image.device)
    xy = torch.tensor([[round(x), round(y)] for x, y in centres], device=image.device, dtype=torch.long)
    rows = (xy[:, 1:2] + offsets)[:, :, None]  # [K, c, 1]: padded row = y - half + half + i
    cols = (xy[:, 0:1] + offsets)[:, None, :]  # [K, 1, c]
    return padded[:, rows, cols].permute(1, 0, 2, 3)


def crop_batch(dataset: RefShapes, config: DerisConfig, settings: PerceptionPretrainSettings, step: int) -> Tuple[Tensor, Tensor]:
    """Step `step`'s crops [M, 3, c, c] and labels int64 [M, 4]: whole scenes drawn with a generator
    seeded by (seed, step) until at least `objects_per_step` objects."""
    rng = np.random.default_rng([settings.seed, step])
    crops: List[Tensor] = []
    labels: List[Tensor] = []
    objects = 0
    while objects < settings.objects_per_step:
        scene = dataset.scene(int(rng.integers(0, dataset.num_images)))
        image, _ = prepare_images(scene.image, config.image_size, config.image_size_lo)
        scale = config.image_size / scene.image.shape[1], config.image_size / scene.image.shape[0]
        centres = [(obj.centre[0] * scale[0], obj.centre[1] * scale[1]) for obj in scene.objects]
        crops.append(object_crops(image, centres, settings.crop_size))
        labels.append(attribute_labels(scene.objects))
        objects += len(scene.objects)
    return torch.cat(crops), torch.cat(labels)


def pretrain_perception(
    config: DerisConfig,
    dataset: RefShapes,
    out_file: Path,
    settings: PerceptionPretrainSettings,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> SwinBackbone:
    """Train a fresh Swin of `config` on object crops; write its state dict to `out_file` (safetensors)."""
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    swin = SwinBackbone(config.swin).to(device)
    head = AttributeHead(config.swin.stage_dims[-1], [len(values) for _, values in ATTRIBUTE_VOCABULARIES]).to(device)
    parameters = list(swin.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    log(f"pre-training the {config.name} Swin on {settings.crop_size}-px object crops, {settings.steps} steps on {device}")
    began, running = time.perf_counter(), []
    for step in range(settings.steps):
        crops, labels = crop_batch(dataset, config, settings, step)
        logits = head(swin(crops.to(device))[-1].amax(dim=(2, 3)))
        loss = attribute_cross_entropy(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = [float((x.argmax(-1).cpu() == labels[:, a]).float().mean()) for a, x in enumerate(logits)]
        running.append([float(loss.detach())] + accuracy)
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            mean = np.mean(running, axis=0)
            accuracies = ", ".join(f"{name} {acc:.2f}" for (name, _), acc in zip(ATTRIBUTE_VOCABULARIES, mean[1:]))
            log(f"step {step + 1}/{settings.steps} ({(step + 1) / (time.perf_counter() - began):.2f} steps/s): "
                f"loss {mean[0]:.4f}, accuracy {accuracies}")
            running = []
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in swin.state_dict().items()}
    atomic_write(out_file, lambda tmp: save_file(state, tmp, metadata={"what": "deris_rerank perception pre-training", "preset": config.name}))
    return swin
