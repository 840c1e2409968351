#!/usr/bin/env bash
# One GPU check, at most about 8 minutes on one GPU: the gpu-marked tests, then the table of
# bench/gpu_bench.py (DeRIS-L and DeRIS-B, float32 / bfloat16, eager / torch.compile, batch 1,
# 16 and 32, peak memory, end-to-end pipeline times) written under OUT_DIR as gpu_table.md and
# gpu_table.json, with the test log as gpu_tests.log.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Without a CUDA device it says so and exits 0. Run from the repository root.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: skipping the GPU tests and the GPU table"
  exit 0
fi
python -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
tests=${PIPESTATUS[0]}
timeout 330 python bench/gpu_bench.py "$OUT" --budget-s 270
bench=$?
echo "gpu tests exit code: $tests; gpu table exit code: $bench"
exit $(( tests != 0 || bench != 0 ))
