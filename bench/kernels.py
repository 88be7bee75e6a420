"""Kernel microbenchmarks: each provider is checked against the reference, then timed.

The check is the tests' parity measure (``fusedgpt.kernels.parity``): output and every input
gradient against the reference in float64, within twice the error of the reference run in
the benchmark's dtype plus a small tolerance. A provider that fails it is reported, not timed.

    python -m bench.kernels --op all --dtype bf16 --shapes gpt2 --mode fwd+bwd   # on a GPU
    python -m bench.kernels --smoke                                            # CPU, harness only

Throughput is reported as GB/s for memory-bound ops (byte model in each op's ``work``) and
TFLOP/s for matmul-bound ones, each also as a percentage of the detected GPU's peak
(``fusedgpt.hardware.GPU_PEAKS``). Results go to ``bench/results/<gpu>-<date>/kernels.{csv,md}``
with a PNG per op.
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
from fusedgpt.hardware import gpu_peaks
from fusedgpt.kernels.parity import compare_to_reference

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


# ------------------------------------------------------------------------ cross-entropy


class Unavailable(Exception):
    """A provider that is not installed or cannot run here: reported, not a failure."""


def _liger(name: str):
    try:
        module = __import__("liger_kernel.transformers", fromlist=[name])
    except ImportError as exc:
        raise Unavailable("liger-kernel is not installed") from exc
    return getattr(module, name)()


def _cross_entropy_make(shape, dtype, device):
    n, v = shape
    return dict(logits=torch.randn(n, v, device=device, dtype=dtype) * 2, target=torch.randint(0, v, (n,), device=device))


def _cross_entropy_fused(logits, target):
    from fusedgpt.kernels import cross_entropy

    return cross_entropy(logits, target, backend="triton")


def _cross_entropy_eager(logits, target):
    return F.cross_entropy(logits.float(), target)


def _cross_entropy_liger(logits, target):
    return _liger("LigerCrossEntropyLoss")(logits, target)


def _cross_entropy_work(shape, dtype, mode):
    # Forward reads the logits once; backward reads them again and writes their gradient.
    n, v = shape
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    return passes * n * v * torch.finfo(dtype).bits / 8 / 1e9, "GB"


def _cross_entropy_reference(logits, target):
    from fusedgpt.kernels import reference

    return reference.cross_entropy(logits, target)


CROSS_ENTROPY = OpBench(
    shapes={
        "smoke": [(7, 41), (5, 300)],
        "gpt2": [(8 * 1024, 50257)],
        "sweep": [(8 * 1024, v) for v in (8192, 32768, 50257, 128256)],
    },
    make=_cross_entropy_make,
    providers={"fusedgpt": _cross_entropy_fused, "eager": _cross_entropy_eager, "compile": _cross_entropy_eager,
               "liger": _cross_entropy_liger},
    reference=_cross_entropy_reference,
    work=_cross_entropy_work,
)


def _linear_ce_make(shape, dtype, device):
    n, c, v = shape
    return dict(hidden=torch.randn(n, c, device=device, dtype=dtype),
                weight=torch.randn(v, c, device=device, dtype=dtype) / c**0.5,
                target=torch.randint(0, v, (n,), device=device))


def _linear_ce_fused(hidden, weight, target):
    from fusedgpt.kernels import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, target, backend="triton")


def _linear_ce_eager(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight).float(), target)


def _linear_ce_liger(hidden, weight, target):
    return _liger("LigerFusedLinearCrossEntropyLoss")(weight, hidden, target)


def _linear_ce_reference(hidden, weight, target):
    from fusedgpt.kernels import reference

    return reference.linear_cross_entropy(hidden, weight, target)


def _linear_ce_work(shape, dtype, mode):
    # The logits matmul (2NCV) forward; grad_hidden and grad_weight (4NCV) backward.
    n, c, v = shape
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * n * c * v / 1e12, "TFLOP"


LINEAR_CROSS_ENTROPY = OpBench(
    shapes={
        "smoke": [(9, 16, 41)],
        "gpt2": [(8 * 1024, 768, 50257)],
        "sweep": [(n, c, 50257) for n, c in ((4096, 768), (8192, 768), (8192, 1600), (16384, 2048))],
    },
    make=_linear_ce_make,
    providers={"fusedgpt": _linear_ce_fused, "eager": _linear_ce_eager, "compile": _linear_ce_eager,
               "liger": _linear_ce_liger},
    reference=_linear_ce_reference,
    work=_linear_ce_work,
)


# ------------------------------------------------------------------------ attention


def _attention_make(shape, dtype, device):
    b, h, t, d = shape
    return {name: torch.randn(b, h, t, d, device=device, dtype=dtype) for name in ("q", "k", "v")}


def _attention_fused(q, k, v):
    from fusedgpt.kernels import flash_attention

    return flash_attention(q, k, v, causal=True, backend="triton")


def _attention_fused_with(backward: str) -> Callable:
    """fusedgpt's attention with its ``backward`` ("fused", "recompute") rather than the one
    the launcher would choose, through the environment the harness sets for the provider."""
    from fusedgpt.kernels.attention import BACKWARD_ENV

    def run(q, k, v):
        return _attention_fused(q, k, v)

    run.environment = {BACKWARD_ENV: backward}
    return run


def _attention_eager(q, k, v):
    # The textbook way: the T x T probabilities are materialised.
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _sdpa(backend_name: str):
    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        try:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        except RuntimeError as exc:
            if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                raise Unavailable(f"SDPA {backend_name} cannot run these inputs here") from exc
            raise
    return run


def _attention_flash_attn(q, k, v):
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise Unavailable("flash-attn is not installed") from exc
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


def _attention_reference(q, k, v):
    from fusedgpt.kernels import reference

    return reference.attention(q, k, v, causal=True)


def _attention_work(shape, dtype, mode):
    # FlashAttention's count: 4 B H T^2 D forward, halved when causal; backward 2.5x.
    b, h, t, d = shape
    forward = 4 * b * h * t * t * d / 2
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * forward / 1e12, "TFLOP"


ATTENTION = OpBench(
    shapes={
        "smoke": [(1, 2, 17, 16), (2, 1, 33, 64)],
        "gpt2": [(8, 12, 1024, 64)],
        # 16k tokens per batch, as in the FlashAttention-2 paper, head dims 64 and 128.
        "sweep": [(16384 // t, 2048 // d, t, d) for d in (64, 128) for t in (512, 1024, 2048, 4096, 8192, 16384)],
    },
    make=_attention_make,
    providers={
        "fusedgpt": _attention_fused,  # its default backward: the fused one
        "fusedgpt-recompute-bwd": _attention_fused_with("recompute"), "eager": _attention_eager,
        "compile": _attention_eager,
        "sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
        "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"), "sdpa-math": _sdpa("MATH"), "flash-attn": _attention_flash_attn,
    },
    reference=_attention_reference,
    work=_attention_work,
)

OPS: dict[str, OpBench] = {
    "layernorm": LAYERNORM, "cross_entropy": CROSS_ENTROPY, "linear_cross_entropy": LINEAR_CROSS_ENTROPY,
    "attention": ATTENTION,
}


# ------------------------------------------------------------------------------ harness

def _leaves(inputs: Inputs) -> Inputs:
    return {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}


def _provider_fn(name: str, forward: Callable) -> Callable:
    return torch.compile(forward) if name == "compile" else forward


def check_against_reference(op: OpBench, forward: Callable, inputs: Inputs, mode: str) -> float:
    """The provider's worst error as a fraction of what the parity measure allows, over its
    output and (unless ``mode`` is fwd) every input gradient; raises when any is out of
    bounds (above 1)."""
    comparisons = compare_to_reference(forward, op.reference, inputs, backward=mode != "fwd")
    failed = [str(c) for c in comparisons if not c.ok]
    if failed:
        raise AssertionError("; ".join(failed))
    return max(c.error / c.allowed if c.allowed else 0.0 for c in comparisons)


def _timed_callable(forward: Callable, inputs: Inputs, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: forward(**inputs)
    out = forward(**inputs)
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: forward(**inputs).backward(grad)


def _restore_environment(environment: dict) -> None:
    os.environ.clear()
    os.environ.update(environment)


def run_op(name: str, op: OpBench, shapes: str, dtype: torch.dtype, mode: str, device: torch.device,
           smoke: bool) -> list[dict]:
    rows = []
    peaks = gpu_peaks(device)
    environment = dict(os.environ)
    for shape in op.shapes[shapes]:
        inputs = _leaves(op.make(shape, dtype, device))
        amount, unit = op.work(shape, dtype, mode)
        for provider, forward in op.providers.items():
            # A provider may name variables to run under (``forward.environment``): set for
            # its check and timing, forward and backward, and taken back after.
            _restore_environment({**environment, **getattr(forward, "environment", {})})
            forward = _provider_fn(provider, forward)
            row = dict(op=name, provider=provider, shape="x".join(map(str, shape)), dtype=str(dtype)[6:], mode=mode)
            try:
                row["error_vs_allowed"] = check_against_reference(op, forward, inputs, mode)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                median, p20, p80 = common.time_ms(_timed_callable(forward, inputs, mode), device, smoke)
            except Unavailable as exc:
                row["status"] = f"unavailable: {exc}"
                rows.append(row)
                continue
            except Exception as exc:  # a provider that fails or is wrong is reported, not timed
                row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                continue
            throughput = amount / (median / 1e3)
            row.update(status="ok", ms=median, ms_p20=p20, ms_p80=p80, throughput=throughput,
                       unit=f"{unit}/s")
            if peaks:
                peak = peaks.bf16_tflops if unit == "TFLOP" else peaks.memory_gbps
                row["pct_of_peak"] = 100 * throughput / peak
            if device.type == "cuda":
                row["peak_mem_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
    _restore_environment(environment)
    return rows


COLUMNS = ["op", "provider", "shape", "dtype", "mode", "status", "error_vs_allowed", "ms", "ms_p20", "ms_p80",
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

    if args.smoke and common.needs_interpreter_restart():
        common.restart_under_interpreter("bench.kernels", argv or sys.argv[1:])
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
    failed = [r for r in rows if r["status"].startswith("failed")]
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
