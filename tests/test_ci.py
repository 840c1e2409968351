""".ci/run runs README's test command as written, and the parity tests again on torch's portable kernels."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_line_as_written():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = 'pip install -e ".[test]" && python -m pytest'
    assert f"\n{command}\n" in readme
    assert f"\n{command}\n" in (REPO / ".ci" / "run").read_text()


def test_ci_runs_the_parity_tests_under_the_default_capability_too():
    script = (REPO / ".ci" / "run").read_text()
    files = re.search(r"PARITY_TESTS=\(([^)]*)\)", script).group(1).split()
    assert "tests/test_deris_parity.py" in files and "tests/test_deris_beit3.py" in files
    assert all((REPO / name).is_file() for name in files), files
    assert re.search(r'ATEN_CPU_CAPABILITY=default timeout [^\n]* python -m pytest -q "\$\{PARITY_TESTS\[@\]\}"', script)
    # either run failing fails CI
    assert '[ "$readme_status" != 0 ] || [ "$default_status" != 0 ]' in script
