"""Kernel microbenchmarks: each provider is checked against the reference, then timed.

    python -m bench.kernels --op all --dtype bf16 --shapes gpt2 --mode fwd+bwd   # on a GPU
    python -m bench.kernels --smoke                                            # CPU, harness only

Throughput is reported as GB/s for memory-bound ops (byte model in each op's ``work``) and
TFLOP/s for matmul-bound ones, each also as a percentage of the detected GPU's peak
(``bench.common.GPU_PEAKS``). Results go to ``bench/results/<gpu>-<date>/kernels.{csv,md}``
with a PNG per op when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import common

Inputs = dict


@dataclasses.dataclass
class OpBench:
    """How to benchmark one op.

    ``make(shape, dtype, device)`` builds inputs (floating ones become leaves that require
    grad); ``providers`` map a name to ``forward(**inputs) -> Tensor``; ``work(shape, dtype,
    mode)`` gives ``(amount, unit)`` with unit "GB" or "TFLOP".
    """

    shapes: dict
    make: Callable[..., Inputs]
    providers: dict
    reference: Callable[..., torch.Tensor]
    work: Callable[..., tuple[float, str]]


# ------------------------------------------------------------------------------ LayerNorm


def _layernorm_make(shape, dtype, device):
    m, n = shape
    return dict(
        x=torch.randn(m, n, device=device, dtype=dtype),
        weight=torch.randn(n, device=device),
        bias=torch.randn(n, device=device),
    )


def _layernorm_eager(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype))


def _layernorm_work(shape, dtype, mode):
    # Bytes that must cross HBM: forward reads x, writes y; backward reads x and dy, writes
    # dx (weights and the 2 fp32 statistics per row are negligible at these sizes).
    m, n = shape
    tensors = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode]
    return tensors * m * n * torch.finfo(dtype).bits / 8 / 1e9, "GB"


def _layernorm_fused(x, weight, bias):
    from fusedgpt.kernels import layer_norm

    return layer_norm(x, weight, bias, backend="triton")


LAYERNORM = OpBench(
    shapes={
        "smoke": [(16, 768), (7, 129)],
        "gpt2": [(8 * 1024, 768)],
        "sweep": [(4096, n) for n in (768, 1024, 1600, 2048, 4096, 8192, 16384)],
    },
    make=_layernorm_make,
    providers={"fusedgpt": _layernorm_fused, "eager": _layernorm_eager, "compile": _layernorm_eager},
    reference=_layernorm_eager,
    work=_layernorm_work,
)

OPS: dict[str, OpBench] = {"layernorm": LAYERNORM}


# ------------------------------------------------------------------------------ harness

TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _leaves(inputs: Inputs) -> Inputs:
    return {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}


def _provider_fn(name: str, forward: Callable) -> Callable:
    return torch.compile(forward) if name == "compile" else forward


def _output_and_grads(forward: Callable, inputs: Inputs, grad_seed: int, with_grads: bool) -> list:
    out = forward(**inputs)
    if not with_grads:
        return [out.detach().double()]
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
    leaves = [v for v in inputs.values() if v.is_floating_point()]
    grads = torch.autograd.grad(out, leaves, grad)
    return [out.detach().double()] + [g.double() for g in grads]


def check_against_reference(op: OpBench, forward: Callable, inputs: Inputs, mode: str) -> float:
    """Largest error of the provider's output (and, unless ``mode`` is fwd, of every input
    gradient) against the float64 reference, relative to the reference's scale; raises
    above the dtype's tolerance."""
    with_grads = mode != "fwd"
    actual = _output_and_grads(forward, inputs, 0, with_grads)
    as_double = {k: (v.detach().double().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    expected = _output_and_grads(op.reference, as_double, 0, with_grads)
    error = max(
        ((a - e).abs().max() / e.abs().max().clamp(min=1.0)).item() if e.numel() else 0.0
        for a, e in zip(actual, expected)
    )
    dtype = next(v.dtype for v in inputs.values() if v.is_floating_point())
    if not error <= TOLERANCE[dtype]:
        raise AssertionError(f"relative error {error:.3e} above {TOLERANCE[dtype]:.0e}")
    return error


def _timed_callable(forward: Callable, inputs: Inputs, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: forward(**inputs)
    out = forward(**inputs)
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: forward(**inputs).backward(grad)


def run_op(name: str, op: OpBench, shapes: str, dtype: torch.dtype, mode: str, device: torch.device,
           smoke: bool) -> list[dict]:
    rows = []
    peaks = common.gpu_peaks(device)
    for shape in op.shapes[shapes]:
        inputs = _leaves(op.make(shape, dtype, device))
        amount, unit = op.work(shape, dtype, mode)
        for provider, forward in op.providers.items():
            forward = _provider_fn(provider, forward)
            row = dict(op=name, provider=provider, shape="x".join(map(str, shape)), dtype=str(dtype)[6:], mode=mode)
            try:
                row["rel_error"] = check_against_reference(op, forward, inputs, mode)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                median, p20, p80 = common.time_ms(_timed_callable(forward, inputs, mode), device, smoke)
            except Exception as exc:  # a provider that fails or is wrong is reported, not timed
                row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                continue
            throughput = amount / (median / 1e3)
            row.update(status="ok", ms=median, ms_p20=p20, ms_p80=p80, throughput=throughput,
                       unit=f"{unit}/s")
            if peaks:
                peak = peaks[0] if unit == "TFLOP" else peaks[1]
                row["pct_of_peak"] = 100 * throughput / peak
            if device.type == "cuda":
                row["peak_mem_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
    return rows


COLUMNS = ["op", "provider", "shape", "dtype", "mode", "status", "rel_error", "ms", "ms_p20", "ms_p80",
           "throughput", "unit", "pct_of_peak", "peak_mem_MiB"]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="all", help=f"one of {sorted(OPS)} or all")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--shapes", default="gpt2", choices=["gpt2", "sweep"])
    parser.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes: checks the harness")
    parser.add_argument("--out", default=None, help="results directory (default bench/results/<gpu>-<date>)")
    args = parser.parse_args(argv)

    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        # The kernels must be built as interpreted functions, so Triton is imported afresh.
        os.environ["TRITON_INTERPRET"] = "1"
        return os.execv(sys.executable, [sys.executable, "-m", "bench.kernels", *(argv or sys.argv[1:])])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: GPU benchmarks need one (use --smoke to check the harness on CPU)")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.smoke and dtype == torch.bfloat16:
        dtype = torch.float32  # the interpreter cannot run bf16
    names = sorted(OPS) if args.op == "all" else [args.op]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {sorted(OPS)}")

    rows = []
    for name in names:
        rows += run_op(name, OPS[name], "smoke" if args.smoke else args.shapes, dtype, args.mode, device, args.smoke)
    table = common.markdown_table(rows, COLUMNS)
    header = " ".join(f"{k}={v}" for k, v in common.versions().items())
    print(f"device={common.device_label(device)} {header}\n")
    print(table)
    if args.smoke:
        print("\n" + common.CPU_WARNING)
    failed = [r for r in rows if r.get("status") != "ok"]
    if args.smoke:
        return 1 if failed else 0
    out = args.out or common.results_dir(device)
    common.write_csv(os.path.join(out, "kernels.csv"), rows, COLUMNS)
    with open(os.path.join(out, "kernels.md"), "w") as handle:
        handle.write(f"device={common.device_label(device)} {header}\n\n{table}\n")
    for name in names:
        ok = [r for r in rows if r["op"] == name and r.get("status") == "ok"]
        common.bar_chart(os.path.join(out, f"{name}.png"), [f"{r['provider']} {r['shape']}" for r in ok],
                         [r["throughput"] for r in ok], f"{name} {args.dtype} {args.mode}",
                         ok[0]["unit"] if ok else "")
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
