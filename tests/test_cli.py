import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY_CONFIG, build_tiny_model
from deris_rerank.rerank.files import load_gate


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deris_rerank", *map(str, args)], capture_output=True, text=True)


def random_released_gate_file(path):
    """A random released-style Venice-H1 gate saved as the released `.pt` files are: {model, config} with
    the settings under their released names (query_feat_dim, ..., tau), as in the Venice-H1 fixture."""
    from deris_rerank.rerank.decision import DecisionRule
    from deris_rerank.rerank.venice import RELEASED, GateConfig, ReleasedGate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        gate = ReleasedGate(GateConfig(RELEASED, query_dim=64, hidden_dim=32, n_layers=2, n_heads=4), DecisionRule(tau=0.4))
    config = {"query_feat_dim": 64, "hidden_dim": 32, "n_layers": 2, "n_heads": 4, "n_queries": 10,
              "dropout": 0.1, "use_grid": True, "tau": 0.4}
    torch.save({"model": gate.state_dict(), "config": config}, path)
    return path


@pytest.mark.parametrize("source", ["random", "fixture"])
def test_convert_gate_writes_an_equivalent_safetensors_gate(tmp_path, source, request):
    if source == "fixture":
        checkpoint = request.getfixturevalue("venice_dir") / "v3_hf_style.pt"
    else:
        checkpoint = random_released_gate_file(tmp_path / "released.pt")
    result = run_cli("convert-gate", checkpoint, tmp_path / "gate", "--tau", "0.7")
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "gate.json").read_text())
    assert settings["rule"]["tau"] == 0.7 and settings["config"]["flavour"] == "released"
    converted, original = load_gate(tmp_path / "gate.safetensors"), load_gate(checkpoint)
    assert converted.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key])


def test_user_mistakes_give_one_line_and_nonzero_exit(tmp_path):
    result = run_cli("convert-gate", tmp_path / "missing.pt", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("deris-rerank: error:") and "missing.pt" in lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_version_flag():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("deris-rerank ")



def upstream_named(state):
    """A state dict with our key names renamed to upstream's, as an official `.pth` holds them
    (UPSTREAM_PREFIXES read backwards; the keys upstream has but inference does not use are absent)."""
    from deris_rerank.checkpoints import UPSTREAM_PREFIXES

    renamed = {}
    for name, value in state.items():
        upstream, ours = next((u, o) for u, o in UPSTREAM_PREFIXES if name.startswith(o))
        renamed[upstream + name[len(ours):]] = value
    return renamed


@pytest.fixture(params=["random", "fixture"])
def small_upstream_checkpoint(request):
    """(DerisConfig, upstream-named state dict) of a DeRIS no preset fits (BEiT-3 width 64): the tests'
    seeded random model, or the parity fixture's weights (skipped without the reference folder)."""
    if request.param == "fixture":
        return request.getfixturevalue("parity_config"), request.getfixturevalue("parity_state")
    return TINY_CONFIG, upstream_named(build_tiny_model().state_dict())


def test_convert_refuses_a_checkpoint_that_fits_no_preset(tmp_path, small_upstream_checkpoint):
    _, state = small_upstream_checkpoint
    torch.save({"state_dict": state}, tmp_path / "deris.pth")
    result = run_cli("convert", tmp_path / "deris.pth", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no DeRIS preset has BEiT-3 width 64" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_cli("convert", tmp_path / "deris.pth", tmp_path / "out", "--preset", "deris-b-refcoco")
    assert result.returncode == 2 and "does not fit DeRIS config 'deris-b-refcoco'" in result.stderr


def test_convert_success_path_in_process(tmp_path, monkeypatch, small_upstream_checkpoint, capsys):
    from deris_rerank import cli
    from deris_rerank.checkpoints import load_deris
    from deris_rerank.deris.config import PRESETS

    config, state = small_upstream_checkpoint
    monkeypatch.setitem(PRESETS, config.name, config)  # make the model's size a preset
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "deris.pth")
    assert cli.main(["convert", str(tmp_path / "deris.pth"), str(tmp_path / "out")]) == 0
    assert f"preset {config.name}" in capsys.readouterr().out
    converted, original = load_deris(tmp_path / "out"), load_deris(state, config)
    assert converted.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_every_option_of_every_command_has_help_text():
    import argparse

    from deris_rerank.cli import build_parser

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, command)
            elif action.option_strings and not action.help:
                missing.append(f"{name} {action.option_strings[0]}")

    walk(build_parser(), "deris-rerank")
    assert missing == []
