"""The calibrated re-ranker: DeRIS's candidates re-scored against the expression (SCN-style).

For B pairs with N candidates, T text tokens, width D (DeRIS's decoder width), K referring
classes and hidden size H:

    per candidate [query (D), cognition (D), 4 mask stats, score, refer logits (K), grid (675),
                   optionally 4 geometry values (centre and spread, from the 16 x 16 grid)]
        -> candidate encoder -> c [B, N, H]
    token features [B, T, D] -> text encoder -> t [B, T, H]
    L calibration layers, each (pre-norm, residual):
        c <- c + attn(c -> t, padding masked)     candidates read the expression
        t <- t + attn(t -> c)                     text made visually aware (pseudo-text)
        c <- c + self-attn(c)                     candidates compete (disambiguation)
        c, t <- FFN
    calibrated logit  s_i = head([c_i, c_i * mean(t)])            [B, N]
    fusion            f_i = w_deris * log(score_i) + w_cal * s_i   [B, N]  (w_deris = 1, w_cal = 0 at init)
    failure head      p_fail from the Query-0 candidate, the best alternative, the mean
                      candidate, the pooled text and the sorted scores / fused probabilities

There is no slot embedding and the failure head reads only permutation-invariant summaries,
so permuting the candidates permutes the fused logits and leaves p_fail unchanged.
`fusion="none"` ranks by the calibrated logit alone (an ablation). `use_text=False` skips the
text attention and zeroes the pooled text (an ablation: the same network without the expression;
the candidates' cognition embeddings, which DeRIS's aligner made from the text, stay).

Retrieval (optional, `memory`, see `rerank.retrieval`): a memory of training candidates keyed in
this network's own space (c, optionally joined with mean(t)) gives each candidate a retrieved
IoU-gain estimate r_i [B, N]; the ranking value becomes f_i + w_ret * r_i (w_ret >= 0, in the
memory's config). The failure head still reads f (what it was trained on). Without a memory, or
with w_ret = 0, the decisions are exactly those of the network alone.

Set answers (`sets=True`, trained on GRES data: the answer may be no object or several):
    membership logit  m_i = member_head([c_i, c_i * mean(t)])               [B, N]
    kind logits       k = kind_head(the failure head's summary, the sorted membership
                      probabilities (detached), and DeRIS's existence logit when read)  [B, 3]
                      over (no object, one, several)
and `decide` applies `rerank.decision.apply_set_rule` after the single-candidate rule: no object,
the members, or the single choice. Optional inputs (`set_inputs`): "existence" (DeRIS's
existence logit, given to every candidate and to the kind head) and "overlap" (each candidate's
largest soft IoU with another candidate and with a higher-scored one, from the 16 x 16 grids:
duplicates of one object are common).

Decision rule: Venice-H1's (`rerank.decision.apply_rule`) on the fused logits: the default is
argmax(score) (Query-0); switch to argmax(fused) only if p_fail > tau and the best
alternative's fused logit exceeds Query-0's by more than margin_pred (logit units). Because
log is monotone, a re-ranker whose calibrated logits are all zero (w_cal = 0 at
initialisation, or zero weights) never sees an alternative above Query-0, so it keeps
DeRIS's choice exactly, whatever tau.

Saved by `rerank.files.save_calibrated` as `<path>.safetensors` + `<path>.json` (format
name `deris-rerank-calibrated`); `load_gate` recognises the format and returns a `CalibratedReranker`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..settings import FUSIONS
from .decision import DecisionRule, GateDecision, SetRule, apply_rule, apply_set_rule
from .venice import N_MASK_STATS, check_input_shapes
from .retrieval import RetrievalMemory, retrieval_keys
from .signatures import GRID_FIELDS, GRID_SIGNATURE_DIM, GRID_SIZES
from .text_context import TextContext, pooled_text

CALIBRATED = "calibrated"
LOG_SCORE_FLOOR = 1e-12  # scores below it are ranked as equal by the DeRIS term of the fusion
SET_INPUTS = ("existence", "overlap")
N_KINDS = 3  # no object, one, several


@dataclass(frozen=True)
class CalibratedConfig:
    """Shape of a calibrated re-ranker. query_dim / text_dim: DeRIS's query and cognition widths;
    n_classes: referring classes K; n_queries: N (the failure head reads N sorted values)."""

    query_dim: int = 256
    text_dim: int = 256
    n_classes: int = 2
    hidden_dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_queries: int = 10
    dropout: float = 0.1
    use_text: bool = True
    fusion: str = "learned"
    geometry: bool = False
    flavour: str = CALIBRATED
    use_grid: bool = True
    grid_scales: Tuple[int, ...] = GRID_SIZES
    sets: bool = False
    set_inputs: Tuple[str, ...] = ()

    @property
    def feature_dim(self) -> int:
        """Per-candidate input width: query + cognition + 4 mask statistics + score + K logits + 675 grid
        values (+ 4 geometry values, + 1 existence logit, + 2 overlaps)."""
        geometry = GEOMETRY_DIM if self.geometry else 0
        extra = ("existence" in self.set_inputs) + 2 * ("overlap" in self.set_inputs)
        return self.query_dim + self.text_dim + N_MASK_STATS + 1 + self.n_classes + GRID_SIGNATURE_DIM + geometry + extra


class RerankerOutputs(NamedTuple):
    """A calibrated re-ranker's raw outputs for B pairs with N candidates: default_index [B]
    (Query-0's slot), p_fail_logit [B], fused [B, N] (with a memory: the ensemble), calibrated
    [B, N], retrieved [B, N] or None (no memory); for a set re-ranker member [B, N] membership
    logits and kind [B, 3] logits over (no object, one, several), else None."""

    default_index: Tensor
    p_fail_logit: Tensor
    fused: Tensor
    calibrated: Tensor
    retrieved: Optional[Tensor] = None
    member: Optional[Tensor] = None
    kind: Optional[Tensor] = None


GEOMETRY_DIM = 4
_GRID16_START = sum(size for name, size in GRID_FIELDS[: [n for n, _ in GRID_FIELDS].index("grid_mean_16")])


def mask_geometry(grid_sigs: Tensor) -> Tensor:
    """Where each candidate lies, from its 16 x 16 mean grid: [..., 675] -> [..., 4] =
    (centre x, centre y, spread x, spread y), the probability-weighted mean and standard
    deviation of the cell centres in [0, 1] (x to the right, y down; 0 for an empty mask)."""
    grid = grid_sigs[..., _GRID16_START : _GRID16_START + 256].unflatten(-1, (16, 16))
    cells = (torch.arange(16, device=grid.device, dtype=grid.dtype) + 0.5) / 16
    mass = grid.sum(dim=(-2, -1)).clamp(min=1e-6)
    px, py = grid.sum(dim=-2) / mass[..., None], grid.sum(dim=-1) / mass[..., None]  # marginals over x and y
    cx, cy = (px * cells).sum(-1), (py * cells).sum(-1)
    sx = (px * (cells - cx[..., None]) ** 2).sum(-1).clamp(min=0).sqrt()
    sy = (py * (cells - cy[..., None]) ** 2).sum(-1).clamp(min=0).sqrt()
    return torch.stack([cx, cy, sx, sy], dim=-1)


def candidate_overlaps(grid_sigs: Tensor, scores: Tensor) -> Tensor:
    """[..., N, 2]: each candidate's largest soft IoU (sum of minima / sum of maxima of the 16 x 16
    mean grids) with any other candidate, and with any candidate of a higher score (0 if none)."""
    grid = grid_sigs[..., _GRID16_START : _GRID16_START + 256]
    inter = torch.minimum(grid[..., :, None, :], grid[..., None, :, :]).sum(-1)
    union = torch.maximum(grid[..., :, None, :], grid[..., None, :, :]).sum(-1).clamp(min=1e-6)
    soft_iou = inter / union  # [..., N, N]
    n = grid.shape[-2]
    others = soft_iou.masked_fill(torch.eye(n, dtype=torch.bool, device=grid.device), 0.0)
    higher = scores[..., None, :] > scores[..., :, None]  # [i, j]: candidate j scores above i
    return torch.stack([others.amax(dim=-1), others.masked_fill(~higher, 0.0).amax(dim=-1)], dim=-1)


def existence_logit(existence: Tensor) -> Tensor:
    """DeRIS's existence probability [...] back to a logit, clamped to +-20."""
    p = existence.clamp(1e-9, 1 - 1e-9)
    return (p.log() - (-p).log1p()).clamp(-20.0, 20.0)


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class CalibrationLayer(nn.Module):
    """One round of candidate-text calibration (see the module docstring); pre-norm, residual."""

    def __init__(self, hidden: int, heads: int, dropout: float, use_text: bool):
        super().__init__()
        self.use_text = use_text
        attention = lambda: nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)  # noqa: E731
        if use_text:
            self.norm_read, self.norm_read_text = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.read_text = attention()
            self.norm_write, self.norm_write_cand = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.write_text = attention()
            self.norm_text_ffn = nn.LayerNorm(hidden)
            self.text_ffn = _mlp(hidden, 2 * hidden, hidden, dropout)
        self.norm_self = nn.LayerNorm(hidden)
        self.self_attn = attention()
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = _mlp(hidden, 4 * hidden, hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, cand: Tensor, text: Tensor, text_padding: Tensor) -> Tuple[Tensor, Tensor]:
        """cand [B, N, H], text [B, T, H], text_padding bool [B, T] (True = pad) -> (cand, text), same shapes."""
        if self.use_text:
            t = self.norm_read_text(text)
            cand = cand + self.drop(self.read_text(self.norm_read(cand), t, t, key_padding_mask=text_padding, need_weights=False)[0])
            c = self.norm_write_cand(cand)
            text = text + self.drop(self.write_text(self.norm_write(text), c, c, need_weights=False)[0])
            text = text + self.text_ffn(self.norm_text_ffn(text))
        c = self.norm_self(cand)
        cand = cand + self.drop(self.self_attn(c, c, c, need_weights=False)[0])
        cand = cand + self.ffn(self.norm_ffn(cand))
        return cand, text


class CalibratedReranker(nn.Module):
    """Candidates calibrated against the expression, fused with DeRIS's score, with a failure head.

    `forward` gives the raw outputs, `decide` applies the decision rule. `rule` holds the
    operating point in use; `operating_points` the named ones stored with it ("tuned",
    "conservative"). A set re-ranker (`config.sets`) also has `set_rule` and
    `set_operating_points` (the same names).
    """

    reads_text = True

    def __init__(self, config: CalibratedConfig, rule: DecisionRule, operating_points: Optional[Dict[str, DecisionRule]] = None,
                 set_rule: Optional[SetRule] = None, set_operating_points: Optional[Dict[str, SetRule]] = None):
        super().__init__()
        if config.fusion not in FUSIONS:
            raise InputError(f"fusion must be one of {FUSIONS}, got {config.fusion!r}")
        unknown = sorted(set(config.set_inputs) - set(SET_INPUTS))
        if unknown or (config.set_inputs and not config.sets):
            raise InputError(f"set_inputs must be among {SET_INPUTS} and need sets=True, got {config.set_inputs!r}")
        self.config, self.rule = config, rule
        self.operating_points = dict(operating_points or {})
        self.set_rule = (set_rule or SetRule()) if config.sets else None
        self.set_operating_points = dict(set_operating_points or {}) if config.sets else {}
        h, n = config.hidden_dim, config.n_queries
        self.candidate_encoder = nn.Sequential(
            nn.LayerNorm(config.feature_dim), nn.Linear(config.feature_dim, h), nn.GELU(), nn.Linear(h, h)
        )
        self.text_encoder = nn.Sequential(nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, h))
        self.layers = nn.ModuleList(CalibrationLayer(h, config.n_heads, config.dropout, config.use_text) for _ in range(config.n_layers))
        self.norm_cand, self.norm_text = nn.LayerNorm(h), nn.LayerNorm(h)
        self.calibration_head = _mlp(2 * h, h, 1, config.dropout)
        self.fusion_deris = nn.Parameter(torch.ones(()))
        self.fusion_calibrated = nn.Parameter(torch.zeros(()))
        self.failure_head = nn.Sequential(
            nn.Linear(4 * h + 2 * n + 1, h), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(h, h // 2), nn.GELU(), nn.Linear(h // 2, 1)
        )
        if config.sets:
            self.member_head = _mlp(2 * h, h, 1, config.dropout)
            extra = "existence" in config.set_inputs
            self.kind_head = nn.Sequential(nn.Linear(4 * h + 3 * n + 1 + extra, h), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(h, N_KINDS))
        self.register_module("memory", None)  # a RetrievalMemory, when one is attached (`attach_memory`)

    # --- network ----------------------------------------------------------------------
    def candidate_features(self, query_embed, scores, mask_stats, grid_sigs, text: TextContext, existence: Optional[Tensor] = None) -> Tensor:
        """[B, N, feature_dim]: query, cognition, mask statistics, score, referring logits, grid (, geometry,
        existence logit, overlaps)."""
        extra = [mask_geometry(grid_sigs)] if self.config.geometry else []
        if "existence" in self.config.set_inputs:
            extra.append(existence_logit(self._required_existence(existence))[:, None, None].expand(-1, scores.shape[1], 1))
        if "overlap" in self.config.set_inputs:
            extra.append(candidate_overlaps(grid_sigs, scores))
        return torch.cat([query_embed, text.cognition_embed, mask_stats, scores[..., None], text.refer_logits, grid_sigs, *extra], dim=-1)

    def _required_existence(self, existence: Optional[Tensor]) -> Tensor:
        if existence is None:
            raise InputError("this set re-ranker reads DeRIS's existence probability: pass existence=[B] (Candidates.existence)")
        return existence

    def forward(self, query_embed, scores, mask_stats, grid_sigs, text: TextContext, existence: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw outputs: (default_index [B], p_fail_logit [B], fused [B, N], calibrated [B, N]).

        query_embed [B, N, D], scores [B, N] referring probabilities, mask_stats [B, N, 4],
        grid_sigs [B, N, 675], text: `TextContext` (refer_logits [B, N, K], cognition_embed
        [B, N, D], text_feat [B, T, D], text_padding bool [B, T]), existence [B] DeRIS's
        existence probability (read only by set re-rankers with the "existence" input). With a
        memory, `fused` is the ensemble fused + w_ret * retrieved (see `outputs`).
        """
        return self.outputs(query_embed, scores, mask_stats, grid_sigs, text, existence)[:4]

    def outputs(self, query_embed, scores, mask_stats, grid_sigs, text: TextContext, existence: Optional[Tensor] = None) -> RerankerOutputs:
        """Every raw output (`RerankerOutputs`); inputs as in `forward`."""
        cand, pooled = self.encode(query_embed, scores, mask_stats, grid_sigs, text, existence)
        joint = torch.cat([cand, cand * pooled[:, None]], dim=-1)  # each candidate with its match to the expression
        calibrated = self.calibration_head(joint).squeeze(-1)
        fused = self.fuse(scores, calibrated)
        default_index = scores.argmax(dim=1)
        summary = self._summary(cand, pooled, scores, fused, default_index)
        p_fail_logit = self.failure_head(summary).squeeze(-1)
        member = kind = None
        if self.config.sets:
            member = self.member_head(joint).squeeze(-1)
            sorted_members = member.detach().sigmoid().sort(dim=1, descending=True).values
            extra = [existence_logit(self._required_existence(existence))[:, None]] if "existence" in self.config.set_inputs else []
            kind = self.kind_head(torch.cat([summary, sorted_members, *extra], dim=-1))
        retrieved = None
        if self.memory is not None:
            retrieved = self.memory.lookup(retrieval_keys(cand, pooled, self.memory.config.keys))
            if self.memory.config.weight != 0:
                fused = fused + self.memory.config.weight * retrieved
        return RerankerOutputs(default_index, p_fail_logit, fused, calibrated, retrieved, member, kind)

    def encode(self, query_embed, scores, mask_stats, grid_sigs, text: TextContext, existence: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The learned representations: candidates after calibration and norm [B, N, H], and the
        pooled text [B, H] (zeros when the re-ranker reads no text). Inputs as in `forward`."""
        padding = _never_all_padding(text.text_padding)
        cand = self.candidate_encoder(self.candidate_features(query_embed, scores, mask_stats, grid_sigs, text, existence))
        tokens = self.text_encoder(text.text_feat)
        for layer in self.layers:
            cand, tokens = layer(cand, tokens, padding)
        cand, tokens = self.norm_cand(cand), self.norm_text(tokens)
        pooled = pooled_text(tokens, padding)  # [B, H]
        if not self.config.use_text:
            pooled = torch.zeros_like(pooled)  # the ablation reads no text at all
        return cand, pooled

    def attach_memory(self, memory: Optional[RetrievalMemory]) -> "CalibratedReranker":
        """Use `memory` (None: none) from now on; its keys move to this re-ranker's device and dtype."""
        if memory is not None:
            param = next(self.parameters())
            memory = memory.to(device=param.device, dtype=param.dtype)
        self.memory = memory
        return self

    def fuse(self, scores: Tensor, calibrated: Tensor) -> Tensor:
        """[B, N] fused logits: w_deris * log(score) + w_cal * calibrated (calibrated alone when fusion="none")."""
        if self.config.fusion == "none":
            return calibrated
        return self.fusion_deris * scores.clamp(min=LOG_SCORE_FLOOR).log() + self.fusion_calibrated * calibrated

    def _summary(self, cand: Tensor, pooled: Tensor, scores: Tensor, fused: Tensor, default_index: Tensor) -> Tensor:
        """[B, 4H + 2N + 1] permutation-invariant input of the failure head (fused terms detached)."""
        n = cand.shape[1]
        default = cand.gather(1, default_index[:, None, None].expand(-1, 1, cand.shape[-1])).squeeze(1)
        is_default = torch.arange(n, device=cand.device)[None, :] == default_index[:, None]
        best_alternative = cand.masked_fill(is_default[..., None], float("-inf")).amax(dim=1)
        fused = fused.detach()
        advantage = fused.masked_fill(is_default, float("-inf")).amax(dim=1) - fused.gather(1, default_index[:, None]).squeeze(1)
        sorted_scores = scores.sort(dim=1, descending=True).values
        sorted_probs = fused.softmax(dim=1).sort(dim=1, descending=True).values
        return torch.cat([default, best_alternative, cand.mean(dim=1), pooled, sorted_scores, sorted_probs, advantage[:, None]], dim=-1)

    # --- decisions ----------------------------------------------------------------------
    @torch.no_grad()
    def decide(self, query_embed, scores, mask_stats, grid_sigs, text: Optional[TextContext] = None,
               existence: Optional[Tensor] = None) -> GateDecision:
        """Run the re-ranker and apply its rule. Shapes as in `forward`; `rank` = fused logit (with
        retrieval: the ensemble) minus Query-0's; `calibrated` = the calibrated logits [B, N];
        `retrieved` = the retrieved estimates [B, N] (None without a memory). A set re-ranker also
        gives `chosen` (bool [B, N], the answer's candidates by `set_rule`), `p_none`, `p_several`
        and `member` (membership probabilities [B, N])."""
        inputs = self._checked_inputs(query_embed, scores, mask_stats, grid_sigs, text)
        if existence is not None:
            existence = existence.to(device=inputs[0].device, dtype=inputs[0].dtype)
        out = self.outputs(*inputs, existence)
        decision = dataclasses.replace(apply_rule(self.rule, out.default_index, out.p_fail_logit, out.fused),
                                       calibrated=out.calibrated, retrieved=out.retrieved)
        if not self.config.sets:
            return decision
        cast_scores = inputs[1]
        chosen, p_none, p_several, member = apply_set_rule(self.set_rule, decision.selected, out.kind, out.member, cast_scores)
        return dataclasses.replace(decision, chosen=chosen, p_none=p_none, p_several=p_several, member=member)

    def _checked_inputs(self, query_embed, scores, mask_stats, grid_sigs, text):
        cfg = self.config
        if text is None:
            raise InputError("the calibrated re-ranker reads the expression: pass text=TextContext (Candidates.text)")
        t = text.text_feat.shape[1] if torch.is_tensor(text.text_feat) and text.text_feat.dim() == 3 else "T"
        expected = {
            "query_embed": (query_embed, (cfg.n_queries, cfg.query_dim)),
            "scores": (scores, (cfg.n_queries,)),
            "mask_stats": (mask_stats, (cfg.n_queries, N_MASK_STATS)),
            "grid_sigs": (grid_sigs, (cfg.n_queries, GRID_SIGNATURE_DIM)),
            "refer_logits": (text.refer_logits, (cfg.n_queries, cfg.n_classes)),
            "cognition_embed": (text.cognition_embed, (cfg.n_queries, cfg.text_dim)),
            "text_feat": (text.text_feat, (t, cfg.text_dim)),
            "text_padding": (text.text_padding, (t,)),
        }
        check_input_shapes(expected, "re-ranker", f"query dim {cfg.query_dim}, text dim {cfg.text_dim} and N={cfg.n_queries}")
        param = next(self.parameters())
        cast = [x.to(device=param.device, dtype=param.dtype) for x in (query_embed, scores, mask_stats, grid_sigs)]
        return (*cast, text.to(device=param.device, dtype=param.dtype))

    def settings(self) -> Dict[str, Any]:
        """Config, decision rule and named operating points (and the memory's settings, when there
        is one) as plain JSON-able values."""
        settings = {
            "config": dataclasses.asdict(self.config),
            "rule": dataclasses.asdict(self.rule),
            "operating_points": {name: dataclasses.asdict(rule) for name, rule in self.operating_points.items()},
        }
        if self.config.sets:
            settings["set_rule"] = dataclasses.asdict(self.set_rule)
            settings["set_operating_points"] = {name: dataclasses.asdict(rule) for name, rule in self.set_operating_points.items()}
        if self.memory is not None:
            settings["retrieval"] = self.memory.settings()
        return settings


def _never_all_padding(padding: Tensor) -> Tensor:
    """bool [B, T] padding with the first token kept where a row would otherwise be all padding
    (attention over no keys is undefined)."""
    padding = padding.bool()
    first = torch.zeros_like(padding)
    first[:, :1] = True
    return padding & ~(first & padding.all(dim=1, keepdim=True))
