"""The ahead-of-time compile report: real PTX/cubin builds for sm_80 and sm_90 of the
launches a workload makes, read for health and for cost."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fusedgpt.kernels import compile_report as report

ALL_DTYPES = {"float32", "float16", "bfloat16"}
ARCHS = {"sm_80", "sm_90"}


def run_report(op: str, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fusedgpt", "kernels", "inspect", "--op", op, "--json", *extra],
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


def test_layernorm_report_covers_every_launch_dtype_and_arch(layernorm_rows):
    expected = {(kernel, flag, dtype, arch)
                for kernel in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel") for flag in (False, True)
                for dtype in ALL_DTYPES for arch in ARCHS}
    seen = {(r["kernel"], r["config"].get("HAS_RESIDUAL", r["config"].get("HAS_DSUM")), r["dtype"], r["arch"])
            for r in layernorm_rows}
    assert seen == expected and len(layernorm_rows) == len(expected)
    for key in ("op", "pass", "impl", "kernel", "dtype", "arch", "workload", "config", "registers", "spill_bytes",
                "shared_bytes", "shared_limit", "hmma", "hgmma", "unit", "insts_per_unit", "mufu_per_unit",
                "load_widths", "bytes_per_unit", "min_bytes_per_unit", "model_cycles_per_unit"):
        assert all(key in r for r in layernorm_rows), key


def test_layernorm_report_is_healthy(layernorm_rows):
    assert report.problems(layernorm_rows) == []
    for row in layernorm_rows:
        assert 0 < row["registers"] <= 255
        assert row["spill_bytes"] == 0
        assert row["shared_bytes"] <= row["shared_limit"] == report.ARCHS[row["arch"]]["shared_limit"]
        assert 0 < row["occupancy"] <= 1


def test_layernorm_at_gpt2_width_is_built_as_the_jit_builds_it(layernorm_rows):
    # N = 768 and the row strides are multiples of 16: the JIT marks them so, and the rows
    # of bf16 are then read 8 elements (128 bits) at a time, never 16 bits at a time (the
    # 32-bit loads are the backward's per-row fp32 mean and rstd).
    for row in layernorm_rows:
        if row["dtype"] == "bfloat16":
            assert "N" in row["divisible_16"] and "stride_x" in row["divisible_16"], row["divisible_16"]
            assert row["load_widths"].get("LDG.128", 0) > 0, row["load_widths"]
            assert "LDG.16" not in row["load_widths"] and row["load_widths"].get("LDG.32", 0) <= 2, row["load_widths"]
            assert row["unit"] == "element" and 0 < row["insts_per_unit"] < 20


def test_attention_lists_the_dropout_off_builds_that_training_runs():
    attention = importlib.import_module("fusedgpt.kernels.attention")
    variants = attention.aot_variants(torch.bfloat16, report.WORKLOADS["gpt2"])
    seen = {(v.pass_, v.kernel.__name__, v.config.get("HAS_DROPOUT")) for v in variants}
    for pass_, kernel in (("fwd", "_attn_fwd_kernel"), ("bwd-fused", "_attn_bwd_dkdv_kernel"),
                          ("bwd-recompute", "_attn_bwd_dkdv_kernel"), ("bwd-recompute", "_attn_bwd_dq_kernel")):
        assert {(pass_, kernel, False), (pass_, kernel, True)} <= seen, (pass_, kernel)
    # The layout of the model: q, k, v split from one (B, T, 3C) projection.
    fwd = next(v for v in variants if v.pass_ == "fwd")
    assert fwd.args["stride_qt"] == 3 * 768 and fwd.args["Tq"] == 1024 and fwd.args["D"] == 64


LLAMA_COMPILE_CHECK = """
import importlib, json, torch
from fusedgpt.kernels import compile_report as report
attention = importlib.import_module("fusedgpt.kernels.attention")
variant = next(v for v in attention.aot_variants(torch.bfloat16, report.WORKLOADS["llama3.2-1b"])
               if v.kernel.__name__ == "_attn_fwd_kernel" and v.config["BLOCK_M"] == 64
               and all(v.config[flag] for flag in FLAGS) and not v.config["HAS_DROPOUT"])
print(json.dumps(report.compile_variant(variant, "sm_90")))
"""


def test_llama_workload_lists_grouped_query_window_softcap_and_packed_builds():
    attention = importlib.import_module("fusedgpt.kernels.attention")
    llama = report.workload("llama3.2-1b")
    variants = attention.aot_variants(torch.bfloat16, llama)
    main = [v for v in variants if "BLOCK_N" in v.config]
    flags = ("WINDOWED", "SOFTCAP", "VARLEN")
    # Every main kernel, dropout off and on, plain and with each feature alone and all at once,
    # and every build grouped-query: 32 query heads read 8 key/value heads.
    combos = [(False,) * 3, (True, False, False), (False, True, False), (False, False, True), (True,) * 3]
    expected = {(kernel, dropout, combo) for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
                for dropout in (False, True) for combo in combos}
    assert {(v.kernel.__name__, v.config["HAS_DROPOUT"], tuple(v.config[f] for f in flags)) for v in main} == expected
    assert all(v.args["kv_group"] == 4 and v.args["H"] == 32 and v.args["D"] == 64 for v in main)
    dense = next(v for v in main if v.kernel.__name__ == "_attn_fwd_kernel" and not v.config["VARLEN"])
    packed = next(v for v in main if v.kernel.__name__ == "_attn_fwd_kernel" and v.config["VARLEN"])
    # q, k, v split from one (B, T, (32 + 2 x 8) x 64) projection; packed: the 4 sequences of
    # 2048 tokens in one row, offsets in cu_seqlens, blocks sized for the 2048-token longest.
    assert dense.args["stride_qt"] == dense.args["stride_kt"] == 48 * 64 and dense.args["Tq"] == 2048
    assert packed.args["Tq"] == 4 * 2048 and tuple(packed.args["CU_SEQLENS_Q"].shape) == (5,)
    assert packed.args["q_bucket"] == 2048
    # One build compiled: the small forward with every feature on, on sm_90, where it is
    # still built on wgmma (in a child process: the compile needs the real JIT kernels, not
    # the interpreter's).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = LLAMA_COMPILE_CHECK.replace("FLAGS", repr(flags))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout)
    assert report.problems([row]) == [], row
    assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255 and row["hgmma"] > 0


SPECIALISATION_CHECK = """
import importlib, json, torch
from fusedgpt.kernels import compile_report as report
layernorm = importlib.import_module("fusedgpt.kernels.layernorm")
variant = layernorm.aot_variants(torch.float16, report.WORKLOADS["gpt2"])[0]
x = report.meta_tensor(10, 8, dtype=torch.float16)[:, 4:]  # 8 bytes into its allocation
args = dict(variant.args, X=x, stride_x=8, stride_y=1, N=100)
fn, signature, constexprs, attrs, _ = report.specialise(report.KernelVariant(**{**variant.__dict__, "args": args}), "sm_90")
names = list(signature)
marked = sorted(names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr)
print(json.dumps(dict(marked=marked, signature=signature, constant=constexprs.get((names.index("stride_y"),)))))
"""


def test_specialisation_follows_the_jit_rules():
    # Ints divisible by 16 and 16-byte aligned pointers are marked, ints equal to 1 become
    # constants; a pointer 8 bytes into its allocation and N = 100 are not marked. (In a
    # child process: the binder needs the real JIT kernels, not the interpreter's.)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SPECIALISATION_CHECK], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert "Y" in found["marked"] and "stride_r" in found["marked"]
    assert not {"X", "stride_x", "N"} & set(found["marked"])
    assert found["signature"]["stride_y"] == "constexpr" and found["constant"] == 1
    assert found["signature"]["X"] == "*fp16" and found["signature"]["eps"] == "fp32"


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FSETP.GEU.AND P0, PT, R4, -126, PT ;
        /*0030*/                   MUFU.EX2 R5, R4 ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0060*/                   LDG.E.U16 R6, desc[UR4][R2.64] ;
        /*0070*/               @P1 BRA 0x10 ;
        /*0080*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0090*/                   MUFU.EX2 R7, R6 ;
        /*00a0*/              @!P2 BRA 0x90 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_reading():
    instructions = report.parse_sass(SASS)
    assert instructions[1] == (0x10, "LDG.E.128", "R4, desc[UR4][R2.64]")
    assert report.loops(instructions) == [(0x10, 0x70), (0x90, 0xA0)]  # the self-branch is padding
    found = report.sass_cost(SASS)
    first, second = found["loops"]
    assert first["insts"] == 7 and second["insts"] == 2 and found["outside"]["insts"] == 3
    assert first["memory"] == {"LDG.128": 1, "LDG.16": 1} and first["memory_bytes"] == (128 + 16) * 32 / 8
    assert first["exp_fixups"] == 1 and second["exp_fixups"] == 0
    assert first["mma_flops"] == 2 * 16 * 8 * 16 + 2 * 64 * 64 * 16 / 4
    work = report.Work("thing", per_iteration=64, min_bytes=1.0, mma_flops=100.0, loops="alternatives")
    cost = report.cost_columns(SASS, work, num_warps=4, arch="sm_90")
    assert cost["insts_per_unit"] == pytest.approx(2 * 4 / 64, abs=1e-3)
    assert cost["masked_insts_per_unit"] == pytest.approx(7 * 4 / 64, abs=1e-3)
    assert cost["exp_ftz"] is True and cost["mufu_per_unit"] == pytest.approx(4 / 64, abs=1e-3)
    sequence = report.cost_columns(SASS, report.Work("thing", 64, 1.0, loops="sequence"), 4, "sm_80")
    assert sequence["insts_per_unit"] == pytest.approx(9 * 4 / 64, abs=1e-3) and sequence["exp_ftz"] is False


def test_atomics_are_memory_instructions_on_both_architectures():
    # sm_80 writes a reduction without a return value as RED, sm_90 as REDG.
    sass = """
        /*0000*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;
        /*0010*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR8][R2.64], R5 ;
        /*0020*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR24][R138.64], R104 ;
        /*0030*/                   ATOMG.E.ADD.STRONG.GPU PT, R0, desc[UR8][R4.64], R7 ;
        /*0040*/                   EXIT ;
"""
    section = report.read_section(report.parse_sass(sass))
    assert section["memory"] == {"RED.32": 1, "REDG.32": 1, "REDG.128": 1, "ATOMG.32": 1}
    assert section["memory_bytes"] == (3 * 32 + 128) * 32 / 8


def test_loops_on_different_tiles_are_normalised_each_by_its_own():
    # Two loops: a masked one doing 32 units per iteration, a main one doing 64.
    work = report.Work("thing", per_iteration=(32, 64), min_bytes=1.0, loops=("masked", "main"))
    cost = report.cost_columns(SASS, work, num_warps=4, arch="sm_90")
    assert cost["insts_per_unit"] == pytest.approx(2 * 4 / 64, abs=1e-3)
    assert cost["masked_insts_per_unit"] == pytest.approx(7 * 4 / 32, abs=1e-3)
    with pytest.raises(ValueError, match="2 innermost loops, its Work describes 3"):
        report.cost_columns(SASS, report.Work("thing", (1, 1, 1), 1.0, loops=("main",) * 3), 4, "sm_90")


def test_model_takes_the_slowest_resource():
    model = report.model_cycles(dict(insts=40.0, mufu=1.0, bytes=0.0, mma_flops=0.0, mma_time=0.0), 0.0, "sm_90")
    assert model["bound"] == "issue" and model["cycles"] == 10.0
    model = report.model_cycles(dict(insts=4.0, mufu=0.0, bytes=0.0, mma_flops=0.0, mma_time=0.0), 139.0, "sm_90")
    assert model["bound"] == "hbm" and model["cycles"] == pytest.approx(10.0)
    model = report.model_cycles(dict(insts=4.0, mufu=0.0, bytes=474.0, mma_flops=0.0, mma_time=0.0), 0.0, "sm_90")
    assert model["bound"] == "l2" and model["cycles"] == pytest.approx(10.0)
    # TF32 matmuls take twice as long per flop as bf16 ones
    model = report.model_cycles(dict(insts=0.0, mufu=0.0, bytes=0.0, mma_flops=4096.0, mma_time=8192.0), 0.0, "sm_90")
    assert model["bound"] == "tensor" and model["cycles"] == 2.0


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


def test_unknown_arch_and_workload_are_errors():
    with pytest.raises(ValueError, match="unknown architecture"):
        report.report(["sm_70"])
    with pytest.raises(ValueError, match="unknown workload"):
        report.workload("gpt5")
