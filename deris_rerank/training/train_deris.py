"""`deris-rerank train-deris`: train a DeRIS preset on RefShapes (or any data giving instance masks).

The recipe follows the paper as far as it applies to training from scratch on synthetic data:
Hungarian matching of the query slots to all instances, BCE + Dice mask losses, referring
cross-entropy, existence BCE, the same losses on every loopback round (auxiliary weight 0.5),
AdamW with warm-up and cosine decay, gradient clipping. One addition stands in for the
pre-trained perception branch upstream starts from: training-only heads that predict every
instance's attributes from the pixel-decoder maps and the matched queries, and the referent's
from the text features (`attributes.py`). Runs on CPU or CUDA (bfloat16
autocast there), shows progress, checkpoints every `checkpoint_every` steps to
`<out>/checkpoint.pt` (plain tensors: read back with weights_only=True) and resumes from it;
seeded: the data of step s is a pure function of (seed, s).

GRES data (RefShapes in "gres" mode: expressions with several referents or none) is trained
the same way: every referred instance is matched and labelled referred, a no-target pair has no
referred slot, and the existence head learns whether any referent exists. On top of the
grammar's own no-target expressions, DeRIS's non-referent sample conversion ("turn hard
negative" in its code, rate 0.15 in its gRefCOCO configs) replaces a fraction of the
expressions that have referents by an expression of another image; unlike upstream, which
assumes the borrowed expression refers to nothing, the RefShapes semantics check it
(`non_referent_expression`), so a converted pair is a true no-target pair.

A second, harder conversion of our own (`turn_around_rate`): an expression with a direction
("the circle left of the star", "the second square from the top", "the biggest heart") is
joined in its image by its turned-around version, whose referents the semantics find again
(`turned_around_expression`): often none, so the image holds a pair with referents and its
near-miss without, under the same perception, which is where absence was missed most (held-out
N-acc 17% on relations turned around against 95-100% on colour and style near misses).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from ..checkpoints import save_deris
from ..data.refshapes import Expression, RefShapes, Scene, referents, render_text, turned_around
from ..deris.config import DerisConfig
from ..deris.model import DerisModel
from ..errors import CheckpointError
from ..fileio import atomic_write, read_safetensors, read_torch_file
from ..settings import DerisTrainSettings
from ..tokenizer import Beit3Tokenizer
from ..transforms import prepare_images
from .attributes import AttributeHeads, attribute_labels, pooled_attribute_loss
from .losses import LossWeights, PairTargets, deris_loss

CHECKPOINT = "checkpoint.pt"




class RefShapesStream(IterableDataset):
    """Training batches from RefShapes. Step s draws images with a generator seeded by (seed, s)
    and takes all of each image's expressions (2-4) until the batch holds `batch_size` pairs (the
    last image may give fewer): an image is encoded once for all its texts, and its referents
    contrast under the same perception.

    Each item is one image: (image_hi [3,S,S], image_lo [3,s,s], instances float [K, S/4, S/4]
    (every object's visible mask), attributes int64 [K, 4] (shape, colour, size, style indices of
    ATTRIBUTE_VOCABULARIES), texts: a list of (tokens [T], padding [T], referred bool [K])).
    non_referent_rate / turn_around_rate: the two conversions of the module docstring, gres data
    only (ris data has no no-target pairs to learn from).
    """

    def __init__(self, dataset: RefShapes, tokenizer_path: Path, config: DerisConfig, batch_size: int, start_step: int, seed: int,
                 non_referent_rate: float = 0.0, turn_around_rate: float = 0.0):
        self.dataset, self.tokenizer_path, self.config = dataset, tokenizer_path, config
        self.batch_size, self.start_step, self.seed = batch_size, start_step, seed
        gres = dataset.mode == "gres"
        self.non_referent_rate = non_referent_rate if gres else 0.0
        self.turn_around_rate = turn_around_rate if gres else 0.0

    def __iter__(self) -> Iterator[List[tuple]]:
        tokenizer = Beit3Tokenizer(self.tokenizer_path)
        step = self.start_step
        while True:
            rng = np.random.default_rng([self.seed, step])
            images: List[tuple] = []
            pairs = 0
            while pairs < self.batch_size:
                images.append(self._image(int(rng.integers(0, self.dataset.num_images)), tokenizer, self.batch_size - pairs, rng))
                pairs += len(images[-1][-1])
            yield images
            step += 1

    def _image(self, index: int, tokenizer: Beit3Tokenizer, max_texts: int, rng: np.random.Generator) -> tuple:
        scene = self.dataset.scene(index)
        image_hi, image_lo = prepare_images(scene.image, self.config.image_size, self.config.image_size_lo)
        size = self.config.image_size // 4
        masks = torch.from_numpy(np.array(scene.masks, dtype=np.float32))[:, None]
        instances = (F.interpolate(masks, size=(size, size), mode="area")[:, 0] >= 0.5).float()
        attributes = attribute_labels(scene.objects)
        expressions = list(scene.expressions[:max_texts])
        for k, expression in enumerate(expressions):
            if expression.targets and self.non_referent_rate > 0 and rng.random() < self.non_referent_rate:
                expressions[k] = non_referent_expression(self.dataset, index, rng) or expression
        if self.turn_around_rate > 0:
            texts = {e.text for e in scene.expressions}
            for expression in list(expressions):
                if len(expressions) < max_texts and expression.targets and rng.random() < self.turn_around_rate:
                    turned = turned_around_expression(expression, scene, self.dataset.image_size, rng)
                    if turned is not None and turned.text not in texts:
                        expressions.append(turned)
                        texts.add(turned.text)
        tokens, padding = tokenizer.encode_batch([e.text for e in expressions], self.config.max_tokens)
        texts = []
        for k, expression in enumerate(expressions):
            referred = torch.zeros(len(scene.objects), dtype=torch.bool)
            referred[list(expression.targets)] = True
            texts.append((tokens[k], padding[k], referred))
        return image_hi, image_lo, instances, attributes, texts


def non_referent_expression(dataset: RefShapes, image: int, rng: np.random.Generator, attempts: int = 20) -> Optional[Expression]:
    """An expression of another image of `dataset` that refers to nothing in image `image`
    (checked with the grammar's semantics; ill-posed ones are skipped), with no targets; None if
    `attempts` draws find none. DeRIS's non-referent sample conversion, verified."""
    scene = dataset.scene(image)
    for _ in range(attempts):
        other = int(rng.integers(0, dataset.num_images - 1))
        other += other >= image  # any image but this one
        borrowed = dataset.scene(other).expressions
        expression = borrowed[int(rng.integers(0, len(borrowed)))]
        if referents(expression.query, scene.objects, dataset.image_size) == frozenset():
            return Expression(expression.text, expression.query, ())
    return None


def turned_around_expression(expression: Expression, scene: Scene, image_size, rng: np.random.Generator) -> Optional[Expression]:
    """`expression` with its direction reversed (`turned_around`), worded anew from `rng`, with the
    referents the semantics find for it in `scene`; None if it has no direction, is ill-posed there,
    or its referents do not fit its number (a singular expression needs at most one, a plural one
    none or several)."""
    query = turned_around(expression.query)
    if query is None:
        return None
    found = referents(query, scene.objects, image_size)
    if found is None or (len(found) == 1 if query.plural else len(found) > 1):
        return None
    return Expression(render_text(query, rng), query, tuple(sorted(found)))


def collate(images: List[tuple]) -> Dict[str, object]:
    """Items of `RefShapesStream` -> a batch of P pairs over I images: `image_index` int64 [P]
    maps pairs to images; per-image lists `instances`, `attributes`; per-pair `referred`."""
    image_hi, image_lo, instances, attributes, texts = zip(*images)
    image_index = [i for i, image_texts in enumerate(texts) for _ in image_texts]
    tokens, padding, referred = zip(*(text for image_texts in texts for text in image_texts))
    return {
        "image_hi": torch.stack(image_hi),
        "image_lo": torch.stack(image_lo),
        "image_index": torch.tensor(image_index, dtype=torch.long),
        "tokens": torch.stack(tokens),
        "padding": torch.stack(padding),
        "instances": list(instances),
        "attributes": list(attributes),
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
    init_perception: Optional[Path] = None,
    init_model: Optional[Path] = None,
) -> DerisModel:
    """Train (or resume) and return the model; writes `<out>/checkpoint.pt` and, at the end, the
    model in our format under `<out>/model/` (model.safetensors + config.json) with the tokenizer.
    init_perception: Swin weights from `pretrain_perception`, loaded before step 0; init_model: a
    whole DeRIS of this preset in our format (a folder or model.safetensors, e.g. the embedded
    default) to fine-tune from, loaded before step 0 (the optimiser starts afresh)."""
    device = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = DerisModel(config).to(device)
    head = AttributeHeads(config.hidden_dim, num_maps=config.num_feature_levels + 1).to(device)
    named = list(model.named_parameters()) + [("attribute_head." + n, p) for n, p in head.named_parameters()]
    decay = [p for n, p in named if p.ndim > 1 and "embed" not in n and "table" not in n]
    no_decay = [p for n, p in named if not (p.ndim > 1 and "embed" not in n and "table" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    start = 0
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.is_file():
        state = read_torch_file(checkpoint_path, "training checkpoint")
        model.load_state_dict(state["model"])
        head.load_state_dict(state["attribute_head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
        log(f"resuming from step {start}")
    elif init_model is not None:
        model.load_state_dict(_init_weights(init_model, config))
        log(f"initialised from {init_model}")
    elif init_perception is not None:
        try:
            model.swin.load_state_dict(read_safetensors(init_perception, "perception pre-training"))
        except RuntimeError as exc:
            raise CheckpointError(f"{init_perception} is not a Swin of the {config.name} preset: {str(exc).splitlines()[0]}") from None
        log(f"Swin initialised from {init_perception}")
    stream = RefShapesStream(dataset, tokenizer_path, config, settings.batch_size, start, settings.seed,
                             settings.non_referent_rate, settings.turn_around_rate)
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
        image_index = batch["image_index"].to(device)
        image_hi, image_lo = batch["image_hi"].to(device, non_blocking=True), batch["image_lo"].to(device, non_blocking=True)
        tokens, padding = batch["tokens"].to(device), batch["padding"].to(device)
        instances, attributes = ([t.to(device) for t in batch[key]] for key in ("instances", "attributes"))
        pair_images = batch["image_index"].tolist()
        targets = PairTargets([instances[i] for i in pair_images], [r.to(device) for r in batch["referred"]],
                              [attributes[i] for i in pair_images])
        exists = torch.tensor([float(r.any()) for r in batch["referred"]], device=device)
        with autocast:
            features = model.encode_image(image_hi)
            outputs = model(None, image_lo[image_index], tokens, padding, image_features=features.select(image_index),
                            return_rounds=True, with_mask_logits=False)
            losses = deris_loss(outputs, targets, exists, weights, head, padding)
            if weights.attributes > 0:
                maps = [*features.multi_scale, features.mask_features]
                losses["pixel_attributes"] = pooled_attribute_loss(maps, instances, attributes, head.maps)
                losses["total"] = losses["total"] + weights.attributes * losses["pixel_attributes"]
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], settings.grad_clip)
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
            state = {"model": model.state_dict(), "attribute_head": head.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": done}
            atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))
    model.eval()
    save_deris(model, out_dir / "model")
    (out_dir / "model" / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return model



def _init_weights(path: Path, config: DerisConfig) -> Dict[str, torch.Tensor]:
    """The state dict of the DeRIS model at `path` (our format), checked to be of `config`'s preset."""
    from ..checkpoints import load_deris

    model = load_deris(path)
    if dataclasses.replace(model.config, task=config.task) != config:
        raise CheckpointError(f"{path} is a {model.config.name} model with other settings than the {config.name} preset being "
                              "trained; fine-tune a model of the same preset (--preset)")
    return model.state_dict()
