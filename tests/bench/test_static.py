"""bench.static: fusedgpt's LayerNorm compiled beside Liger-Kernel's at the gpt2 width, on
one architecture (the full comparison runs outside CI)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def layernorm_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.static", "--peers", "liger-kernel", "--op", "layernorm", "--arch", "sm_90",
         "--dtype", "bf16", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_layernorm_is_compared_with_liger(layernorm_rows):
    built = [r for r in layernorm_rows if "error" not in r]
    impls = {(r["impl"], r["pass"]) for r in built}
    assert {("fusedgpt", "fwd"), ("fusedgpt", "bwd"), ("liger-kernel", "fwd"), ("liger-kernel", "bwd")} <= impls
    for row in built:
        for key in ("op", "pass", "impl", "kernel", "dtype", "arch", "workload", "config", "registers",
                    "spill_bytes", "unit", "insts_per_unit", "mufu_per_unit", "mma_redundancy", "load_widths",
                    "tma", "bytes_per_unit", "min_bytes_per_unit", "model_cycles_per_unit"):
            assert key in row, key
        assert row["workload"] == "gpt2" and row["arch"] == "sm_90" and row["unit"] == "element"
        # Both read bf16 rows of 768 eight elements at a time and do about one instruction
        # per element; the model can only be positive.
        assert row["load_widths"].get("LDG.128", 0) > 0, row
        assert 0.2 < row["insts_per_unit"] < 5 and row["model_cycles_per_unit"] > 0, row


def test_markdown_puts_fusedgpt_beside_the_best_peer():
    from bench import static

    assert static.markdown(static.per_pass([]), [], "# t").startswith("# t")
    base = dict(op="layernorm", arch="sm_90", dtype="bfloat16", kernel="k", config={}, num_warps=4, num_stages=3,
                registers=32, spill_bytes=0, unit="element", insts_per_unit=1.0, masked_insts_per_unit=None,
                mufu_per_unit=0.0, exp_ftz=None, load_widths={"LDG.128": 2}, tma=0, bytes_per_unit=4.0,
                min_bytes_per_unit=4.0, mma_redundancy=None, workload="gpt2")
    rows = [dict(base, impl="fusedgpt", model_cycles_per_unit=0.3, **{"pass": "fwd"}),
            dict(base, impl="liger-kernel", model_cycles_per_unit=0.4, **{"pass": "fwd"}),
            dict(base, impl="other", model_cycles_per_unit=0.2, **{"pass": "fwd"})]
    lines = {line["impl"]: line for line in static.per_pass(rows)}
    assert lines["fusedgpt"]["ratio_to_best_peer"] == 1.5  # against the best peer, not the first
    failures = [dict(op="attention", impl="flash-attn-triton", dtype="bfloat16", error="ImportError: x")]
    assert "flash-attn-triton / attention (bfloat16): ImportError: x" in static.markdown([], failures, "# t")
