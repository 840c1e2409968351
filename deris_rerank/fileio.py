"""Reading and writing files safely.

Reading: only `torch.load(..., weights_only=True)`, which rebuilds tensors and plain
containers but never runs code from the file, and safetensors; a file that needs
arbitrary unpickling is refused with a message that says so. Writing: temp file + rename,
so a crash or kill never leaves a half-written file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

import torch
from safetensors.torch import load_file as load_safetensors

from .errors import CheckpointError


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `target`, then rename it over `target`.

    The rename is atomic on one filesystem: readers see the old file or the new one,
    never a mix. On any error the temporary file is removed and the error re-raised.
    The file ends with the mode a plain `open(target, "w")` gives: an existing target's
    mode is kept, a new file gets 0o666 less the process umask (0o644 under umask 022).
    """
    target = Path(target)
    tmp = _create_temp_beside(target)
    try:
        mode = stat.S_IMODE((target if target.exists() else tmp).stat().st_mode)
        write(str(tmp))
        os.chmod(tmp, mode)  # a writer may have made its own file (safetensors creates it 0o600)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _create_temp_beside(target: Path) -> Path:
    """Create an empty, unique temporary file next to `target`, mode 0o666 less the umask
    (like `open`; `tempfile.mkstemp` would make it 0o600, which the rename would keep)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise CheckpointError naming it when it is not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} (check the path)")
    return path


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a `.pt`/`.pth` file with `weights_only=True` onto the CPU.

    Raises CheckpointError when the file is missing, is not a PyTorch file (or is corrupt), or
    holds Python objects that only arbitrary unpickling could rebuild (which could run code).
    """
    path = require_file(path, what)
    if not _looks_like_torch_file(path):
        raise CheckpointError(
            f"cannot read {what} {path}: not a PyTorch file (.pt/.pth), or it is corrupt; "
            f"expected a {what} written by torch.save, or a .safetensors file"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler fails in many ways on damaged bytes
        refused = _GLOBAL_REFUSED.search(str(exc))
        if refused:
            raise CheckpointError(
                f"refusing to load {what} {path}: it holds the Python object {refused.group(1)}, which only "
                f"arbitrary unpickling could rebuild (that could run code); re-save it as a plain state dict "
                f"of tensors or as safetensors"
            ) from None
        raise CheckpointError(
            f"cannot read {what} {path}: not a readable PyTorch file (damaged, truncated, or a pickle of "
            f"other Python objects); expected a {what} written by torch.save, or a .safetensors file"
        ) from None


_GLOBAL_REFUSED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _looks_like_torch_file(path: Path) -> bool:
    """True for torch.save's zip format or its legacy pickle format (starts with a pickle PROTO opcode)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


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


def check_format(sidecar: Dict[str, Any], name: str, version: int, path: str | Path) -> None:
    """Raise CheckpointError unless `sidecar` (a JSON settings file read from `path`) declares the
    format `name` at a `format_version` this code reads (1 .. `version`; a missing version is 1)."""
    if sidecar.get("format") != name:
        raise CheckpointError(f"{path} is not a {name} file (its 'format' field is {sidecar.get('format')!r})")
    found = sidecar.get("format_version", 1)
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise CheckpointError(f"{path}: 'format_version' must be a positive integer, got {found!r}")
    if found > version:
        raise CheckpointError(
            f"{path} was written by a newer deris-rerank ({name} format version {found}; this version reads up to "
            f"{version}): upgrade deris-rerank"
        )


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 12) -> str:
    """One line naming missing, unexpected and wrongly shaped keys (with shapes); "" when they fit."""

    def listing(items: Dict[str, tuple]) -> str:
        shown = [f"{k}{list(v)}" for k, v in sorted(items.items())[:limit]]
        more = len(items) - len(shown)
        return ", ".join(shown) + (f", ... (+{more} more)" if more > 0 else "")

    want = {k: tuple(v.shape) for k, v in expected.items()}
    have = {k: tuple(v.shape) for k, v in given.items()}
    missing = {k: s for k, s in want.items() if k not in have}
    unexpected = {k: s for k, s in have.items() if k not in want}
    wrong = [f"{k}: expected {list(s)}, found {list(have[k])}" for k, s in want.items() if k in have and have[k] != s]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} with another shape: " + ", ".join(wrong[:limit]))
    return "; ".join(parts)
