"""Shared fixtures: where the upstream reference material lives, and loaders for it; and the
test-sized model on disk (seeded random weights, no reference needed) behind the user-facing tests."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, TypeVar

import pytest
import torch
from safetensors.torch import load_file

from deris_rerank.deris.config import Beit3Config, DerisConfig, SwinConfig

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


def config_from_fixture(fixture_config: Mapping[str, Any]) -> DerisConfig:
    """The downsized configuration of a parity fixture's `config.json`.

    Reads `model_config_passed_to_build_model` and `shrink_choices`.
    """
    model = fixture_config["model_config_passed_to_build_model"]
    shrink = fixture_config["shrink_choices"]
    swin = next(v for k, v in shrink.items() if k.startswith("swin_builder_replacement"))
    beit = shrink["beit3_EncoderConfig_effective"]
    hidden = next(v for k, v in shrink.items() if k.startswith("hidden_dim"))
    decoder_ffn = next(v for k, v in shrink.items() if k.startswith("decoder_dim_feedforward"))
    pixel_ffn = next(v for k, v in shrink.items() if k.startswith("pixel_decoder_dim_feedforward"))
    aligner = next(v for k, v in shrink.items() if k.startswith("MultiGrainAligner"))
    return DerisConfig(
        name=f"fixture-{fixture_config.get('fixture', '?')}",
        swin=SwinConfig(
            embed_dim=swin["embed_dim"],
            depths=tuple(swin["depths"]),
            num_heads=tuple(swin["num_heads"]),
            window_size=swin["window_size"],
            mlp_ratio=swin["mlp_ratio"],
            patch_size=swin["patch_size"],
        ),
        beit3=Beit3Config(
            embed_dim=beit["encoder_embed_dim"],
            num_heads=beit["encoder_attention_heads"],
            ffn_dim=beit["encoder_ffn_embed_dim"],
            num_layers=beit["encoder_layers"],
            vocab_size=beit["vocab_size"],
            img_size=beit["img_size"],
            patch_size=beit["patch_size"],
            max_text_positions=beit["max_source_positions"],
            layernorm_eps=beit["layernorm_eps"],
        ),
        hidden_dim=hidden,
        num_queries=shrink["num_queries"],
        max_tokens=shrink["max_token"],
        image_size=shrink["img_size"],
        score_threshold=model["post_params"]["score_threshold"],
        mask_threshold=model["post_params"]["mask_threshold"],
        pixel_decoder_layers=shrink["pixel_decoder_transformer_enc_layers"],
        pixel_decoder_ffn=pixel_ffn,
        decoder_layers=shrink["dec_layers"],
        decoder_ffn=decoder_ffn,
        aligner_layers=aligner["layers"],
        aligner_ffn=aligner["ffn"],
    )


@pytest.fixture(scope="session")
def parity_config(parity_dir) -> DerisConfig:
    """The fixture's downsized DerisConfig, read from its config.json."""
    return config_from_fixture(json.loads((parity_dir / "config.json").read_text()))


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


# The test-sized DeRIS behind the pipeline, CLI, batch and workflow tests: the parity fixture's
# sizes (Swin width 16, BEiT-3 width 64 x 2 layers, C = 64, 10 queries, 384 / 224 inputs) with
# random weights from a fixed seed, so these tests need no reference folder. Its answer threshold
# is 0.7, not upstream's 0.9: the random model's scores lie between about 0.5 and 0.77, and at
# 0.9 DeRIS's own answer (the union of candidates above it) would always be empty.
TINY_CONFIG = DerisConfig(
    "test-tiny",
    SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=12),
    Beit3Config(embed_dim=64, num_heads=4, ffn_dim=256, num_layers=2, vocab_size=1000),
    hidden_dim=64,
    pixel_decoder_layers=2,
    decoder_ffn=256,
    score_threshold=0.7,
)
TINY_SEED = 0


def build_tiny_model(seed: int = TINY_SEED):
    """TINY_CONFIG's DerisModel (float32, eval) initialised from `seed`; the same weights on every call."""
    from deris_rerank.deris.model import DerisModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DerisModel(TINY_CONFIG).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A test-sized setup on disk, needing nothing outside the repository: TINY_CONFIG's DeRIS
    with seeded random weights (float32) in our folder format with a toy `beit3.spm` inside, and a
    small random released-style gate for it (`gate.safetensors` + `gate.json`, query dim 64)."""
    from deris_rerank.checkpoints import save_deris
    from deris_rerank.rerank.decision import DecisionRule
    from deris_rerank.rerank.venice import RELEASED, GateConfig, ReleasedGate
    from deris_rerank.rerank.files import save_gate

    root = tmp_path_factory.mktemp("tiny_model")
    save_deris(build_tiny_model(), root / "deris")
    train_toy_tokenizer(root / "deris" / "beit3.spm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gate = ReleasedGate(GateConfig(RELEASED, query_dim=TINY_CONFIG.hidden_dim, hidden_dim=32, n_layers=1, n_heads=4),
                            DecisionRule(tau=0.3, margin_pred=0.0))
    save_gate(gate.eval(), root / "gate")
    return root
