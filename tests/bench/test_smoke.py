"""The benchmark harness end to end on CPU (interpreter, tiny shapes): every provider's
result is checked against the reference; timings are not looked at."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_kernel_bench_smoke(mode):
    result = subprocess.run([sys.executable, "-m", "bench.kernels", "--smoke", "--op", "all", "--mode", mode],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NOT GPU figures" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(rows) >= 3, result.stdout
