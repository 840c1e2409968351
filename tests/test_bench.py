"""The benchmark scripts run where they cannot measure: the GPU check skips cleanly without CUDA."""
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU check would really run")
def test_gpu_check_says_no_cuda_and_exits_0(tmp_path):
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no CUDA device" in run.stdout
    assert not (tmp_path / "out" / "gpu_table.md").exists()
