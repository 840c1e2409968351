"""The calibrated re-ranker on hand-made inputs: fusion at zero weight, permutation, padding, files."""
import dataclasses

import pytest
import torch

from deris_rerank.rerank.calibrated import CalibratedConfig, CalibratedReranker
from deris_rerank.rerank.files import save_calibrated
from deris_rerank.errors import CheckpointError, InputError
from deris_rerank.rerank.decision import DecisionRule
from deris_rerank.rerank.files import load_gate
from deris_rerank.rerank.text_context import TextContext, pooled_text
from deris_rerank.workflow.train_calibrated import CalibratedSettings, listwise_targets, train_calibrated
from deris_rerank.rerank.gate_data import GateData

B, N, D, T = 6, 10, 16, 7
CONFIG = CalibratedConfig(query_dim=D, text_dim=D, hidden_dim=32, n_layers=2, n_heads=4, n_queries=N, dropout=0.0)


def inputs(seed=0, lengths=(7, 3, 1, 5, 7, 2)):
    """Random candidate and text inputs for B pairs; `lengths` real tokens per pair (the rest padding)."""
    g = torch.Generator().manual_seed(seed)
    refer = torch.randn(B, N, 2, generator=g) * 2
    scores = refer.softmax(-1)[..., 0]
    padding = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    text = TextContext(refer, torch.randn(B, N, D, generator=g), torch.randn(B, T, D, generator=g), padding)
    return (torch.randn(B, N, D, generator=g), scores, torch.rand(B, N, 4, generator=g), torch.rand(B, N, 675, generator=g)), text


def reranker(w_cal=0.0, seed=0, rule=DecisionRule(tau=0.0, margin_pred=0.0), config=CONFIG):
    torch.manual_seed(seed)
    model = CalibratedReranker(config, rule).eval()
    with torch.no_grad():
        model.fusion_calibrated.fill_(w_cal)
    return model


def test_zero_weight_fusion_keeps_derises_choice_exactly():
    args, text = inputs()
    model = reranker(w_cal=0.0)  # as initialised: the calibrated logit has no weight yet
    decision = model.decide(*args, text=text)
    assert torch.equal(decision.selected, args[1].argmax(1)) and not decision.switched.any()
    _, _, fused, calibrated = model(*args, text)
    assert calibrated.abs().sum() > 0  # the calibration itself is not zero...
    assert torch.equal(fused.argsort(dim=1, descending=True, stable=True), args[1].argsort(dim=1, descending=True, stable=True))
    # a network whose weights are all zero (fusion weight of DeRIS's term aside) also keeps DeRIS's choice
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_() if name != "fusion_deris" else p.fill_(1.0)
    assert torch.equal(model.decide(*args, text=text).selected, args[1].argmax(1))
    # ...and a weighted calibration does move the choice (the test above can fail)
    assert reranker(w_cal=50.0).decide(*args, text=text).switched.any()


def test_permuting_candidates_permutes_scores_and_keeps_p_fail():
    args, text = inputs(seed=1)
    model = reranker(w_cal=1.0)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    permuted_args = tuple(x[:, perm] for x in args)
    permuted_text = TextContext(text.refer_logits[:, perm], text.cognition_embed[:, perm], text.text_feat, text.text_padding)
    base, moved = model(*args, text), model(*permuted_args, permuted_text)
    assert torch.allclose(moved[2], base[2][:, perm], atol=1e-5)  # fused logits
    assert torch.allclose(moved[3], base[3][:, perm], atol=1e-5)  # calibrated logits
    assert torch.allclose(moved[1], base[1], atol=1e-5)  # p_fail logit
    a, b = model.decide(*args, text=text), model.decide(*permuted_args, text=permuted_text)
    assert torch.equal(perm[b.selected], a.selected)


def test_padding_tokens_do_not_change_the_result():
    args, text = inputs(seed=2)
    model = reranker(w_cal=1.0)
    base = model(*args, text)
    # other values under the padding
    noisy = text.text_feat.masked_fill(text.text_padding[..., None], 0) + 100 * torch.randn(B, T, D) * text.text_padding[..., None]
    changed = model(*args, text._replace(text_feat=noisy))
    # and more padding tokens at the end
    longer = TextContext(text.refer_logits, text.cognition_embed, torch.cat([text.text_feat, torch.randn(B, 5, D)], 1),
                         torch.cat([text.text_padding, torch.ones(B, 5, dtype=torch.bool)], 1))
    extended = model(*args, longer)
    for other in (changed, extended):
        for x, y in zip(base[1:], other[1:]):
            assert torch.allclose(x, y, atol=1e-5)
    # a real token does change it (the test above can fail)
    assert not torch.allclose(base[3], model(*args, text._replace(text_feat=text.text_feat + torch.randn(B, T, D)))[3], atol=1e-3)


def test_text_is_read_unless_switched_off():
    args, text = inputs(seed=4)
    other = text._replace(text_feat=torch.randn(B, T, D))
    with_text = reranker(w_cal=1.0)
    assert not torch.allclose(with_text(*args, text)[3], with_text(*args, other)[3], atol=1e-4)
    blind = reranker(w_cal=1.0, config=dataclasses.replace(CONFIG, use_text=False))
    assert not any(name.startswith("layers.0.read_text") for name, _ in blind.named_parameters())
    for x, y in zip(blind(*args, text)[1:], blind(*args, other)[1:]):
        assert torch.equal(x, y)


def test_pooled_text_is_the_masked_mean():
    feat = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(pooled_text(feat, torch.tensor([[False, False, True]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pooled_text(feat, torch.tensor([[True, True, True]])), torch.zeros(1, 2))


def test_save_load_round_trip(tmp_path):
    args, text = inputs(seed=5)
    model = reranker(w_cal=0.7, rule=DecisionRule(tau=0.3, margin_pred=0.5))
    model.operating_points = {"tuned": model.rule, "conservative": DecisionRule(tau=0.8, margin_pred=1.0)}
    written = save_calibrated(model, tmp_path / "cal", extra={"training": {"seed": 1}})
    assert written.suffix == ".safetensors" and (tmp_path / "cal.json").is_file()
    loaded = load_gate(written, query_dim=D)
    assert isinstance(loaded, CalibratedReranker) and loaded.config == model.config and loaded.rule == model.rule
    assert loaded.operating_points == model.operating_points
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    a, b = model.decide(*args, text=text), loaded.decide(*args, text=text)
    assert torch.equal(a.selected, b.selected) and torch.equal(a.p_fail, b.p_fail)
    conservative = load_gate(tmp_path / "cal.json", operating_point="conservative", margin_pred=2.0)
    assert conservative.rule == DecisionRule(tau=0.8, margin_pred=2.0)
    with pytest.raises(CheckpointError, match="no operating point"):
        load_gate(written, operating_point="bold")
    with pytest.raises(CheckpointError, match="embeddings of size 16"):
        load_gate(written, query_dim=64)
    with pytest.raises(InputError, match="reads the expression"):
        loaded.decide(*args)
    with pytest.raises(InputError, match="text_feat"):
        loaded.decide(*args, text=text._replace(text_feat=torch.randn(B, T, D + 1)))


def _gate_data(text: bool, pairs: int = 12) -> GateData:
    args, ctx = inputs(seed=6)
    rows = torch.arange(pairs) % B
    ious = torch.rand(pairs, N, generator=torch.Generator().manual_seed(7))
    return GateData(args[0][rows], args[1][rows], args[2][rows], args[3][rows], ious, torch.zeros(pairs, N, dtype=torch.long),
                    torch.ones(pairs, N, dtype=torch.long), torch.zeros(pairs), torch.ones(pairs), [str(i) for i in range(pairs)],
                    ["old-cache"] * pairs, text=ctx.select(rows) if text else None)


def test_training_needs_the_text_fields_and_is_seeded():
    settings = CalibratedSettings(hidden_dim=16, n_layers=1, n_heads=2, epochs=2, warmup_epochs=1, batch_size=4)
    with pytest.raises(InputError) as error:
        train_calibrated(_gate_data(text=False), settings, log=lambda line: None)
    assert "old-cache" in str(error.value) and "re-extract" in str(error.value) and "\n" not in str(error.value)
    a, b = (train_calibrated(_gate_data(text=True), settings, log=lambda line: None) for _ in range(2))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert float(a.fusion_calibrated.detach()) != 0.0  # training moved the fusion weight


def test_listwise_targets():
    ious = torch.tensor([[0.1, 0.9, 0.9, 0.0]])
    assert torch.equal(listwise_targets(ious, 0.0), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    soft = listwise_targets(ious, 0.05)
    assert soft[0, 1] == soft[0, 2] and soft.sum() == pytest.approx(1.0) and soft[0, 3] < soft[0, 0]


def test_mask_geometry_finds_centre_and_spread():
    from deris_rerank.rerank.calibrated import mask_geometry
    from deris_rerank.rerank.signatures import grid_signatures

    logits = torch.full((2, 64, 64), -20.0)
    logits[0, 8:24, 40:56] = 20.0  # a square: centre (0.75, 0.25), side 0.25
    logits[1, :, :32] = 20.0  # the left half
    geometry = mask_geometry(grid_signatures(logits))
    assert torch.allclose(geometry[0], torch.tensor([0.75, 0.25, 0.25 / 12**0.5, 0.25 / 12**0.5]), atol=0.01)
    assert torch.allclose(geometry[1, :2], torch.tensor([0.25, 0.5]), atol=0.01)
    model = reranker(w_cal=1.0, config=dataclasses.replace(CONFIG, geometry=True))
    args, text = inputs(seed=8)
    assert model(*args, text)[2].shape == (B, N)


def test_harmful_upper_bound_is_a_wilson_bound():
    from deris_rerank.workflow.train_calibrated import harmful_upper_bound

    assert harmful_upper_bound(4.0, 3000, 0.0) == 4.0
    bound = harmful_upper_bound(4.0, 3000, 0.95)  # Wilson: p = 0.04, n = 3000, z = 1.645 -> 4.62 %
    assert 4.55 < bound < 4.70
    assert harmful_upper_bound(4.0, 30000, 0.95) < bound < harmful_upper_bound(4.0, 300, 0.95)
    assert 0 < harmful_upper_bound(0.0, 3000, 0.95) < 0.1  # no harm seen is not proof of none
