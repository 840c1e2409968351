"""Safe reading and atomic writing: file modes, and messages for files that are not what is expected."""
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deris_rerank.errors import CheckpointError
from deris_rerank.fileio import atomic_write, read_torch_file
from deris_rerank.rerank.cache import write_shard
from deris_rerank.visualize import save_png


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda value: os.umask(value)
    os.umask(saved)


@pytest.mark.parametrize("value, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, value, expected):
    umask(value)
    atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    save_png(tmp_path / "m.png", np.ones((4, 4), bool))
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))  # safetensors makes 0o600 files
    write_shard(tmp_path / "cache" / "shard_00000.safetensors", {"x": torch.zeros(1, 2)}, ["a"], {})
    assert mode_of(tmp_path / "plain.txt") == expected
    assert mode_of(tmp_path / "a.txt") == expected
    assert mode_of(tmp_path / "m.png") == expected
    assert mode_of(tmp_path / "w.safetensors") == expected
    assert mode_of(tmp_path / "cache" / "shard_00000.safetensors") == expected


def test_replacing_a_file_keeps_its_mode_and_leaves_no_temp_files(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "a.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new" and mode_of(target) == 0o640
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_files_that_are_not_torch_files_say_so_without_unsafe_advice(tmp_path):
    cases = {
        "random.pth": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "notes.pth": b"these are my notes, not a checkpoint\n",
        "empty.pth": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as error:
            read_torch_file(tmp_path / name, "DeRIS checkpoint")
        message = str(error.value)
        assert "not a PyTorch file" in message and name in message and "DeRIS checkpoint" in message
        assert "weights_only" not in message and "arbitrary" not in message and "\n" not in message


def test_objects_needing_arbitrary_unpickling_are_named_and_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as error:
        read_torch_file(tmp_path / "evil.pth")
    message = str(error.value)
    assert "arbitrary unpickling" in message and "system" in message
    assert "weights_only" not in message and "False" not in message and "\n" not in message
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Payload(), protocol=4))
    with pytest.raises(CheckpointError) as error:
        read_torch_file(tmp_path / "plain.pkl")
    assert "weights_only" not in str(error.value) and "not a readable PyTorch file" in str(error.value)


def test_a_plain_state_dict_loads(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(read_torch_file(tmp_path / "ok.pt")["w"], torch.arange(3))


def test_sidecar_formats_are_versioned_and_checked(tiny_model_dir, tmp_path):
    import json
    import shutil

    from deris_rerank.checkpoints import load_deris
    from deris_rerank.rerank.files import load_gate

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir / "deris", model)
    sidecar = json.loads((model / "config.json").read_text())
    assert sidecar["format_version"] == 1
    del sidecar["format_version"]  # files written before versions were recorded read as version 1
    (model / "config.json").write_text(json.dumps(sidecar))
    load_deris(model)
    sidecar["format_version"] = 2
    (model / "config.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="newer deris-rerank.*format version 2.*reads up to 1"):
        load_deris(model)

    for name in ("gate.safetensors", "gate.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    gate_sidecar = json.loads((tmp_path / "gate.json").read_text())
    assert gate_sidecar["format_version"] == 1
    gate_sidecar["format_version"] = 7
    (tmp_path / "gate.json").write_text(json.dumps(gate_sidecar))
    with pytest.raises(CheckpointError, match="newer deris-rerank.*version 7"):
        load_gate(tmp_path / "gate.safetensors")
    gate_sidecar["format"] = "something-else"
    (tmp_path / "gate.json").write_text(json.dumps(gate_sidecar))
    with pytest.raises(CheckpointError, match="is not a deris-rerank-gate file"):
        load_gate(tmp_path / "gate.safetensors")
