"""Install deris-rerank: `pip install -e .` (add `[test]` for the test suite, `[ray]` for `--engine ray`, `[app]` for `deris-rerank app`, `[hub]` for hf:// model paths)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "deris_rerank" / "version.py").read_text(), VERSION)

setup(
    name="deris-rerank",
    version=VERSION["__version__"],
    description="DeRIS referring segmentation in plain PyTorch, re-ranked by the Venice-H1 failure gate",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["deris_rerank", "deris_rerank.*"]),
    # the embedded default model (DeRIS-tiny + its gate, 15 MB), so Pipeline() works from any install
    package_data={"deris_rerank": ["embedded/deris-tiny/*"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "safetensors>=0.4",
        "pillow>=9",
        "opencv-python-headless>=4.8",
        "sentencepiece>=0.1.99",
        "tqdm>=4.60",
        "scipy>=1.9",
    ],
    extras_require={
        "data": ["pycocotools>=2.0.6"],
        "plots": ["matplotlib>=3.6"],
        "ray": ["ray[data]>=2.60"],  # --engine ray (deris_rerank/distributed.py); tested with 2.60.0, the lowest tried
        # `deris-rerank app` (deris_rerank/app): tested with gradio 6.31.0 (fastapi 0.165, uvicorn 0.54, httpx 0.28)
        "app": ["gradio>=6", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # hf://OWNER/REPO/PATH model paths (deris_rerank/model_files.py): tested with huggingface_hub 2.4.0
        "hub": ["huggingface_hub>=0.20"],
        # --runtime onnxruntime and `deris-rerank export-onnx` (deris_rerank/onnx_*.py): tested with onnx 1.23.2, onnxruntime 1.32.0
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        "test": ["pytest>=7", "pycocotools>=2.0.6", "matplotlib>=3.6", "ray[data]>=2.60",
                 "gradio>=6", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "httpx>=0.24",
                 "huggingface_hub>=0.20", "onnx>=1.16", "onnxruntime>=1.18",
                 # tests/test_install.py builds the wheel without build isolation (no downloads), so the
                 # environment needs setuptools itself; Python >= 3.12's venvs come without it
                 "setuptools>=70.1",
                 # tests/test_app_browser.py drives the distribution's chromium (.ci/run installs it); tested with 4.20.0 and 4.51.0
                 "selenium>=4.20",
                 # tests/test_app.py fuzzes the API against its own /openapi.json; tested with 4.32.5 (it needs Python 3.11+)
                 "schemathesis>=4.32; python_version >= '3.11'"],
    },
    entry_points={"console_scripts": ["deris-rerank=deris_rerank.cli:main"]},
)
