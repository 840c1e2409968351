"""The Venice-H1 failure gate: decide whether to keep DeRIS's default candidate or switch.

Two architectures exist, told apart by their state-dict keys:

- `released`: the training script's re-ranker, the architecture of the released
  Venice-H1 checkpoint (11,296,258 parameters at query dim 256, hidden 512, 3 layers,
  8 heads, N = 10). Keys `query_encoder.*`, `transformer.layers.*`, `gain_head.*`,
  `failure_encoder.*`, `failure_head.*`. Per-candidate input
  `[query (D), mask_mean, mask_max, mask_area, mask_std, score, grid (675)]`; the default
  candidate is `argmax(scores)` over DeRIS's query slots.
- `packaged`: the class in the public Venice-H1 package (`train.py`). Keys
  `query_encoder.net.*`, `transformer.layers.*`, `failure_gate.net.*`,
  `gain_predictor.net.*`. Per-candidate input
  `[query (D), score, mask_mean, mask_max, mask_area, mask_std, grid (675)]`; the default
  candidate is slot 0.

Decision rule (both): `p_fail = sigmoid(p_fail_logit / temp)`; `rank` = predicted gain
minus the default's; switch to `argmax(rank)` only if `p_fail > tau`, and (when
`margin_pred` is set) the best alternative's rank exceeds `margin_pred`, and (when
`margin_gap > 0`) the best alternative beats the second best by more than `margin_gap`.
The released rule uses margin_pred = 0.02 by default; the packaged rule has no margin.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError, InputError, OutputError
from .fileio import atomic_write, check_format, read_json, read_safetensors, read_torch_file, state_dict_mismatch
from .signatures import GRID_SIGNATURE_DIM, GRID_SIZES, grid_scale_mask

FORMAT_NAME = "deris-rerank-gate"
CALIBRATED_FORMAT_NAME = "deris-rerank-calibrated"  # `deris_rerank.calibrated`'s files, also read by load_gate
FORMAT_VERSION = 1
RELEASED, PACKAGED = "released", "packaged"
N_MASK_STATS = 4


@dataclass(frozen=True)
class GateConfig:
    """Shape of a gate network. Everything but `n_heads` and `dropout` is read off tensor shapes."""

    flavour: str  # RELEASED or PACKAGED
    query_dim: int = 256
    hidden_dim: int = 512
    n_layers: int = 3
    n_heads: int = 8
    n_queries: int = 10
    use_grid: bool = True
    dropout: float = 0.1
    grid_scales: Tuple[int, ...] = GRID_SIZES  # an ablation keeps fewer scales: the others are zeroed

    @property
    def feature_dim(self) -> int:
        """Per-candidate input width: query + 4 mask statistics + score (+ 675 grid values)."""
        return self.query_dim + N_MASK_STATS + 1 + (GRID_SIGNATURE_DIM if self.use_grid else 0)


@dataclass(frozen=True)
class DecisionRule:
    """Keep/switch thresholds. `margin_pred=None` means no margin test (the packaged rule)."""

    tau: float
    temp: float = 1.0
    margin_pred: Optional[float] = 0.02
    margin_gap: float = 0.0


@dataclass
class GateDecision:
    """What the gate decided for a batch of B pairs with N candidates each (slot order).

    p_fail_logit [B], p_fail [B] in [0, 1]; rank [B, N] predicted IoU gain relative to the
    default candidate (0 at the default); default_index [B] and selected [B] int64 slot
    indices (slots, not ranks: `Result.selected_rank` is a rank by score); switched [B] bool
    (selected != default); calibrated [B, N]: a text-aware
    re-ranker's calibrated candidate-text logits (None for a Venice-H1 gate).
    """

    p_fail_logit: torch.Tensor
    p_fail: torch.Tensor
    rank: torch.Tensor
    default_index: torch.Tensor
    selected: torch.Tensor
    switched: torch.Tensor
    calibrated: Optional[torch.Tensor] = None


def apply_rule(rule: DecisionRule, default_index: Tensor, p_fail_logit: Tensor, gain: Tensor) -> GateDecision:
    """The keep/switch decision from the network's outputs (see the module docstring).

    default_index [B] int64, p_fail_logit [B], gain [B, N] raw predicted gains.
    """
    rank = gain - gain.gather(1, default_index[:, None])
    p_fail = torch.sigmoid(p_fail_logit / rule.temp)
    is_default = torch.arange(rank.shape[1], device=rank.device)[None, :] == default_index[:, None]
    alternatives = rank.masked_fill(is_default, float("-inf"))
    top = alternatives.topk(min(2, rank.shape[1]), dim=1).values
    use_rerank = p_fail > rule.tau
    if rule.margin_pred is not None:
        use_rerank &= top[:, 0] > rule.margin_pred
    if rule.margin_gap > 0 and top.shape[1] > 1:
        use_rerank &= (top[:, 0] - top[:, 1]) > rule.margin_gap
    selected = torch.where(use_rerank, rank.argmax(dim=1), default_index)
    return GateDecision(p_fail_logit, p_fail, rank, default_index, selected, selected != default_index)


def _transformer(cfg: GateConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=cfg.hidden_dim,
        nhead=cfg.n_heads,
        dim_feedforward=4 * cfg.hidden_dim,
        dropout=cfg.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers=cfg.n_layers, enable_nested_tensor=False)


class VeniceGate(nn.Module):
    """Base class: input checks, the shared transformer and the decision rule.

    Subclasses define `query_encoder`, their heads, `candidate_features` and `heads`.
    `reads_text` is False: a Venice-H1 gate reads the candidates alone (the calibrated
    re-ranker, `deris_rerank.calibrated`, also takes the expression's `TextContext`).
    """

    reads_text = False

    def __init__(self, config: GateConfig, rule: DecisionRule):
        super().__init__()
        self.config = config
        self.rule = rule

    # --- subclass hooks -------------------------------------------------------------
    def candidate_features(self, query_embed, scores, mask_stats, grid_sigs) -> torch.Tensor:
        """Concatenate per-candidate inputs in this architecture's order: [B, N, feature_dim]."""
        raise NotImplementedError

    def grid_inputs(self, grid_sigs: Tensor) -> list:
        """[grid_sigs] with the scales outside `config.grid_scales` zeroed; [] without grid inputs."""
        if not self.config.use_grid:
            return []
        if tuple(self.config.grid_scales) == GRID_SIZES:
            return [grid_sigs]
        return [grid_sigs * grid_scale_mask(self.config.grid_scales).to(grid_sigs)]

    def heads(self, hidden: torch.Tensor, scores: torch.Tensor, mask_mean: torch.Tensor):
        """From attended candidates [B, N, H]: (default_index [B], p_fail_logit [B], gain [B, N])."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------
    def forward(self, query_embed, scores, mask_stats, grid_sigs=None):
        """Raw network outputs: (default_index [B], p_fail_logit [B], gain [B, N]).

        query_embed [B, N, D], scores [B, N] referring probabilities in slot order,
        mask_stats [B, N, 4], grid_sigs [B, N, 675] (ignored by a gate without grid inputs).
        """
        features = self.candidate_features(query_embed, scores, mask_stats, grid_sigs)
        hidden = self.transformer(self.query_encoder(features))
        return self.heads(hidden, scores, mask_stats[..., 0])

    @torch.no_grad()
    def decide(self, query_embed, scores, mask_stats, grid_sigs=None) -> GateDecision:
        """Run the gate and apply its decision rule. Shapes as in `forward`; batched only."""
        inputs = self._checked_inputs(query_embed, scores, mask_stats, grid_sigs)
        return apply_rule(self.rule, *self(*inputs))

    def _checked_inputs(self, query_embed, scores, mask_stats, grid_sigs):
        cfg = self.config
        expected = {
            "query_embed": (query_embed, (cfg.n_queries, cfg.query_dim)),
            "scores": (scores, (cfg.n_queries,)),
            "mask_stats": (mask_stats, (cfg.n_queries, N_MASK_STATS)),
        }
        if cfg.use_grid:
            expected["grid_sigs"] = (grid_sigs, (cfg.n_queries, GRID_SIGNATURE_DIM))
        batch = None
        for name, (tensor, tail) in expected.items():
            want = "[B, " + ", ".join(map(str, tail)) + "]"
            if not torch.is_tensor(tensor):
                raise InputError(f"gate input {name}: expected a tensor of shape {want}, got {type(tensor).__name__}")
            found = tuple(tensor.shape)
            if len(found) != len(tail) + 1 or found[1:] != tail or (batch is not None and found[0] != batch):
                raise InputError(
                    f"gate input {name}: expected shape {want}"
                    + (f" with B={batch}" if batch is not None else "")
                    + f", found {list(found)}; this gate was built for query dim {cfg.query_dim} and N={cfg.n_queries}"
                )
            batch = found[0]
        param = next(self.parameters())
        cast = [t.to(device=param.device, dtype=param.dtype) for t, _ in expected.values()]
        return (*cast, None) if not cfg.use_grid else tuple(cast)

    def settings(self) -> Dict[str, Any]:
        """Config and decision rule as plain JSON-able values."""
        return {"config": dataclasses.asdict(self.config), "rule": dataclasses.asdict(self.rule)}


def _mlp_block(in_dim: int, out_dim: int, dropout: Optional[float]) -> list:
    """Linear -> LayerNorm -> ReLU (-> Dropout): four or three modules, as in the released gate."""
    block = [nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU()]
    return block + ([nn.Dropout(dropout)] if dropout is not None else [])


class ReleasedGate(VeniceGate):
    """The released Venice-H1 re-ranker (training script's `FailureReranker`)."""

    def __init__(self, config: GateConfig, rule: DecisionRule):
        super().__init__(config, rule)
        h = config.hidden_dim
        self.query_encoder = nn.Sequential(*_mlp_block(config.feature_dim, h, 0.1), *_mlp_block(h, h, None))
        self.transformer = _transformer(config)
        self.gain_head = nn.Sequential(nn.Linear(h, h // 2), nn.ReLU(), nn.Linear(h // 2, 1))
        self.failure_encoder = nn.Sequential(
            *_mlp_block(3 * h + 2 * config.n_queries, h, 0.2),
            *_mlp_block(h, h // 2, 0.1),
            nn.Linear(h // 2, h // 4),
            nn.ReLU(),
        )
        self.failure_head = nn.Linear(h // 4, 1)

    def candidate_features(self, query_embed, scores, mask_stats, grid_sigs):
        return torch.cat([query_embed, mask_stats, scores[..., None], *self.grid_inputs(grid_sigs)], dim=-1)

    def heads(self, hidden, scores, mask_mean):
        default_index = scores.argmax(dim=1)
        gain = self.gain_head(hidden).squeeze(-1)
        default_hidden = hidden.gather(1, default_index[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
        is_default = torch.arange(hidden.shape[1], device=hidden.device)[None, :] == default_index[:, None]
        best_alternative = hidden.masked_fill(is_default[..., None], -1e9).amax(dim=1)
        summary = torch.cat([default_hidden, best_alternative, hidden.mean(dim=1), scores, mask_mean], dim=-1)
        p_fail_logit = self.failure_head(self.failure_encoder(summary)).squeeze(-1)
        return default_index, p_fail_logit, gain


class _Net(nn.Module):
    """Holds a Sequential under `.net`, giving the packaged class's `*.net.*` key names."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class PackagedGate(VeniceGate):
    """The public Venice-H1 package's `VeniceH1Reranker` (checkpoints from its `train.py`)."""

    def __init__(self, config: GateConfig, rule: DecisionRule):
        super().__init__(config, rule)
        h = config.hidden_dim
        self.query_encoder = _Net(nn.Linear(config.feature_dim, h), nn.LayerNorm(h), nn.ReLU(), nn.Linear(h, h))
        self.transformer = _transformer(config)
        self.failure_gate = _Net(
            nn.Linear(3 * h + 2 * config.n_queries, h), nn.ReLU(), nn.Linear(h, h // 2), nn.ReLU(), nn.Linear(h // 2, 1)
        )
        self.gain_predictor = _Net(nn.Linear(h, h // 2), nn.ReLU(), nn.Linear(h // 2, 1))

    def candidate_features(self, query_embed, scores, mask_stats, grid_sigs):
        return torch.cat([query_embed, scores[..., None], mask_stats, *self.grid_inputs(grid_sigs)], dim=-1)

    def heads(self, hidden, scores, mask_mean):
        default_index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        gain = self.gain_predictor(hidden).squeeze(-1)
        summary = torch.cat([hidden.mean(dim=1), hidden.amax(dim=1), hidden[:, 0], scores, mask_mean], dim=-1)
        return default_index, self.failure_gate(summary).squeeze(-1), gain


GATE_CLASSES = {RELEASED: ReleasedGate, PACKAGED: PackagedGate}
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


def check_tau(tau: Optional[float]) -> None:
    """Raise InputError unless `tau` is None or a number in [0, 1] (NaN is refused)."""
    if tau is not None and not (isinstance(tau, numbers.Real) and 0.0 <= tau <= 1.0):
        raise InputError(f"tau must be between 0 and 1 (the gate switches when p_fail > tau), got {tau!r}")


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
    `deris_rerank.calibrated.CalibratedReranker` instead (same `decide`, plus the expression's
    `TextContext`); `operating_point` picks one of its stored operating points (e.g. "conservative").

    `path`: a Venice-H1 `.pt`/`.pth` file (released: `{model, config}` or `{model, tau, ...}`;
    packaged: `{model, config: {model: ...}}`), read with `weights_only=True`; or our own
    `.safetensors` file with its `.json` sidecar (see `save_gate`).
    `tau`, `temp`, `margin_pred`, `margin_gap` override the file's decision settings.
    `query_dim`, when given, is the embedding size the caller's DeRIS produces; a gate
    trained for another size is refused.
    """
    path = Path(path).expanduser()
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
        raise CheckpointError(f"{path} is a Venice-H1 gate: it has no named operating points (use tau=...)")
    if query_dim is not None and query_dim != config.query_dim:
        raise CheckpointError(
            f"{path} was trained on query embeddings of size {config.query_dim}, "
            f"but this DeRIS model produces {query_dim}; use a gate trained for this model"
        )
    gate = _build(config, rule, state, path)
    return gate.to(device) if device is not None else gate


def _load_calibrated(state, sidecar, path: Path, overrides, query_dim, operating_point, device):
    """A calibrated re-ranker's files (imported here: that module builds on this one)."""
    from .calibrated import calibrated_from_files

    reranker = calibrated_from_files(state, sidecar, path, overrides, operating_point)
    if query_dim is not None and query_dim != reranker.config.query_dim:
        raise CheckpointError(
            f"{path} was trained on DeRIS embeddings of size {reranker.config.query_dim}, "
            f"but this DeRIS model produces {query_dim}; use a re-ranker trained for this model"
        )
    return reranker.to(device) if device is not None else reranker


def save_gate(gate: VeniceGate, path: str | os.PathLike) -> Path:
    """Write `gate` as `<path>.safetensors` + `<path>.json` (config and rule); returns the weights path.

    Both files are written to temporary names and renamed, so an existing pair is never
    left half-written.
    """
    path = Path(path).expanduser()
    weights_path = path.with_suffix(".safetensors")
    sidecar_path = path.with_suffix(".json")
    state = {k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}
    sidecar = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **gate.settings()}
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(weights_path, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT_NAME}))
        atomic_write(sidecar_path, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    except OSError as exc:
        raise OutputError(f"cannot write gate to {weights_path}: {exc.strerror or exc}; choose a writable path") from None
    return weights_path

