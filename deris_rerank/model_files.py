"""Where model files are found: an explicit path first, then the folder named by
`$DERIS_RERANK_WEIGHTS`, then the checkout's `weights/`, then `weights/` in the current folder;
a DeRIS preset name maps to its file names (ours, and upstream's next to the preset); the
tokenizer and gate are also looked for beside the DeRIS weights; the embedded default ships
inside the package.

An explicit path may also name a file or folder of a Hugging Face Hub model repository,
`hf://OWNER/REPO/PATH` or `hf://OWNER/REPO@REVISION/PATH`, fetched as `hub` says.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .errors import CheckpointError
from .hub import gate_pair, hub_local_path, is_hub_path, local_path

PathLike = Union[str, os.PathLike]

REPO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # in a checkout: the repository's weights/
# The embedded default, installed with the package: DeRIS-tiny + its gate, trained on RefShapes.
DEFAULT_MODEL = Path(__file__).resolve().parent / "embedded" / "deris-tiny"
TOKENIZER_NAMES = ("beit3.spm", "tokenizer.model")
GATE_NAMES = ("venice_h1.safetensors", "venice_h1.pt", "venice_h1.pth")
GATE_BESIDE_MODEL = "gate.safetensors"  # a gate stored in a DeRIS folder belongs to that model
DERIS_SIDECAR = "config.json"  # beside our model.safetensors (see checkpoints.DERIS_CONFIG_FILE)
# What a DeRIS file named by hf:// brings from its folder in the repository when the folder has
# it, so that the tokenizer and re-ranker beside the weights are found as for a local file.
DERIS_BESIDE = (*TOKENIZER_NAMES, GATE_BESIDE_MODEL, "gate.json")


def weight_folders() -> List[Path]:
    """Where model files are looked up after explicit paths: $DERIS_RERANK_WEIGHTS, then the
    repository's weights/ (when running from a checkout), then weights/ in the current folder."""
    env = os.environ.get("DERIS_RERANK_WEIGHTS")
    folders = ([Path(env).expanduser()] if env else []) + [REPO_WEIGHTS, Path.cwd() / "weights"]
    unique: List[Path] = []
    for folder in folders:
        if folder.is_dir() and all(folder.resolve() != other.resolve() for other in unique):
            unique.append(folder)
    return unique


def weight_folders_text() -> str:
    """The weight folders for a message."""
    folders = weight_folders()
    return ", ".join(map(str, folders)) if folders else "any weights folder ($DERIS_RERANK_WEIGHTS is not set, no weights/ here)"


def find_in_weights(names: Sequence[str]) -> Optional[Path]:
    """The first of `names` found in the weight folders (folder order first), or None."""
    for folder in weight_folders():
        for name in names:
            if (folder / name).exists():
                return folder / name
    return None


def default_model() -> Path:
    """The embedded default's folder; CheckpointError when the installation lacks it."""
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        raise CheckpointError(
            f"the embedded default model is missing ({DEFAULT_MODEL}): pass deris=PATH (an official DeRIS "
            ".pth or a folder from `deris-rerank convert`), tokenizer=PATH (beit3.spm) and gate=PATH"
        )
    return DEFAULT_MODEL


def resolve_deris(deris: PathLike) -> Path:
    """A path as given, an hf:// path fetched into the Hugging Face cache (a file brings what
    belongs beside it: the config.json of a .safetensors, and a tokenizer and gate.safetensors +
    .json when its folder in the repository has them), or a preset name looked up as
    weights/<name>/ or upstream's file name."""
    from .deris.config import PRESETS, UPSTREAM_CHECKPOINT_NAMES

    if is_hub_path(deris):
        sidecar = (DERIS_SIDECAR,) if str(deris).endswith(".safetensors") else ()
        return hub_local_path(str(deris), required_beside=sidecar, optional_beside=DERIS_BESIDE)
    path = Path(deris).expanduser()
    if path.exists():
        return path
    name = str(deris).lower()
    if name in PRESETS:
        upstream = UPSTREAM_CHECKPOINT_NAMES.get(name, f"{name}.pth")
        found = find_in_weights([name, upstream, f"{name}.pth"])
        if found is not None:
            return found
        raise CheckpointError(
            f"no weights for preset {name} in {weight_folders_text()}: put the official {upstream} there "
            f"(or convert it with `deris-rerank convert`), or pass its path"
        )
    raise CheckpointError(f"DeRIS checkpoint not found: {path} (pass a .pth, a converted folder or a preset name)")


def model_folder(deris_path: Path) -> Path:
    """The folder holding a DeRIS checkpoint (the checkpoint itself when it is a folder)."""
    return deris_path if deris_path.is_dir() else deris_path.parent


def resolve_tokenizer(tokenizer: Optional[PathLike], deris_path: Optional[Path]) -> Path:
    """The tokenizer: as given (a path or an `hf://` path), else beside the DeRIS weights, else in
    the weight folders."""
    if tokenizer is not None:
        return local_path(tokenizer)
    if deris_path is not None:
        for name in TOKENIZER_NAMES:
            if (model_folder(deris_path) / name).is_file():
                return model_folder(deris_path) / name
    found = find_in_weights(TOKENIZER_NAMES)
    if found is None:
        where = f"next to {deris_path} and in the weights folders" if deris_path else "in the weights folders"
        raise CheckpointError(f"no tokenizer found: pass tokenizer=PATH to beit3.spm (looked {where})")
    return found


def resolve_gate(gate: Union[None, bool, PathLike], deris_path: Optional[Path]) -> Optional[Path]:
    """The gate file: as given (an `hf://` path also fetches the `.json` / `.safetensors` that pairs
    with it); None or True: `gate.safetensors` beside the DeRIS weights, then `venice_h1.*` in the
    weight folders; False: none. With None and nothing found, warns and returns None (DeRIS's own
    choice); with True and nothing found, raises CheckpointError."""
    if gate is False:
        return None
    if gate not in (None, True):
        if is_hub_path(gate):
            return hub_local_path(str(gate), required_beside=gate_pair(str(gate)))
        return Path(gate).expanduser()
    beside = model_folder(deris_path) / GATE_BESIDE_MODEL if deris_path is not None else None
    path = beside if beside is not None and beside.is_file() else find_in_weights(GATE_NAMES)
    if path is None:
        if gate is True:
            raise CheckpointError(f"no Venice-H1 gate found in {weight_folders_text()}: pass gate=PATH")
        warnings.warn("no Venice-H1 gate found: results are DeRIS's own first choice (pass gate=PATH)", stacklevel=4)
    return path
