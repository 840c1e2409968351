"""Import rules: the model code imports only torch, the standard library and the model package;
imports run downward (no model code imports I/O, text, CLI, training or pipeline code)."""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deris_rerank"


def imported_modules(path: Path) -> set:
    """Absolute names of the modules a file imports (relative imports resolved), at any depth."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            if not node.module:  # `from . import x`
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def package_files(folder: str):
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", package_files("deris"), ids=lambda p: p.name)
def test_the_model_package_imports_only_torch_the_standard_library_and_itself(path):
    allowed_own = ("deris_rerank.deris", "deris_rerank.errors", "deris_rerank.timing")
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "deris_rerank":
            assert name.startswith(allowed_own), f"{path.name} imports {name}"
        else:
            assert top == "torch" or top in sys.stdlib_module_names or top == "__future__", f"{path.name} imports {name}"


def test_decoding_transforms_and_tokenizer_are_separate_concepts():
    assert not any(n.startswith(("sentencepiece", "deris_rerank.tokenizer")) for n in imported_modules(PACKAGE / "images.py"))
    assert not any(n.startswith(("cv2", "PIL", "deris_rerank.images")) for n in imported_modules(PACKAGE / "tokenizer.py"))
    assert not any(n.startswith(("sentencepiece", "PIL")) for n in imported_modules(PACKAGE / "transforms.py"))


def test_model_returns_a_typed_output_with_intermediates_only_on_request():
    import torch

    from conftest import build_tiny_model
    from deris_rerank.deris.model import DerisOutput

    model = build_tiny_model()
    config = model.config
    torch.manual_seed(1)
    image_hi, image_lo = torch.randn(1, 3, config.image_size, config.image_size), torch.randn(1, 3, config.image_size_lo, config.image_size_lo)
    tokens = torch.randint(4, 50, (1, config.max_tokens))
    padding = (torch.arange(config.max_tokens) >= 5).long()[None]
    with torch.inference_mode():
        plain = model(image_hi, image_lo, tokens, padding)
        full = model(image_hi, image_lo, tokens, padding, return_rounds=True)
    assert isinstance(plain, DerisOutput) and plain.rounds is None and "rounds" not in plain
    assert plain["scores"] is plain.scores and plain.mask_logits.shape[-1] == config.image_size
    with pytest.raises(KeyError, match="rounds"):
        plain["rounds"]
    assert "after_cross_attn" in full.rounds[1] and "after_cross_attn" not in full.rounds[0]
    assert torch.equal(plain.mask_logits, full.mask_logits) and torch.equal(plain.scores, full.scores)


def test_loading_a_gate_does_not_import_the_deris_model(tiny_model_dir):
    import subprocess

    code = (
        "import sys\n"
        "from deris_rerank.rerank.files import load_gate\n"
        f"load_gate({str(tiny_model_dir / 'gate.safetensors')!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('deris_rerank.deris', 'deris_rerank.checkpoints', "
        "'deris_rerank.pipeline', 'deris_rerank.training', 'deris_rerank.workflow', 'cv2', 'sentencepiece'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_package_and_its_version_import_without_torch():
    import subprocess

    code = "import sys, deris_rerank; print(deris_rerank.__version__, 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[1] == "False"


def test_the_command_line_starts_without_torch_or_training_code():
    import subprocess

    code = ("import sys, deris_rerank.cli; deris_rerank.cli.build_parser(); "
            "print(sorted({m.split('.')[0] if not m.startswith('deris_rerank') else m for m in sys.modules} & "
            "{'torch', 'cv2', 'sentencepiece', 'deris_rerank.training', 'deris_rerank.workflow', 'deris_rerank.pipeline'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_evaluating_imports_no_trainer():
    for name in ("evaluate.py", "ablation.py"):
        imported = imported_modules(PACKAGE / "workflow" / name)
        assert not any(m.startswith(("deris_rerank.workflow.train_", "deris_rerank.training")) for m in imported), name


@pytest.mark.parametrize("path", package_files("rerank"), ids=lambda p: p.name)
def test_the_reranking_package_reads_no_model_images_text_or_workflow_code(path):
    forbidden = ("deris_rerank.deris", "deris_rerank.checkpoints", "deris_rerank.pipeline", "deris_rerank.training",
                 "deris_rerank.workflow", "deris_rerank.cli", "deris_rerank.images", "deris_rerank.tokenizer", "cv2", "PIL", "sentencepiece")
    imported = imported_modules(path)
    assert not any(name.startswith(forbidden) for name in imported), f"{path.name} imports {sorted(imported)}"
