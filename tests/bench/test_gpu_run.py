"""bench.gpu_run: the one command for GPU time; here, without a GPU, its dry run."""

import subprocess
import sys

import pytest
import torch

from bench import gpu_run


def test_dry_run_lists_the_steps_in_priority_order_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--dry-run", "--budget-s", "480"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "within 480 s" in lines[0]
    assert [line.split(".")[0].strip() for line in lines[1:]] == ["1", "2", "3"]
    assert "-m gpu" in lines[1] and "bench.kernels" in lines[2] and "bench.train" in lines[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_without_cuda_it_says_so_and_fails():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--budget-s", "10"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_steps_stop_at_the_budget(tmp_path):
    # A step that would outlive the budget is stopped; the next has nothing left and is skipped.
    sleep = [("sleeper", ["-c", "import time; time.sleep(30)"], 1.0), ("next", ["-c", "pass"], 1.0)]
    results = gpu_run.run_steps(sleep, budget_s=2.0, min_step_s=1.0, out=str(tmp_path))
    assert results[0]["status"].startswith("stopped at its") and results[0]["seconds"] < 25
    assert results[1]["status"].startswith("skipped")
