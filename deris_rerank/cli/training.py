"""DeRIS training: `deris-rerank train-deris` and `deris-rerank pretrain-perception`."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..settings import DerisTrainSettings, PerceptionPretrainSettings
from .options import add_refshapes_flags, add_settings_flags, add_training_run_flags, settings_from_args, training_log

def cmd_train_deris(args: argparse.Namespace) -> int:
    """Train a DeRIS preset on RefShapes; writes OUT/model (+ tokenizer) and OUT/checkpoint.pt."""
    from ..data.refshapes import RefShapes, corpus
    from ..devices import resolve_device
    from ..deris.config import DerisConfig
    from ..errors import InputError
    from ..hub import local_path
    from ..training.tokenizer import train_word_tokenizer
    from ..training.train_deris import train_deris

    out = Path(args.out)
    config = DerisConfig.preset(args.preset)
    if args.refshapes_mode == "gres":  # trained for expressions with no referent or several: it says so in its config
        config = dataclasses.replace(config, task="gres")
    size = (config.image_size, config.image_size)
    dataset = RefShapes("train", num_images=args.train_images, seed=args.seed, image_size=size, mode=args.refshapes_mode)
    tokenizer = local_path(args.tokenizer) if args.tokenizer else out / "tokenizer.model"
    if not tokenizer.is_file():
        train_word_tokenizer(corpus(20_000, seed=args.seed), tokenizer, max_pieces=config.beit3.vocab_size - 2)
    settings = settings_from_args(args, DerisTrainSettings)
    for flag, rate in (("--non-referent-rate", settings.non_referent_rate), ("--turn-around-rate", settings.turn_around_rate)):
        if not 0.0 <= rate <= 1.0:
            raise InputError(f"{flag}: a chance between 0 and 1 is needed, got {rate}")
    device = resolve_device(args.device)
    if args.init and args.init_perception:
        raise InputError("give --init (a whole model to fine-tune) or --init-perception (Swin weights), not both")
    init = local_path(args.init_perception) if args.init_perception else None
    train_deris(config, dataset, tokenizer, out, settings, device=device, log=training_log(args),
                init_perception=init, init_model=local_path(args.init) if args.init else None)
    print(json.dumps({"model": str(out / "model"), "tokenizer": str(out / "model" / "tokenizer.model")}))
    return 0


def cmd_pretrain_perception(args: argparse.Namespace) -> int:
    """Pre-train a preset's Swin on RefShapes object crops; writes OUT (safetensors)."""
    from ..data.refshapes import RefShapes
    from ..deris.config import DerisConfig
    from ..devices import resolve_device
    from ..training.pretrain_perception import pretrain_perception

    config = DerisConfig.preset(args.preset)
    dataset = RefShapes("train", num_images=args.train_images, seed=args.seed, image_size=(config.image_size, config.image_size))
    settings = settings_from_args(args, PerceptionPretrainSettings)
    pretrain_perception(config, dataset, Path(args.out), settings, device=resolve_device(args.device), log=training_log(args))
    print(json.dumps({"perception": args.out}))
    return 0


def add_commands(commands) -> None:
    """Add `train_deris`, `pretrain` to the `deris-rerank` subcommands."""
    train_deris = commands.add_parser(
        "train-deris",
        help="train a DeRIS preset on RefShapes (checkpoints and resumes)",
        description="Trains a DeRIS preset from scratch on generated RefShapes pairs: Hungarian matching to all "
        "instances, BCE + Dice masks, referring and existence losses on every loopback round. Writes OUT/model "
        "(model.safetensors + config.json + tokenizer.model) and resumes from OUT/checkpoint.pt.",
    )
    add_refshapes_flags(train_deris, preset=True)
    train_deris.add_argument("--out", required=True, help="run folder")
    train_deris.add_argument("--train-images", type=int, default=200_000, help="RefShapes images to draw pairs from")
    train_deris.add_argument("--tokenizer", help="sentencepiece model (default: train one on the RefShapes grammar)")
    add_settings_flags(train_deris, DerisTrainSettings)
    train_deris.add_argument("--init-perception", help="Swin weights from `deris-rerank pretrain-perception`")
    train_deris.add_argument("--init", help="a whole DeRIS model of this preset to fine-tune from (our format: a folder "
                             "such as deris_rerank/embedded/deris-tiny, or hf://...); pass its --tokenizer too")
    add_training_run_flags(train_deris)
    train_deris.set_defaults(run=cmd_train_deris)

    pretrain = commands.add_parser(
        "pretrain-perception",
        help="pre-train a preset's Swin on RefShapes object crops (for train-deris --init-perception)",
        description="Trains the preset's Swin to tell each RefShapes object's shape, colour, size and style from a "
        "crop centred on it; writes the Swin's weights (safetensors) to OUT.",
    )
    add_refshapes_flags(pretrain, preset=True, mode=False)
    pretrain.add_argument("--out", required=True, help="output file, e.g. runs/perception.safetensors")
    pretrain.add_argument("--train-images", type=int, default=200_000, help="RefShapes images to draw scenes from")
    add_settings_flags(pretrain, PerceptionPretrainSettings)
    add_training_run_flags(pretrain)
    pretrain.set_defaults(run=cmd_pretrain_perception)
