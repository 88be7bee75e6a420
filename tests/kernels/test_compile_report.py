"""The ahead-of-time compile report: real PTX/cubin builds for sm_80 and sm_90."""

import json
import os
import subprocess
import sys

import pytest

from fusedgpt.kernels import compile_report as report

ALL_DTYPES = {"float32", "float16", "bfloat16"}
ARCHS = {"sm_80", "sm_90"}


def run_report(op: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fusedgpt", "kernels", "inspect", "--op", op, "--json"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if result.returncode != 0:
        # Unhealthy rows (exit 1 with a full report) or a crash (no report; stderr says why).
        try:
            found = report.problems(json.loads(result.stdout))
        except json.JSONDecodeError:
            found = "no JSON report on stdout"
        pytest.fail(f"report exit {result.returncode}: {found}\nstderr:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def test_run_report_shows_why_the_command_failed(monkeypatch):
    crash = subprocess.CompletedProcess([], 2, stdout="", stderr="Traceback ...\nImportError: no ptxas")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: crash)
    with pytest.raises(pytest.fail.Exception, match="(?s)report exit 2: no JSON report.*ImportError: no ptxas"):
        run_report("layernorm")


@pytest.fixture(scope="module")
def layernorm_rows():
    return run_report("layernorm")


def test_layernorm_report_covers_every_config_dtype_and_arch(layernorm_rows):
    from fusedgpt.kernels.layernorm import launch_configs

    expected = {(kernel, dtype, arch, block_n, one_block)
                for kernel in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")
                for dtype in ALL_DTYPES for arch in ARCHS
                for block_n, _, one_block in launch_configs()}
    seen = {(r["kernel"], r["dtype"], r["arch"], r["config"]["BLOCK_N"], r["config"]["ONE_BLOCK"])
            for r in layernorm_rows}
    assert seen == expected
    for key in ("op", "kernel", "dtype", "arch", "config", "registers", "spill_bytes",
                "shared_bytes", "shared_limit", "hmma", "hgmma"):
        assert all(key in r for r in layernorm_rows), key


def test_layernorm_report_is_healthy(layernorm_rows):
    assert report.problems(layernorm_rows) == []
    for row in layernorm_rows:
        assert 0 < row["registers"] <= 255
        assert row["spill_bytes"] == 0
        assert row["shared_bytes"] <= row["shared_limit"] == report.ARCHS[row["arch"]]["shared_limit"]
        assert 0 < row["occupancy"] <= 1


def test_problems_flags_spills_overflow_and_errors():
    base = dict(op="x", kernel="k", dtype="float16", arch="sm_80", config={}, spill_bytes=0,
                shared_bytes=100, shared_limit=166912)
    assert report.problems([base]) == []
    assert "spills 8 bytes" in report.problems([{**base, "spill_bytes": 8}])[0]
    assert "shared memory" in report.problems([{**base, "shared_bytes": 200000}])[0]
    assert "does not compile" in report.problems([{**base, "error": "OutOfResources"}])[0]


def test_occupancy_model():
    # 32 regs x 4 warps: registers allow 16 blocks, warps allow 16 -> full occupancy
    assert report.occupancy(32, 0, 4, 233472) == 1.0
    # 255 regs -> 8192 regs/warp -> 8 warps resident of 64
    assert report.occupancy(255, 0, 1, 233472) == 8 / 64
    # shared memory limits to 2 blocks of 8 warps
    assert report.occupancy(32, 100000, 8, 233472) == 16 / 64


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="unknown architecture"):
        report.report(["sm_70"])
