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
