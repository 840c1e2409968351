#!/usr/bin/env bash
# What an install of deris-rerank costs in download and disk, for one way of getting PyTorch.
#
#   bash bench/install_size.sh "torch==2.13.0"          # this machine's local CPU-only build
#   bash bench/install_size.sh torch                      # the registry's default build (CUDA on x86_64 Linux)
#   bash bench/install_size.sh torch --index-url https://download.pytorch.org/whl/cpu   # PyTorch's CPU index
#
# Downloads torch (with the given pip options) and the package's dependencies into a scratch
# folder, installs them with the package into a new virtual environment from that folder only,
# and prints the size of the downloaded files and of the environment. Run from the repository root.
set -euo pipefail
TORCH=${1:?usage: bash bench/install_size.sh TORCH_REQUIREMENT [PIP_OPTIONS...]}
shift
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip --disable-pip-version-check -q"
$PIP download -d "$WORK/files" "$TORCH" "$@"
# the package, its dependencies, and setuptools + wheel to build it
$PIP download -d "$WORK/files" --find-links "$WORK/files" "$TORCH" . setuptools wheel
$PIP install --no-index --find-links "$WORK/files" "$TORCH" .
echo "torch requirement: $TORCH $*"
"$WORK/venv/bin/python" -c "import torch; print('installed torch', torch.__version__, '| CUDA build:', torch.version.cuda is not None)"
echo "downloaded: $(du -sh "$WORK/files" | cut -f1) in $(ls "$WORK/files" | wc -l) files"
echo "environment: $(du -sh "$WORK/venv" | cut -f1)"
