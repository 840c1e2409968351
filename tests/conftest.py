"""Shared fixtures: where the upstream reference material lives, and loaders for it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("DERIS_RERANK_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


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
