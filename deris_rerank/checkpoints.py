"""Reading checkpoints safely.

Only two readers are used: `torch.load(..., weights_only=True)`, which rebuilds
tensors and plain containers but never runs code from the file, and safetensors.
A file that needs arbitrary unpickling is refused with a message that says so.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file as load_safetensors

from .errors import CheckpointError


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


def describe_key_mismatch(missing: Dict[str, tuple], unexpected: Dict[str, tuple], limit: int = 12) -> str:
    """One-line summary of missing/unexpected state-dict keys with their shapes."""
    def fmt(items: Dict[str, tuple]) -> str:
        shown = [f"{k}{list(v)}" for k, v in sorted(items.items())[:limit]]
        more = len(items) - len(shown)
        return ", ".join(shown) + (f", ... (+{more} more)" if more > 0 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {fmt(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {fmt(unexpected)}")
    return "; ".join(parts)
