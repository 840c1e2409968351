"""`deris-rerank train-deris`: train a DeRIS preset on RefShapes (or any data giving instance masks).

The recipe follows the paper as far as it applies to training from scratch on synthetic data:
Hungarian matching of the query slots to all instances, BCE + Dice mask losses, referring
cross-entropy, existence BCE, the same losses on every loopback round (auxiliary weight 0.5),
AdamW with warm-up and cosine decay, gradient clipping. Runs on CPU or CUDA (bfloat16
autocast there), shows progress, checkpoints every `checkpoint_every` steps to
`<out>/checkpoint.pt` (plain tensors: read back with weights_only=True) and resumes from it;
seeded: the data of step s is a pure function of (seed, s).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from ..checkpoints import save_deris
from ..data.refshapes import RefShapes
from ..deris.config import DerisConfig
from ..deris.model import DerisModel
from ..fileio import atomic_write, read_torch_file
from ..preprocess import Beit3Tokenizer, prepare_images
from .losses import LossWeights, deris_loss

CHECKPOINT = "checkpoint.pt"


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


class RefShapesStream(IterableDataset):
    """Training batches from RefShapes: step s uses pairs [s*B, (s+1)*B) of a seeded permutation.

    Each example: (image_hi [3,S,S], image_lo [3,s,s], tokens [T], padding [T],
    instances float [K, S/4, S/4] (every object's visible mask), referred bool [K]).
    """

    def __init__(self, dataset: RefShapes, tokenizer_path: Path, config: DerisConfig, batch_size: int, start_step: int, seed: int):
        self.dataset, self.tokenizer_path, self.config = dataset, tokenizer_path, config
        self.batch_size, self.start_step, self.seed = batch_size, start_step, seed

    def __iter__(self) -> Iterator[List[tuple]]:
        tokenizer = Beit3Tokenizer(self.tokenizer_path)
        total = len(self.dataset)
        step = self.start_step
        while True:
            rng = np.random.default_rng([self.seed, step])
            yield [self._example(int(i), tokenizer) for i in rng.integers(0, total, self.batch_size)]
            step += 1

    def _example(self, index: int, tokenizer: Beit3Tokenizer) -> tuple:
        image, k = self._locate(index)
        scene = self.dataset.scene(image)
        expression = scene.expressions[k]
        image_hi, image_lo = prepare_images(scene.image, self.config.image_size, self.config.image_size_lo)
        tokens, padding = tokenizer.encode(expression.text, self.config.max_tokens)
        size = self.config.image_size // 4
        masks = torch.from_numpy(np.array(scene.masks, dtype=np.float32))[:, None]
        instances = (F.interpolate(masks, size=(size, size), mode="area")[:, 0] >= 0.5).float()
        referred = torch.zeros(len(scene.objects), dtype=torch.bool)
        referred[list(expression.targets)] = True
        return image_hi, image_lo, tokens, padding, instances, referred

    def _locate(self, index: int) -> Tuple[int, int]:
        starts = self.dataset._starts
        image = int(np.searchsorted(starts, index, side="right")) - 1
        return image, index - int(starts[image])


def collate(examples: List[tuple]) -> Dict[str, object]:
    image_hi, image_lo, tokens, padding, instances, referred = zip(*examples)
    return {
        "image_hi": torch.stack(image_hi),
        "image_lo": torch.stack(image_lo),
        "tokens": torch.stack(tokens),
        "padding": torch.stack(padding),
        "instances": list(instances),
        "referred": list(referred),
    }


def lr_at(step: int, settings: DerisTrainSettings) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_deris(
    config: DerisConfig,
    dataset: RefShapes,
    tokenizer_path: Path,
    out_dir: Path,
    settings: DerisTrainSettings,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    weights: LossWeights = LossWeights(),
) -> DerisModel:
    """Train (or resume) and return the model; writes `<out>/checkpoint.pt` and, at the end, the
    model in our format under `<out>/model/` (model.safetensors + config.json) with the tokenizer."""
    device = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = DerisModel(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n and "table" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n and "table" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    start = 0
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.is_file():
        state = read_torch_file(checkpoint_path, "training checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
        log(f"resuming from step {start}")
    stream = RefShapesStream(dataset, tokenizer_path, config, settings.batch_size, start, settings.seed)
    loader = DataLoader(stream, batch_size=None, collate_fn=collate, num_workers=settings.num_workers,
                        prefetch_factor=4 if settings.num_workers else None)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    log(f"training {config.name} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}, "
        f"steps {start}..{settings.steps}, batch {settings.batch_size}")
    running: Dict[str, float] = {}
    logged = start
    began = time.perf_counter()
    step = start
    for step, batch in zip(range(start, settings.steps), loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        inputs = [batch[k].to(device, non_blocking=True) for k in ("image_hi", "image_lo", "tokens", "padding")]
        instances = [m.to(device) for m in batch["instances"]]
        referred = [r.to(device) for r in batch["referred"]]
        exists = torch.tensor([float(r.any()) for r in batch["referred"]], device=device)
        with autocast:
            outputs = model(*inputs, return_rounds=True, with_mask_logits=False)
            losses = deris_loss(outputs, instances, referred, exists, weights)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        for key, value in losses.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        done = step + 1
        if done % 50 == 0 or done == settings.steps:
            rate = (done - start) / (time.perf_counter() - began)
            averages = ", ".join(f"{k} {v / (done - logged):.4f}" for k, v in running.items())
            log(f"step {done}/{settings.steps} ({rate:.2f} steps/s): {averages}")
            running, logged = {}, done
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": done}
            atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))
    model.eval()
    save_deris(model, out_dir / "model")
    (out_dir / "model" / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return model

