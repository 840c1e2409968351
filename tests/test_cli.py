import json
import subprocess
import sys

import torch

from deris_rerank.gate import load_gate


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deris_rerank", *map(str, args)], capture_output=True, text=True)


def test_convert_gate_writes_an_equivalent_safetensors_gate(tmp_path, venice_dir):
    result = run_cli("convert-gate", venice_dir / "v3_hf_style.pt", tmp_path / "gate", "--tau", "0.7")
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "gate.json").read_text())
    assert settings["rule"]["tau"] == 0.7 and settings["config"]["flavour"] == "released"
    converted, original = load_gate(tmp_path / "gate.safetensors"), load_gate(venice_dir / "v3_hf_style.pt")
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



def test_convert_refuses_a_checkpoint_that_fits_no_preset(tmp_path, reference_dir):
    from safetensors.torch import load_file

    state = load_file(str(reference_dir / "parity_small_A" / "state_dict.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "deris.pth")
    result = run_cli("convert", tmp_path / "deris.pth", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no DeRIS preset has BEiT-3 width 64" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_cli("convert", tmp_path / "deris.pth", tmp_path / "out", "--preset", "deris-b-refcoco")
    assert result.returncode == 2 and "does not fit DeRIS config 'deris-b-refcoco'" in result.stderr


def test_convert_success_path_in_process(tmp_path, monkeypatch, parity_config, parity_state, capsys):
    from deris_rerank import cli
    from deris_rerank.checkpoints import load_deris
    from deris_rerank.deris.config import PRESETS

    monkeypatch.setitem(PRESETS, parity_config.name, parity_config)  # make the fixture's size a preset
    torch.save({"state_dict": {f"module.{k}": v for k, v in parity_state.items()}}, tmp_path / "deris.pth")
    assert cli.main(["convert", str(tmp_path / "deris.pth"), str(tmp_path / "out")]) == 0
    assert f"preset {parity_config.name}" in capsys.readouterr().out
    converted, original = load_deris(tmp_path / "out"), load_deris(parity_state, parity_config)
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
