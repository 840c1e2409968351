"""A built wheel carries the embedded default, and `Pipeline()` works from a non-editable install.

Builds the wheel from this checkout (no build isolation, no downloads), installs it into a new
virtual environment that sees this interpreter's packages (torch and the other dependencies) but
not this checkout, and runs the demo's Python API from a folder outside the repository.

The suite runs from a bare interpreter (CI) as well as from a virtual environment (most users).
The new environment is therefore not made with `system_site_packages=True`: inside a venv that
option shows the base interpreter's packages, not the running venv's, and torch is missing there.
Instead a `.pth` file in the new environment lists this interpreter's own import folders.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = ("config.json", "model.safetensors", "tokenizer.model", "gate.safetensors", "gate.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the packaging files (building writes build/ and *.egg-info
    into its source folder, which must not be this checkout)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "deris_rerank", source / "deris_rerank", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True,
    )
    if build.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{build.stderr[-2000:]}")
    (wheel,) = out.glob("deris_rerank-*.whl")
    return wheel


def test_wheel_contains_the_embedded_default(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in EMBEDDED:
        assert f"deris_rerank/embedded/deris-tiny/{name}" in names
    assert not any(name.startswith(("tests/", "weights/", "bench/")) for name in names)


def outer_import_folders() -> list:
    """This interpreter's import folders (stdlib, site-packages of the venv or the base, user site,
    PYTHONPATH entries) that exist, less this checkout and anything inside it."""
    folders = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if path.is_dir() and path != REPO and REPO not in path.parents and str(path) not in folders:
            folders.append(str(path))
    return folders


def environment_seeing_these_packages(env_dir: Path) -> Path:
    """A new venv at `env_dir` (no pip) whose interpreter imports this one's packages after its own;
    its python."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, env=without_pythonpath(),
    ).stdout.strip()
    # a .pth line is appended to sys.path as it is: the outer folders' own .pth files (an editable
    # install of this checkout among them) are not run
    (Path(site_packages) / "outer_environment.pth").write_text("\n".join(outer_import_folders()) + "\n")
    return python


def without_pythonpath() -> dict:
    """This process's environment without PYTHONPATH (which may name this checkout)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_outer_import_folders_leave_out_the_checkout():
    folders = outer_import_folders()
    assert folders and all(REPO != Path(f) and REPO not in Path(f).parents for f in folders)
    import torch
    assert str(Path(torch.__file__).resolve().parents[1]) in folders


def test_pipeline_default_works_from_a_non_editable_install(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    python = environment_seeing_these_packages(env_dir)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed",
         "-q", str(wheel)],
        capture_output=True, text=True, env=without_pythonpath(),
    )
    assert install.returncode == 0, install.stderr[-2000:]
    script = textwrap.dedent(f"""
        import warnings
        import numpy as np
        import deris_rerank
        from deris_rerank import Pipeline
        warnings.simplefilter("ignore")
        assert deris_rerank.__file__.startswith({str(env_dir)!r}), deris_rerank.__file__
        image = np.load({str(REPO / "demo" / "assets" / "shapes_target.npy")!r})
        from PIL import Image
        rgb = np.asarray(Image.open({str(REPO / "demo" / "assets" / "shapes.png")!r}).convert("RGB"))
        result = Pipeline(device="cpu")(rgb, "the biggest cross")
        overlap = np.logical_and(result.mask, image).sum() / np.logical_or(result.mask, image).sum()
        print(deris_rerank.__file__, round(float(overlap), 3))
        assert overlap > 0.8
    """)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=outside, env=without_pythonpath())
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(env_dir) in run.stdout
