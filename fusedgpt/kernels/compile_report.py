"""Ahead-of-time compile report: every kernel configuration the dispatcher can launch,
compiled for real GPUs on a machine that has none.

For each op x kernel x dtype x config x architecture this builds PTX and a cubin through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` with the
specialisation the JIT would use (pointers and the strides that are multiples of 16 marked
16-divisible), then reads the cubin with the tools the Triton wheel ships:

- ``cuobjdump -res-usage``: registers per thread, local memory and stack bytes (spills);
- the compiled metadata: shared memory per block, checked against the per-block limit;
- ``cuobjdump -sass``: the number of ``HMMA`` (mma.sync, Ampere and later) and ``HGMMA``
  (wgmma, Hopper) tensor-core instructions.

It cannot see speed, bank conflicts or anything that depends on the data: those need a GPU.
Run it as ``fusedgpt kernels inspect [--arch sm_80,sm_90] [--op NAME] [--json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Optional, Sequence

import torch

from fusedgpt.kernels import backend as _backend

# Modules that register kernels in the report: each defines ``aot_variants(dtype)``.
OP_MODULES: tuple[str, ...] = (
    "fusedgpt.kernels.layernorm", "fusedgpt.kernels.attention", "fusedgpt.kernels.cross_entropy",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Per-block shared-memory opt-in limit and per-SM budgets (CUDA programming guide, compute
# capability tables) that the occupancy estimate uses.
ARCHS = {
    "sm_80": dict(cc=80, shared_limit=166912, shared_per_sm=167936),
    "sm_90": dict(cc=90, shared_limit=232448, shared_per_sm=233472),
}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One launchable specialisation of a ``@triton.jit`` kernel.

    ``signature`` maps every parameter, in order, to a Triton type string ("*fp16", "i32",
    "fp32") or "constexpr"; ``constexprs`` gives the constexpr values; ``aligned`` names the
    parameters the JIT would see as multiples of 16.
    """

    op: str
    kernel: Any
    signature: dict
    constexprs: dict
    aligned: tuple
    num_warps: int
    num_stages: int
    config: dict


def pointer(dtype: torch.dtype) -> str:
    return "*" + TRITON_DTYPE_NAMES[dtype]


def _jit_function(kernel: Any) -> Any:
    """The JITFunction behind a kernel, refusing the interpreter's stand-in."""
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            "the compile report needs real JIT kernels: run it with TRITON_INTERPRET unset "
            "(the `fusedgpt kernels inspect` command does this itself)"
        )
    return kernel


def _tool(name: str) -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: it ships with the Triton wheel under backends/nvidia/bin")
    return found


def _resource_usage(cubin_path: str) -> dict:
    text = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", cubin_path], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key: int(value) for key, value in fields.items()}


def _count_mma(cubin_path: str) -> tuple[int, int]:
    sass = subprocess.run(
        [_tool("cuobjdump"), "-sass", cubin_path], check=True, capture_output=True, text=True
    ).stdout
    return len(re.findall(r"\bHMMA\.", sass)), len(re.findall(r"\bHGMMA\.", sass))


def occupancy(registers: int, shared_bytes: int, num_warps: int, shared_per_sm: int) -> float:
    """Resident warps / max warps per SM, from registers, shared memory and block count
    (registers are allocated per warp in 256-register units)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    by_shared = shared_per_sm // shared_bytes if shared_bytes else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // num_warps
    blocks = min(by_registers, by_shared, by_warps, MAX_BLOCKS_PER_SM)
    return blocks * num_warps / MAX_WARPS_PER_SM


def compile_variant(variant: KernelVariant, arch: str) -> dict:
    """Compile one variant for one architecture and describe the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(variant.kernel)
    names = list(variant.signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in variant.aligned}
    source = ASTSource(fn=fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
    limits = ARCHS[arch]
    row = {
        "op": variant.op,
        "kernel": fn.__name__,
        "dtype": variant.config.get("dtype"),
        "arch": arch,
        "config": {k: v for k, v in variant.config.items() if k != "dtype"},
        "num_warps": variant.num_warps,
        "num_stages": variant.num_stages,
        "shared_limit": limits["shared_limit"],
    }
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", limits["cc"], 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
    except Exception as exc:  # an out-of-resources config is a finding, not a crash
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "kernel.cubin")
        with open(cubin_path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = _resource_usage(cubin_path)
        hmma, hgmma = _count_mma(cubin_path)
    shared = int(compiled.metadata.shared)
    registers = usage.get("REG", 0)
    return {
        **row,
        "registers": registers,
        "spill_bytes": usage.get("LOCAL", 0) + usage.get("STACK", 0),
        "shared_bytes": shared,
        "occupancy": round(occupancy(registers, shared, variant.num_warps, limits["shared_per_sm"]), 3),
        "hmma": hmma,
        "hgmma": hgmma,
    }


def variants(ops: Optional[Sequence[str]] = None, dtypes: Iterable[str] = DTYPES) -> list[KernelVariant]:
    """Every registered kernel variant, optionally only for the ops named."""
    found = []
    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for dtype_name in dtypes:
            for variant in module.aot_variants(DTYPES[dtype_name]):
                if ops is None or variant.op in ops:
                    found.append(variant)
    return found


def _compile_job(job: tuple[int, str, Optional[Sequence[str]]]) -> dict:
    index, arch, ops = job
    return compile_variant(variants(ops)[index], arch)


def report(
    archs: Sequence[str] = ("sm_80", "sm_90"),
    ops: Optional[Sequence[str]] = None,
    workers: Optional[int] = None,
) -> list[dict]:
    """Compile everything in parallel processes and return one row per variant x arch."""
    unknown = [arch for arch in archs if arch not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; known: {sorted(ARCHS)}")
    count = len(variants(ops))
    jobs = [(index, arch, ops) for index in range(count) for arch in archs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(_compile_job, jobs))


def problems(rows: Sequence[dict]) -> list[str]:
    """What makes a row unhealthy: a compile error, spills, or shared memory over the limit."""
    found = []
    for row in rows:
        where = f"{row['op']}/{row['kernel']} {row['dtype']} {row['arch']} {row['config']}"
        if "error" in row:
            found.append(f"{where}: does not compile: {row['error']}")
            continue
        if row["spill_bytes"]:
            found.append(f"{where}: spills {row['spill_bytes']} bytes")
        if row["shared_bytes"] > row["shared_limit"]:
            found.append(f"{where}: needs {row['shared_bytes']} B shared memory, limit {row['shared_limit']}")
    return found


def format_table(rows: Sequence[dict]) -> str:
    header = ["op", "kernel", "dtype", "arch", "config", "warps", "stages", "regs", "spill B",
              "smem B", "smem limit", "occupancy", "HMMA", "HGMMA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        config = " ".join(f"{k}={v}" for k, v in row["config"].items())
        if "error" in row:
            cells = [row["op"], row["kernel"], row["dtype"], row["arch"], config, str(row["num_warps"]),
                     str(row["num_stages"]), "error: " + row["error"]] + [""] * 6
        else:
            cells = [row["op"], row["kernel"], row["dtype"], row["arch"], config, str(row["num_warps"]),
                     str(row["num_stages"]), str(row["registers"]), str(row["spill_bytes"]),
                     str(row["shared_bytes"]), str(row["shared_limit"]), f"{row['occupancy']:.2f}",
                     str(row["hmma"]), str(row["hgmma"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated: sm_80, sm_90")
    parser.add_argument("--op", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")


def run(args: argparse.Namespace) -> int:
    """The `fusedgpt kernels inspect` command. Exit status 1 when a row is unhealthy."""
    if _backend.interpreter_on():
        # The interpreter replaces @triton.jit kernels with Python stand-ins that cannot be
        # compiled; the report runs in a child process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = ["--arch", args.arch] + (["--op", args.op] if args.op else []) + (["--json"] if args.json else [])
        argv += ["--workers", str(args.workers)] if args.workers else []
        return subprocess.call([sys.executable, "-m", "fusedgpt.kernels.compile_report", *argv], env=env)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    ops = [o.strip() for o in args.op.split(",")] if args.op else None
    rows = report(archs, ops, args.workers)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        bad = problems(rows)
        print(f"\n{len(rows)} kernel builds, {len(bad)} problem(s)")
        for line in bad:
            print("  " + line)
    return 1 if problems(rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedgpt kernels inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
