"""Reading and writing files safely.

Reading: only `torch.load(..., weights_only=True)`, which rebuilds tensors and plain
containers but never runs code from the file, and safetensors; a file that needs
arbitrary unpickling is refused with a message that says so. Writing: temp file + rename,
so a crash or kill never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from safetensors.torch import load_file as load_safetensors

from .errors import CheckpointError


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `target`, then rename it over `target`.

    The rename is atomic on one filesystem: readers see the old file or the new one,
    never a mix. On any error the temporary file is removed and the error re-raised.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise CheckpointError naming it when it is not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} (check the path)")
    return path


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a `.pt`/`.pth` file with `weights_only=True` onto the CPU.

    Raises CheckpointError when the file is missing, is not a torch file, or holds
    objects that only arbitrary unpickling could rebuild (which could run code).
    """
    path = require_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {what} {path}: it needs arbitrary unpickling, which could run code "
            f"({reason}); re-save it as a plain state dict or as safetensors"
        ) from None
    except Exception as exc:  # the restricted unpickler fails in many ways on non-torch bytes
        raise CheckpointError(f"cannot read {what} {path}: not a readable torch file ({exc})") from None


def read_safetensors(path: str | Path, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU, with errors that name the file."""
    path = require_file(path, what)
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {what} {path}: not a valid safetensors file ({exc})") from None


def read_json(path: str | Path, what: str) -> Dict[str, Any]:
    """Load a JSON object, with errors that name the file."""
    path = require_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot read {what} {path}: expected a JSON object")
    return data
