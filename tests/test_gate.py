import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from deris_rerank.errors import CheckpointError, InputError, OutputError
from deris_rerank.rerank.decision import DecisionRule
from deris_rerank.rerank.venice import GATE_CLASSES, PACKAGED, RELEASED, GateConfig, VeniceGate
from deris_rerank.rerank.files import load_gate, save_gate

V3_FILES = ["v3_hf_style.pt", "v3_script_style.pth"]


def gate_inputs(venice_inputs, venice_signatures, dtype=torch.float64):
    return (
        venice_inputs["query_feat"].to(dtype),
        venice_inputs["det_scores"].to(dtype),
        venice_signatures["mask_stats"].to(dtype),
        venice_signatures["grid_signatures"].to(dtype),
    )


@pytest.mark.parametrize("name", V3_FILES)
def test_released_checkpoint_reproduces_v3_outputs_in_float64(name, venice_dir, venice_inputs, venice_signatures):
    expected = load_file(str(venice_dir / "v3_outputs.safetensors"))
    gate = load_gate(venice_dir / name).double()
    assert gate.config.flavour == RELEASED
    assert gate.rule == DecisionRule(tau=0.525282344529155, temp=1.0, margin_pred=0.02, margin_gap=0.0)
    decision = gate.decide(*gate_inputs(venice_inputs, venice_signatures))
    assert (decision.p_fail_logit - expected["p_fail_logit"]).abs().max() <= 1e-9
    assert (decision.p_fail - expected["p_fail"]).abs().max() <= 1e-9
    assert (decision.rank - expected["rank_logits"]).abs().max() <= 1e-9
    assert torch.equal(decision.default_index, expected["default_idx"])
    assert torch.equal(decision.selected, expected["selected"])
    assert torch.equal(decision.switched, expected["use_rerank"].bool())
    # the default is argmax of the scores over slots, which is not slot 0 in this fixture
    assert decision.default_index.tolist() != [0] * 6


@pytest.mark.parametrize("name", V3_FILES)
def test_released_checkpoint_in_float32(name, venice_dir, venice_inputs, venice_signatures):
    expected = load_file(str(venice_dir / "v3_outputs.safetensors"))
    gate = load_gate(venice_dir / name)
    assert next(gate.parameters()).dtype == torch.float32
    decision = gate.decide(*gate_inputs(venice_inputs, venice_signatures, torch.float32))
    assert decision.p_fail.dtype == torch.float32
    assert (decision.p_fail_logit - expected["p_fail_logit_float32"]).abs().max() <= 1e-4
    assert (decision.rank - expected["rank_logits_raw_float32"]).abs().max() <= 1e-4


def test_packaged_checkpoint_reproduces_its_outputs(venice_dir, venice_inputs, venice_signatures):
    expected = load_file(str(venice_dir / "packaged_outputs.safetensors"))
    gate = load_gate(venice_dir / "packaged_style.pt").double()
    assert gate.config.flavour == PACKAGED
    assert gate.rule == DecisionRule(tau=0.4744430731379682, temp=1.0, margin_pred=None, margin_gap=0.0)
    inputs = gate_inputs(venice_inputs, venice_signatures)
    assert torch.equal(gate.candidate_features(*inputs), expected["features"])
    _, _, gain = gate(*inputs)
    assert (gain - expected["gain_logits"]).abs().max() <= 1e-9
    decision = gate.decide(*inputs)
    assert (decision.p_fail - expected["p_fail"]).abs().max() <= 1e-9
    assert torch.equal(decision.selected, expected["selected"])
    assert decision.default_index.tolist() == [0] * 6
    assert (decision.rank[:, 0] == 0).all()
    assert torch.allclose(decision.rank, expected["gain_logits"] - expected["gain_logits"][:, :1], atol=1e-9)


def test_released_and_packaged_parameter_counts():
    counts = {
        flavour: sum(p.numel() for p in cls(GateConfig(flavour), DecisionRule(tau=0.5)).parameters())
        for flavour, cls in GATE_CLASSES.items()
    }
    assert counts == {RELEASED: 11_296_258, PACKAGED: 11_260_930}


def test_dimensions_are_read_from_shapes(venice_dir):
    gate = load_gate(venice_dir / "v3_hf_style.pt")
    assert (gate.config.query_dim, gate.config.hidden_dim, gate.config.n_layers, gate.config.n_queries) == (256, 128, 3, 10)
    assert gate.config.use_grid and gate.config.n_heads == 8
    assert not gate.training


def test_overrides_change_the_decision(venice_dir, venice_inputs, venice_signatures):
    inputs = gate_inputs(venice_inputs, venice_signatures, torch.float32)
    never = load_gate(venice_dir / "v3_hf_style.pt", tau=1.0).decide(*inputs)
    assert not never.switched.any()
    eager = load_gate(venice_dir / "v3_hf_style.pt", tau=0.0, margin_pred=-1e9).decide(*inputs)
    assert torch.equal(eager.selected, eager.rank.argmax(dim=1))
    hot = load_gate(venice_dir / "v3_hf_style.pt", temp=1e6)
    assert hot.rule.temp == 1e6 and torch.allclose(hot.decide(*inputs).p_fail, torch.full((6,), 0.5), atol=1e-4)


class FixedGate(VeniceGate):
    """A gate whose network outputs are given, to test the decision rule alone."""

    def __init__(self, rule, default_index, p_fail_logit, gain):
        super().__init__(GateConfig(RELEASED, query_dim=2, n_queries=gain.shape[1], use_grid=False), rule)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.outputs = (default_index, p_fail_logit, gain)

    def forward(self, *inputs):
        return self.outputs


def decide_fixed(rule, default_index, p_fail_logit, gain):
    gain = torch.tensor(gain)
    gate = FixedGate(rule, torch.tensor(default_index), torch.tensor(p_fail_logit), gain)
    b, n = gain.shape
    return gate.decide(torch.zeros(b, n, 2), torch.zeros(b, n), torch.zeros(b, n, 4))


def test_decision_rule_on_hand_made_cases():
    gain = [[0.0, 0.5, 0.30, 0.29], [0.0, 0.5, 0.30, 0.29], [1.0, 1.01, 0.0, 0.0], [0.2, 0.1, 0.0, 0.0]]
    decision = decide_fixed(DecisionRule(tau=0.5), [0, 0, 0, 1], [2.0, -2.0, 2.0, 2.0], gain)
    # row 0: fails and alternative 1 gains 0.5 > 0.02 -> switch; row 1: p_fail below tau -> keep;
    # row 2: best alternative gains only 0.01 <= margin_pred -> keep; row 3: default is slot 1, slot 0 gains 0.1
    assert decision.selected.tolist() == [1, 0, 0, 0]
    assert decision.switched.tolist() == [True, False, False, True]
    assert decision.rank[3].tolist() == pytest.approx([0.1, 0.0, -0.1, -0.1])
    gap = decide_fixed(DecisionRule(tau=0.5, margin_gap=0.05), [0, 0], [2.0, 2.0], [[0, 0.5, 0.3, 0], [0, 0.5, 0.47, 0]])
    assert gap.selected.tolist() == [1, 0]  # second row: top-2 gap 0.03 is not > 0.05
    no_margin = decide_fixed(DecisionRule(tau=0.5, margin_pred=None), [0], [2.0], [[0.0, 0.01, 0.0, -1.0]])
    assert no_margin.selected.tolist() == [1]


def test_save_and_load_round_trip_exactly(tmp_path, venice_dir, venice_inputs, venice_signatures):
    inputs = gate_inputs(venice_inputs, venice_signatures, torch.float32)
    for name in ("v3_script_style.pth", "packaged_style.pt"):
        original = load_gate(venice_dir / name, tau=0.3, margin_gap=0.01)
        written = save_gate(original, tmp_path / name)
        assert written.suffix == ".safetensors" and written.with_suffix(".json").is_file()
        assert json.loads(written.with_suffix(".json").read_text())["format"] == "deris-rerank-gate"
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        for path in (written, written.with_suffix(".json")):
            restored = load_gate(path)
            assert restored.config == original.config and restored.rule == original.rule
            for key, value in original.state_dict().items():
                assert torch.equal(value, restored.state_dict()[key]), key
            a, b = original.decide(*inputs), restored.decide(*inputs)
            assert torch.equal(a.p_fail, b.p_fail) and torch.equal(a.rank, b.rank) and torch.equal(a.selected, b.selected)
        assert load_gate(written, tau=0.9).rule.tau == 0.9


def test_save_to_unwritable_place_is_a_clear_error(tmp_path, venice_dir):
    gate = load_gate(venice_dir / "v3_hf_style.pt")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write gate"):
        save_gate(gate, blocker / "gate")


class RunsCode:
    """Unpickling this would call os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode(sentinel)}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_gate(path)
    assert not sentinel.exists()
    # and the same payload in a plain pickle file
    path.write_bytes(pickle.dumps(RunsCode(sentinel)))
    with pytest.raises(CheckpointError, match="arbitrary unpickling|not a readable PyTorch file"):
        load_gate(path)
    assert not sentinel.exists()


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "gate.pt"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_gate(missing)
    with pytest.raises(CheckpointError, match="gate weights not found"):
        load_gate(tmp_path / "gate.safetensors")


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "gate.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="gate.pt"):
        load_gate(path)


def test_query_dim_mismatch_reports_expected_and_found(venice_dir, venice_inputs, venice_signatures):
    with pytest.raises(CheckpointError, match="size 256.*produces 192"):
        load_gate(venice_dir / "v3_hf_style.pt", query_dim=192)
    gate = load_gate(venice_dir / "v3_hf_style.pt")
    q, s, m, g = gate_inputs(venice_inputs, venice_signatures, torch.float32)
    with pytest.raises(InputError, match=r"expected shape \[B, 10, 256\].*found \[6, 10, 192\]"):
        gate.decide(q[..., :192], s, m, g)
    with pytest.raises(InputError, match=r"grid_sigs.*found \[6, 10, 600\]"):
        gate.decide(q, s, m, g[..., :600])
    with pytest.raises(InputError, match="with B=6"):
        gate.decide(q, s[:3], m, g)


def test_wrong_or_incomplete_state_dicts_are_refused(tmp_path, venice_dir):
    checkpoint = torch.load(venice_dir / "v3_hf_style.pt", weights_only=True)
    extra = dict(checkpoint, model={**checkpoint["model"], "extra.weight": torch.zeros(3, 2)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra\.weight\[3, 2\]"):
        load_gate(tmp_path / "extra.pt")
    partial = dict(checkpoint, model={k: v for k, v in checkpoint["model"].items() if k != "gain_head.2.bias"})
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"1 missing: gain_head\.2\.bias\[1\]"):
        load_gate(tmp_path / "partial.pt")
    torch.save({"model": {"backbone.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Venice-H1 gate"):
        load_gate(tmp_path / "other.pt")


def test_missing_tau_asks_for_it(tmp_path, venice_dir):
    checkpoint = torch.load(venice_dir / "v3_hf_style.pt", weights_only=True)
    torch.save({"model": checkpoint["model"]}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="tau"):
        load_gate(tmp_path / "bare.pt")
    gate = load_gate(tmp_path / "bare.pt", tau=0.4)
    assert gate.rule == DecisionRule(tau=0.4, temp=1.0, margin_pred=0.02, margin_gap=0.0)
    assert gate.config.n_heads == 8  # documented default when the file does not say


@pytest.mark.gpu
def test_gate_runs_on_cuda(venice_dir, venice_inputs, venice_signatures):
    gate = load_gate(venice_dir / "v3_hf_style.pt", device="cuda").double()
    decision = gate.decide(*gate_inputs(venice_inputs, venice_signatures))
    expected = load_file(str(venice_dir / "v3_outputs.safetensors"))
    assert decision.selected.device.type == "cuda"
    assert (decision.p_fail.cpu() - expected["p_fail"]).abs().max() <= 1e-9
    assert torch.equal(decision.selected.cpu(), expected["selected"])
