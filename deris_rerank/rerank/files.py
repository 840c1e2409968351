"""Re-ranker files: reading and writing Venice-H1 gates and calibrated re-rankers.

`load_gate` reads
- a Venice-H1 `.pt`/`.pth` checkpoint (released or packaged layout, `weights_only=True`);
- our `.safetensors` + `.json` pair of a Venice-H1 gate (format `deris-rerank-gate`, `save_gate`);
- our `.safetensors` + `.json` pair of a calibrated re-ranker (format `deris-rerank-calibrated`,
  `save_calibrated`), with its retrieval memory when the JSON has a `retrieval` entry (buffers
  `memory.keys` / `memory.values`; files without the entry have no memory and load as before).
Pairs are written atomically (temporary name, then rename), so an existing pair is never left
half-written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, InputError, OutputError
from ..fileio import atomic_write, check_format, read_json, read_safetensors, read_torch_file, state_dict_mismatch
from ..hub import is_hub_path
from ..model_files import resolve_gate
from .calibrated import CalibratedConfig, CalibratedReranker
from .decision import DecisionRule, SetRule, check_tau, named_rule
from .retrieval import RetrievalConfig, RetrievalMemory, storage_state
from .venice import GATE_CLASSES, N_MASK_STATS, PACKAGED, RELEASED, GateConfig, VeniceGate
from .signatures import GRID_SIGNATURE_DIM, GRID_SIZES

FORMAT_NAME = "deris-rerank-gate"
CALIBRATED_FORMAT_NAME = "deris-rerank-calibrated"
FORMAT_VERSION = 1
CALIBRATED_FORMAT_VERSION = 1

_FLAVOUR_MARKERS = {RELEASED: "failure_head.weight", PACKAGED: "failure_gate.net.0.weight"}
_FIRST_LAYER = {RELEASED: "query_encoder.0.weight", PACKAGED: "query_encoder.net.0.weight"}
_GATE_INPUT = {RELEASED: "failure_encoder.0.weight", PACKAGED: "failure_gate.net.0.weight"}
_SETTING_ALIASES = {
    "tau": ("tau",),
    "temp": ("temp", "gate_temperature", "temperature"),
    "margin_pred": ("margin_pred",),
    "margin_gap": ("margin_gap",),
    "n_heads": ("n_heads",),
    "query_dim": ("query_dim", "query_feat_dim"),
    "use_grid": ("use_grid",),
    "dropout": ("dropout",),
    "grid_scales": ("grid_scales",),
}


def _find_settings(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """Settings from the top level, `config` or `config.model` (later levels win)."""
    levels = [checkpoint]
    config = checkpoint.get("config")
    if isinstance(config, Mapping):
        levels.append(config)
        if isinstance(config.get("model"), Mapping):
            levels.append(config["model"])
    found = {}
    for level in levels:
        for name, aliases in _SETTING_ALIASES.items():
            for alias in aliases:
                value = level.get(alias)
                if isinstance(value, (int, float, bool, list, tuple)) or (torch.is_tensor(value) and value.numel() == 1):
                    found[name] = value.item() if torch.is_tensor(value) else value
    return found


def _state_dict_of(checkpoint: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                return dict(checkpoint[key])
        if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            return dict(checkpoint)
    raise CheckpointError(f"{path} holds no gate state dict (looked for 'model', 'state_dict' or a bare state dict)")


def _config_from_state_dict(state: Mapping[str, torch.Tensor], settings: Mapping[str, Any], path: Path) -> GateConfig:
    flavours = [f for f, marker in _FLAVOUR_MARKERS.items() if marker in state]
    if len(flavours) != 1:
        raise CheckpointError(
            f"{path} is not a Venice-H1 gate: expected key 'failure_head.weight' (released) or "
            f"'failure_gate.net.0.weight' (packaged); found keys like {sorted(state)[:4]}"
        )
    flavour = flavours[0]
    hidden_dim, feature_dim = state[_FIRST_LAYER[flavour]].shape
    n_queries = (state[_GATE_INPUT[flavour]].shape[1] - 3 * hidden_dim) // 2
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})
    use_grid = bool(settings.get("use_grid", feature_dim > N_MASK_STATS + 1 + GRID_SIGNATURE_DIM))
    query_dim = feature_dim - N_MASK_STATS - 1 - (GRID_SIGNATURE_DIM if use_grid else 0)
    if "query_dim" in settings and int(settings["query_dim"]) != query_dim:
        raise CheckpointError(
            f"{path}: first layer takes {feature_dim} features, which does not fit query dim "
            f"{settings['query_dim']} stated in the file (expected {int(settings['query_dim']) + feature_dim - query_dim})"
        )
    return GateConfig(
        flavour=flavour,
        query_dim=int(query_dim),
        hidden_dim=int(hidden_dim),
        n_layers=n_layers,
        n_heads=int(settings.get("n_heads", 8)),
        n_queries=int(n_queries),
        use_grid=use_grid,
        dropout=float(settings.get("dropout", 0.1)),
        grid_scales=tuple(int(g) for g in settings.get("grid_scales", GRID_SIZES)),
    )


def _rule_from_settings(flavour: str, settings: Mapping[str, Any], overrides: Mapping[str, Any], path: Path) -> DecisionRule:
    defaults = {"temp": 1.0, "margin_pred": 0.02 if flavour == RELEASED else None, "margin_gap": 0.0}
    merged = {**defaults, **{k: settings[k] for k in ("tau", "temp", "margin_pred", "margin_gap") if k in settings}}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    check_tau(overrides.get("tau"))
    if overrides.get("temp") is not None and not float(overrides["temp"]) > 0.0:
        raise InputError(f"temp must be a positive number (it divides the failure logit), got {overrides['temp']}")
    if "tau" not in merged:
        raise CheckpointError(f"{path} stores no decision threshold tau; pass tau=... (e.g. --tau 0.5)")
    return DecisionRule(
        tau=float(merged["tau"]),
        temp=float(merged["temp"]),
        margin_pred=None if merged["margin_pred"] is None else float(merged["margin_pred"]),
        margin_gap=float(merged["margin_gap"]),
    )


def _build(config: GateConfig, rule: DecisionRule, state: Mapping[str, torch.Tensor], path: Path) -> VeniceGate:
    gate = GATE_CLASSES[config.flavour](config, rule)
    mismatch = state_dict_mismatch(gate.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path} does not fit a {config.flavour} Venice-H1 gate: {mismatch}")
    gate.load_state_dict(state, strict=True)
    return gate.eval()


def load_gate(
    path: str | os.PathLike,
    device: Optional[torch.device | str] = None,
    *,
    tau: Optional[float] = None,
    temp: Optional[float] = None,
    margin_pred: Optional[float] = None,
    margin_gap: Optional[float] = None,
    query_dim: Optional[int] = None,
    operating_point: Optional[str] = None,
) -> VeniceGate:
    """Load a Venice-H1 gate checkpoint, in eval mode, with weights in the file's dtype.

    A `.safetensors` + `.json` pair whose format is `deris-rerank-calibrated` gives a
    `rerank.calibrated.CalibratedReranker` instead (same `decide`, plus the expression's
    `TextContext`); `operating_point` picks one of its stored operating points (e.g. "conservative").

    `path`: a Venice-H1 `.pt`/`.pth` file (released: `{model, config}` or `{model, tau, ...}`;
    packaged: `{model, config: {model: ...}}`), read with `weights_only=True`; or our own
    `.safetensors` file with its `.json` sidecar (see `save_gate`); or either as an
    `hf://OWNER/REPO[@REVISION]/PATH` of the Hugging Face Hub (see `model_files`; our pair is
    fetched together).
    `tau`, `temp`, `margin_pred`, `margin_gap` override the file's decision settings.
    `query_dim`, when given, is the embedding size the caller's DeRIS produces; a gate
    trained for another size is refused.
    """
    path = resolve_gate(path, None) if is_hub_path(path) else Path(path).expanduser()
    overrides = {"tau": tau, "temp": temp, "margin_pred": margin_pred, "margin_gap": margin_gap}
    if path.suffix in (".safetensors", ".json"):
        weights_path, sidecar_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
        state = read_safetensors(weights_path, "gate weights")
        sidecar = read_json(sidecar_path, "gate settings")
        if sidecar.get("format") == CALIBRATED_FORMAT_NAME:
            return _load_calibrated(state, sidecar, weights_path, overrides, query_dim, operating_point, device)
        check_format(sidecar, FORMAT_NAME, FORMAT_VERSION, sidecar_path)
        config = _config_from_state_dict(state, sidecar.get("config", {}), weights_path)
        rule = _rule_from_settings(config.flavour, sidecar.get("rule", {}), overrides, sidecar_path)
    else:
        checkpoint = read_torch_file(path, "Venice-H1 gate checkpoint")
        state = _state_dict_of(checkpoint, path)
        settings = _find_settings(checkpoint)
        config = _config_from_state_dict(state, settings, path)
        rule = _rule_from_settings(config.flavour, settings, overrides, path)
    if operating_point is not None:
        named_rule({}, operating_point, f"{path} (a Venice-H1 gate)")
    if query_dim is not None and query_dim != config.query_dim:
        raise CheckpointError(
            f"{path} was trained on query embeddings of size {config.query_dim}, "
            f"but this DeRIS model produces {query_dim}; use a gate trained for this model"
        )
    gate = _build(config, rule, state, path)
    return gate.to(device) if device is not None else gate


def _load_calibrated(state, sidecar, path: Path, overrides, query_dim, operating_point, device):
    """A calibrated re-ranker from its files, checked against the caller's DeRIS and on `device`."""
    reranker = calibrated_from_files(state, sidecar, path, overrides, operating_point)
    if query_dim is not None and query_dim != reranker.config.query_dim:
        raise CheckpointError(
            f"{path} was trained on DeRIS embeddings of size {reranker.config.query_dim}, "
            f"but this DeRIS model produces {query_dim}; use a re-ranker trained for this model"
        )
    return reranker.to(device) if device is not None else reranker



def _rule(values: Mapping[str, Any]) -> DecisionRule:
    margin = values.get("margin_pred", 0.0)
    return DecisionRule(tau=float(values["tau"]), temp=float(values.get("temp", 1.0)),
                        margin_pred=None if margin is None else float(margin), margin_gap=float(values.get("margin_gap", 0.0)))


def _set_rule(values: Mapping[str, Any]) -> SetRule:
    fields = {f.name for f in dataclasses.fields(SetRule)}
    return SetRule(**{k: float(v) for k, v in values.items() if k in fields})


def calibrated_from_files(
    state: Mapping[str, torch.Tensor],
    sidecar: Mapping[str, Any],
    path: Path,
    overrides: Mapping[str, Any],
    operating_point: Optional[str] = None,
) -> CalibratedReranker:
    """Build a `CalibratedReranker` from its weights and sidecar (see `load_gate`).

    operating_point: a name from the file's `operating_points` (e.g. "conservative") to use
    instead of its `rule`; `overrides` (tau, temp, margin_pred, margin_gap) apply on top.
    """
    check_format(dict(sidecar), CALIBRATED_FORMAT_NAME, CALIBRATED_FORMAT_VERSION, path.with_suffix(".json"))
    fields = {f.name for f in dataclasses.fields(CalibratedConfig)}
    values = {k: v for k, v in sidecar.get("config", {}).items() if k in fields}
    values["grid_scales"] = tuple(values.get("grid_scales", GRID_SIZES))
    values["set_inputs"] = tuple(values.get("set_inputs", ()))
    config = CalibratedConfig(**values)
    points = {name: _rule(rule) for name, rule in sidecar.get("operating_points", {}).items()}
    base = named_rule(points, operating_point, path) if operating_point is not None else _rule(sidecar["rule"])
    rule = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    set_rule, set_points = None, {}
    if config.sets:
        set_points = {name: _set_rule(values) for name, values in sidecar.get("set_operating_points", {}).items()}
        set_rule = set_points.get(operating_point) if operating_point is not None else None
        set_rule = set_rule or _set_rule(sidecar.get("set_rule", {}))
    reranker = CalibratedReranker(config, rule, points, set_rule, set_points)
    state, memory = _memory_from_files(state, sidecar, path)
    mismatch = state_dict_mismatch(reranker.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path} does not fit a calibrated re-ranker with the settings of its .json: {mismatch}")
    reranker.load_state_dict(state, strict=True)
    return reranker.attach_memory(memory).eval()


def _memory_from_files(state: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any], path: Path):
    """(the state without the memory's buffers, the RetrievalMemory or None): a memory exactly when
    the sidecar has a `retrieval` entry; its keys are computed in float32 whatever their stored dtype."""
    settings = sidecar.get("retrieval")
    if settings is None:
        return state, None
    if not all(name in state for name in ("memory.keys", "memory.values")):
        raise CheckpointError(f"{path}: its .json describes a retrieval memory but the weights hold no memory.keys / memory.values")
    fields = {f.name for f in dataclasses.fields(RetrievalConfig)}
    config = RetrievalConfig(**{k: v for k, v in settings.items() if k in fields})
    rest = {k: v for k, v in state.items() if not k.startswith("memory.")}
    return rest, RetrievalMemory(state["memory.keys"].float(), state["memory.values"].float(), config)


def _write_pair(state: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any], path: str | os.PathLike, what: str) -> Path:
    """Write `<path>.safetensors` (state) + `<path>.json` (sidecar) atomically; returns the weights path."""
    path = Path(path).expanduser()
    weights_path, sidecar_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(weights_path, lambda tmp: save_file(state, tmp, metadata={"format": sidecar["format"]}))
        atomic_write(sidecar_path, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    except OSError as exc:
        raise OutputError(f"cannot write {what} to {weights_path}: {exc.strerror or exc}; choose a writable path") from None
    return weights_path


def save_gate(gate: VeniceGate, path: str | os.PathLike) -> Path:
    """Write a Venice-H1 gate as `<path>.safetensors` + `<path>.json` (config and rule); returns the weights path."""
    sidecar = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **gate.settings()}
    return _write_pair(gate.state_dict(), sidecar, path, "gate")


def save_calibrated(reranker: CalibratedReranker, path: str | os.PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a calibrated re-ranker as `<path>.safetensors` + `<path>.json` (format, config, rule,
    operating points, `extra` such as the training settings); returns the weights path."""
    sidecar = {"format": CALIBRATED_FORMAT_NAME, "format_version": CALIBRATED_FORMAT_VERSION, **reranker.settings(), **dict(extra or {})}
    state = {**reranker.state_dict(), **storage_state(reranker.memory)}  # memory keys in their storage dtype
    return _write_pair(state, sidecar, path, "re-ranker")
