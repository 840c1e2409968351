"""Loading DeRIS checkpoints: the four official manifests, strictness, presets, conversion."""
import json

import pytest
import torch

from deris_rerank.checkpoints import load_deris, save_deris, upstream_to_ours
from deris_rerank.deris.config import DerisConfig
from deris_rerank.errors import CheckpointError

MANIFESTS = {
    "DERIS-L-refcoco": "deris-l-refcoco",
    "DERIS-B-refcoco": "deris-b-refcoco",
    "DERIS-L-grefcoco": "deris-l-grefcoco",
    "DERIS-B-grefcoco": "deris-b-grefcoco",
}
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def manifest_state(reference_dir, name):
    """A meta-device state dict with exactly the manifest's keys, shapes and dtypes."""
    manifest = json.loads((reference_dir / "manifests" / f"{name}.json").read_text())
    return manifest, {e["key"]: torch.empty(e["shape"], dtype=DTYPES[e["dtype"]], device="meta") for e in manifest["state_dict"]}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_official_manifest_loads_exactly_and_preset_is_detected(reference_dir, name):
    manifest, state = manifest_state(reference_dir, name)
    model = load_deris(state)  # preset detected from shapes; strict: raises on any missing/unexpected key
    assert model.config == DerisConfig.preset(MANIFESTS[name])
    unused = set(manifest["unused_at_inference"]["param_keys"])
    dropped = {k for k in state if upstream_to_ours(k) is None}
    assert unused <= dropped  # every unused key is accepted and dropped ...
    assert dropped - unused <= {"head.criterion.empty_weight"}  # ... and nothing that is used
    used = sum(state[k].numel() for k in state if k not in dropped and not k.endswith("relative_position_index"))
    assert sum(p.numel() for p in model.parameters()) == used
    assert sum(p.numel() for p in model.parameters()) + sum(state[k].numel() for k in dropped if k in unused) == manifest["total_parameters"]


def test_missing_unexpected_and_misshaped_keys_are_listed(reference_dir):
    _, state = manifest_state(reference_dir, "DERIS-B-refcoco")
    broken = dict(state)
    del broken["perception_branch.predictor.SEG_cls.bias"]
    broken["perception_branch.predictor.extra.weight"] = torch.empty(3, 4, device="meta")
    broken["perception_branch.predictor.refer_proj.0.weight"] = torch.empty(256, 256, device="meta")
    with pytest.raises(CheckpointError) as err:
        load_deris(broken)
    message = str(err.value)
    assert "1 missing: decoder.SEG_cls.bias[2]" in message
    assert "1 unexpected: decoder.extra.weight[3, 4]" in message
    assert "decoder.refer_proj.0.weight: expected [256, 512], found [256, 256]" in message
    assert "\n" not in message


def test_preset_must_match_the_checkpoint(reference_dir):
    _, state = manifest_state(reference_dir, "DERIS-B-refcoco")
    with pytest.raises(CheckpointError, match="deris-l-refcoco"):
        load_deris(state, config="deris-l-refcoco")
    with pytest.raises(CheckpointError, match="unknown DeRIS preset"):
        load_deris(state, config="deris-xl")


def test_relative_position_index_is_checked_not_trusted(parity_fixture):
    config, state = parity_fixture
    tampered = dict(state)
    key = "perception_branch.hier_vision_encoder.layers.0.blocks.0.attn.relative_position_index"
    tampered[key] = tampered[key].flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index differs"):
        load_deris(tampered, config)


def test_official_pth_layouts_load_the_same(tmp_path, parity_fixture):
    config, state = parity_fixture
    reference = load_deris(state, config)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "meta": {"epoch": 3}}, tmp_path / "a.pth")
    torch.save(state, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        model = load_deris(tmp_path / name, config)
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_save_then_load_our_format_round_trips(tmp_path, parity_fixture):
    config, state = parity_fixture
    model = load_deris(state, config, dtype=torch.float32)
    folder = save_deris(model, tmp_path / "converted")
    sidecar = json.loads((folder / "config.json").read_text())
    assert DerisConfig.from_dict(sidecar["config"]) == config and len(sidecar["sha256"]["model.safetensors"]) == 64
    for source in (folder, folder / "model.safetensors"):
        restored = load_deris(source)
        assert restored.config == config
        for key, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), key
        assert torch.equal(
            restored.swin.layers[0].blocks[0].attn.relative_position_index,
            model.swin.layers[0].blocks[0].attn.relative_position_index,
        )


def test_unsafe_or_missing_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_deris(tmp_path / "deris.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_deris(tmp_path / "folder")

    class Payload:
        def __reduce__(self):
            return (print, ("side effect",))

    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_deris(tmp_path / "evil.pth")
    torch.save({"state_dict": {"perception_branch.nonsense": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a DeRIS checkpoint"):
        load_deris(tmp_path / "other.pth")



@pytest.fixture(scope="module")
def parity_fixture(parity_config, parity_state):
    """(config, upstream-named state dict) of the parity fixture; tests copy the dict before changing it."""
    return parity_config, parity_state
