"""The Venice-H1 failure gate networks: decide whether to keep DeRIS's default candidate or switch.

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

Both end in `rerank.decision.apply_rule` with `gain` = the predicted IoU gains. The released
rule uses margin_pred = 0.02 by default; the packaged rule has no margin. Reading and writing
their files: `rerank.files`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import InputError
from .decision import DecisionRule, GateDecision, apply_rule
from .signatures import GRID_SIGNATURE_DIM, GRID_SIZES, grid_scale_mask

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


def check_input_shapes(expected: Mapping[str, Tuple[Any, Tuple]], kind: str, built_for: str) -> None:
    """Raise InputError unless every `name: (tensor, tail)` of `expected` is a tensor of shape
    [B, *tail] with one B for all; `kind` ("gate") and `built_for` ("query dim 256 and N=10")
    go into the message."""
    batch = None
    for name, (tensor, tail) in expected.items():
        want = "[B, " + ", ".join(map(str, tail)) + "]"
        if not torch.is_tensor(tensor):
            raise InputError(f"{kind} input {name}: expected a tensor of shape {want}, got {type(tensor).__name__}")
        found = tuple(tensor.shape)
        if len(found) != len(tail) + 1 or found[1:] != tail or (batch is not None and found[0] != batch):
            raise InputError(
                f"{kind} input {name}: expected shape {want}" + (f" with B={batch}" if batch is not None else "")
                + f", found {list(found)}; this {kind} was built for {built_for}"
            )
        batch = found[0]


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
    re-ranker, `rerank.calibrated`, also takes the expression's `TextContext`).
    """

    reads_text = False

    def __init__(self, config: GateConfig, rule: DecisionRule):
        super().__init__()
        self.config = config
        self.rule = rule
        self.operating_points: Dict[str, DecisionRule] = {}  # a Venice-H1 gate has only its rule

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
        check_input_shapes(expected, "gate", f"query dim {cfg.query_dim} and N={cfg.n_queries}")
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
