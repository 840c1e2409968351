"""A run's identity: the settings that decide its results, recorded with the outputs and checked on resume.

Batch outputs (`run.json` in the output folder) and feature caches (each shard's provenance)
record the identity of the run that made them: the DeRIS weights' sha256 and config, the
tokenizer's and gate's sha256, the gate's decision rule (tau included), dtype, batch semantics,
query source and the package version. A rerun into the same place compares its own identity
with the recorded one and stops, naming every difference, when they differ, so results made
with different settings are never mixed (`--overwrite` starts afresh instead).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping

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

    return checkpoint_sha256(pipe.deris_path) if pipe.deris_path else state_dict_sha256(pipe.model)


def pipeline_identity(pipe) -> Dict[str, Any]:
    """The identity of results made by `pipe` (a `Pipeline`): a JSON-able dict.

    Keys: package_version, model {name, sha256, config_sha256}, tokenizer_sha256, gate (None or
    {sha256, rule}), dtype, batch_semantics, query_source; and, not compared, paths and device.
    """
    gate = None
    if pipe.gate is not None:
        gate_sha256 = file_sha256(pipe.gate_path) if pipe.gate_path else state_dict_sha256(pipe.gate)
        gate = {"sha256": gate_sha256, "rule": pipe.gate.settings()["rule"]}
    return {
        "package_version": __version__,
        "model": {
            "name": pipe.config.name,
            "sha256": model_sha256(pipe),
            "config_sha256": json_sha256(pipe.config.to_dict()),
        },
        "tokenizer_sha256": pipe.tokenizer.sha256,
        "gate": gate,
        "dtype": str(pipe.autocast_dtype or "float32").replace("torch.", ""),
        "batch_semantics": pipe.batch_semantics,
        "query_source": pipe.query_source,
        "paths": {
            "deris": None if pipe.deris_path is None else str(pipe.deris_path),
            "tokenizer": None if pipe.tokenizer_path is None else str(pipe.tokenizer_path),
            "gate": None if pipe.gate_path is None else str(pipe.gate_path),
        },
        "device": str(pipe.device),
    }


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """Human-readable differences between two identities, ignoring INFO_KEYS.

    Nested keys are joined with dots; long values (hashes) are shortened:
    ["gate.rule.tau 0.7 -> 0.5", "model.sha256 3f2a9c1e... -> 77b0d4aa..."].
    """
    old, new = (_flatten(json.loads(json.dumps(x))) for x in (recorded, current))  # tuples read back as lists
    return [
        f"{key} {_show(old.get(key, '(none)'))} -> {_show(new.get(key, '(none)'))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, "(none)") != new.get(key, "(none)")
    ]


def _flatten(identity: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in identity.items():
        if not prefix and key in INFO_KEYS:
            continue
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text[:8] + "..." if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text
