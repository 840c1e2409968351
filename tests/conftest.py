"""Shared fixtures: where the upstream reference material lives, and loaders for it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, TypeVar

import pytest
import torch
from safetensors.torch import load_file

from deris_rerank.deris.config import DerisConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("DERIS_RERANK_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))

T = TypeVar("T")


def submodule_state(state: Mapping[str, T], prefix: str, drop: Iterable[str] = ()) -> Dict[str, T]:
    """The entries of `state` whose key starts with `prefix`, keyed by the rest of the key, in order.

    A key is left out when its stripped name equals one of the names in `drop` or ends with
    "." + one of them: drop=("relative_position_index",) leaves out every Swin block's index
    buffer, drop=("vision_embed.mask_token",) that one BEiT-3 entry. The values are not copied.
    """
    drop = tuple(drop)
    stripped = ((key[len(prefix):], value) for key, value in state.items() if key.startswith(prefix))
    return {
        name: value
        for name, value in stripped
        if not any(name == item or name.endswith("." + item) for item in drop)
    }


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"upstream reference folder not found at {REFERENCE_DIR} (set DERIS_RERANK_REFERENCE)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def venice_dir(reference_dir) -> Path:
    path = reference_dir / "venice_A"
    if not path.is_dir():
        pytest.skip(f"Venice-H1 fixture not found at {path}")
    return path


@pytest.fixture(scope="session")
def venice_inputs(venice_dir):
    """Fixture inputs: query_feat [6,10,256], det_scores [6,10], mask_logits [6,10,96,96], float64."""
    return load_file(str(venice_dir / "inputs.safetensors"))


@pytest.fixture(scope="session")
def venice_signatures(venice_dir):
    """Reference mask_stats [6,10,4] and grid_signatures [6,10,675], float64."""
    return load_file(str(venice_dir / "signatures.safetensors"))


# The parity fixture: a downsized upstream DeRIS, its weights, inputs and recorded outputs.
# Session-scoped and shared by several modules: tests must not modify these tensors in place.


@pytest.fixture(scope="session")
def parity_dir(reference_dir) -> Path:
    """The `parity_small_A` folder (config.json, state_dict/inputs/outputs.safetensors)."""
    path = reference_dir / "parity_small_A"
    if not path.is_dir():
        pytest.skip(f"parity fixture not found at {path}")
    return path


@pytest.fixture(scope="session")
def parity_config(parity_dir) -> DerisConfig:
    """The fixture's downsized DerisConfig, read from its config.json."""
    return DerisConfig.from_fixture(json.loads((parity_dir / "config.json").read_text()))


@pytest.fixture(scope="session")
def parity_state(parity_dir):
    """The fixture's full state dict under upstream's key names (float64, int64 index buffers)."""
    return load_file(str(parity_dir / "state_dict.safetensors"))


@pytest.fixture(scope="session")
def parity_inputs(parity_dir):
    """Fixture inputs: img [2,3,384,384], img_mini [2,3,224,224], ref_expr_inds, text_attention_mask, ..."""
    return load_file(str(parity_dir / "inputs.safetensors"))


@pytest.fixture(scope="session")
def parity_outputs(parity_dir):
    """Upstream's recorded intermediate and final tensors for the fixture inputs, by name."""
    return load_file(str(parity_dir / "outputs.safetensors"))


TOY_CORPUS = [
    "man on the left", "woman on the right", "the red car", "small dog next to the blue bag",
    "second person from the left", "the biggest circle", "top right square", "green tree behind the house",
]


def train_toy_tokenizer(path: Path) -> Path:
    """A tiny BEiT-3-style sentencepiece model (BPE, 60 pieces) trained on TOY_CORPUS, written to `path`."""
    import sentencepiece

    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(TOY_CORPUS * 10) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=60, model_type="bpe", minloglevel=2
    )
    path.with_suffix(".model").rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, parity_config, parity_state):
    """A test-sized setup on disk: the parity fixture's DeRIS (float32) converted to our folder
    format with a toy `beit3.spm` inside, and a small random released-style gate for it
    (`gate.safetensors` + `gate.json`, query dim 64)."""
    from deris_rerank.checkpoints import load_deris, save_deris
    from deris_rerank.gate import RELEASED, DecisionRule, GateConfig, ReleasedGate, save_gate

    root = tmp_path_factory.mktemp("tiny_model")
    save_deris(load_deris(parity_state, parity_config, dtype=torch.float32), root / "deris")
    train_toy_tokenizer(root / "deris" / "beit3.spm")
    torch.manual_seed(0)
    gate = ReleasedGate(GateConfig(RELEASED, query_dim=parity_config.hidden_dim, hidden_dim=32, n_layers=1, n_heads=4),
                        DecisionRule(tau=0.3, margin_pred=0.0))
    save_gate(gate.eval(), root / "gate")
    return root
