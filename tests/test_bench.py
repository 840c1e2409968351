"""The benchmark scripts run: the GPU check skips cleanly without CUDA, the pipeline benchmark in both modes."""
import subprocess
import sys
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


def test_pipeline_speed_runs_a_random_model_in_both_modes_and_reports_memory():
    """The command behind README's fast-mode memory figures, on a test-sized preset (seconds)."""
    for dtype in ("float32", "bfloat16"):
        run = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline_speed.py"), "--random-deris", "deris-tiny", "--no-gate",
                              "--dtype", dtype, "--repeats", "1", "--threads", "1"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert run.returncode == 0, run.stderr
        assert f"deris-tiny + no gate on cpu, {dtype}" in run.stdout and "one pair: median" in run.stdout
        assert "RssAnon" in run.stdout
