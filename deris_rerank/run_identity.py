"""A run's identity: the settings that decide its results, recorded with the outputs and checked on resume.

Batch outputs (`run.json` in the output folder) and feature caches (each shard's provenance)
record the identity of the run that made them: the DeRIS weights' sha256 and config, the
tokenizer's and gate's sha256, the gate's decision rule (tau included), dtype, batch semantics,
query source and the package version, and the engine's settings that change float32 sums' last
bits (`engine_identity`: pairs per model run and torch's CPU thread count). A rerun into the same
place compares its own identity
with the recorded one and stops, naming every difference, when they differ, so results made
with different settings are never mixed (`--overwrite` starts afresh instead).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional

import torch

from .fileio import file_sha256
from .version import __version__

# Recorded for people, never compared: where the files were, which device ran them.
INFO_KEYS = ("paths", "device", "checkpoint")


def json_sha256(value: Any) -> str:
    """Hex sha256 of a JSON-able value in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def state_dict_sha256(module) -> str:
    """Hex sha256 of a module's weights (names, dtypes, shapes and bytes), for models built in
    memory (files are identified by their own sha256)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_sha256(pipe) -> str:
    """sha256 of a pipeline's DeRIS weights: its checkpoint's, or its in-memory weights'."""
    from .checkpoints import checkpoint_sha256

    if pipe.runtime == "onnxruntime":
        return hashlib.sha256(pipe.model.sha256.encode()).hexdigest()  # of the two graphs' recorded sha256s
    return checkpoint_sha256(pipe.deris_path) if pipe.deris_path else state_dict_sha256(pipe.model)


def pipeline_identity(pipe) -> Dict[str, Any]:
    """The identity of results made by `pipe` (a `Pipeline`): a JSON-able dict.

    Keys: package_version, model {name, sha256, config_sha256}, tokenizer_sha256, gate (None or
    {sha256, rule, and a set re-ranker's set_rule}), answer ("single" or "set"), dtype (the
    precision mode), runtime (only when not torch), batch_semantics, query_source; and, not
    compared, paths and device.
    """
    gate = None
    if pipe.gate is not None:
        gate_sha256 = file_sha256(pipe.gate_path) if pipe.gate_path else state_dict_sha256(pipe.gate)
        settings = pipe.gate.settings()
        gate = {"sha256": gate_sha256, "rule": settings["rule"], **({"set_rule": settings["set_rule"]} if "set_rule" in settings else {})}
    return {
        "package_version": __version__,
        "model": {
            "name": pipe.config.name,
            "sha256": model_sha256(pipe),
            "config_sha256": json_sha256(pipe.config.to_dict()),
        },
        "tokenizer_sha256": pipe.tokenizer.sha256,
        "gate": gate,
        "answer": pipe.answer,
        "dtype": pipe.precision,
        **({"runtime": pipe.runtime} if pipe.runtime != "torch" else {}),  # torch: as identities made before runtimes
        "batch_semantics": pipe.batch_semantics,
        "query_source": pipe.query_source,
        "paths": {
            "deris": None if pipe.deris_path is None else str(pipe.deris_path),
            "tokenizer": None if pipe.tokenizer_path is None else str(pipe.tokenizer_path),
            "gate": None if pipe.gate_path is None else str(pipe.gate_path),
        },
        "device": str(pipe.device),
    }


def engine_identity(batch_size: int, threads: Optional[int] = None) -> Dict[str, int]:
    """The engine settings a run's results depend on to the last bit, beside `pipeline_identity`.

    batch_size: pairs per model run (float32 sums depend on a batch's composition); threads:
    torch's CPU threads (a sum split over more threads is added in another order); None: this
    process's `torch.get_num_threads()`. Recorded and compared on every device.
    """
    return {"batch_size": int(batch_size), "threads": torch.get_num_threads() if threads is None else int(threads)}


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """Human-readable differences between two identities, ignoring INFO_KEYS.

    Nested keys are joined with dots; long values (hashes) are shortened; a part present on one
    side only (a gate added or removed) is one line, shown by its sha256 when it has one:
    ["gate.rule.tau 0.7 -> 0.5", "model.sha256 3f2a9c1e... -> 77b0d4aa...", "gate 9c0e41b7... -> none"].
    """
    old, new = (json.loads(json.dumps(x)) for x in (recorded, current))  # tuples read back as lists
    return _differences(old, new, "")


_MISSING = object()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> List[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in INFO_KEYS:
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key} {_show(a)} -> {_show(b)}")
    return lines


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(none)"
    if isinstance(value, Mapping):
        return _show(value["sha256"]) if "sha256" in value else json.dumps(value, sort_keys=True)[:60]
    text = "none" if value is None else str(value)
    return text[:8] + "..." if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text
