"""Static cost of fusedgpt's kernels beside peer Triton kernels, without a GPU.

    python -m bench.static [--peers [liger-kernel,...]] [--arch sm_80,sm_90] [--workload gpt2] [--dtype bf16] [--json]
    python -m bench.static --peers --out bench/results/static      # the committed table + JSON

Every kernel, fusedgpt's and the peers', is compiled through the one path of
``fusedgpt.kernels.compile_report`` at the same workload shapes: the peers' own launchers
(imported from their installed packages: ``pip install -e ".[peers]"``) are called on
meta tensors and their launches recorded, so each peer kernel gets the block sizes, warps
and flags its launcher would pass. Per op x pass x arch x dtype the table puts fusedgpt's
figures beside each peer's, with fusedgpt's ratio to the best peer in modelled cycles per
unit (below 1: fusedgpt is modelled cheaper). A peer that does not import or build is
listed with the reason. Figures are a model read from SASS, not a measurement.

Each kernel gets the inputs its users pass: fusedgpt's LayerNorm fp32 master weights (as
under autocast), the peers' the activation dtype. Which fusedgpt launch is compared: the
peer's case (LayerNorm without the residual add, attention without dropout, cross-entropy
in each of its modes), and of several autotune configs the one the model rates cheapest;
every build is in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import types
from collections import defaultdict
from typing import Callable, Iterator, Optional, Sequence

import torch

from fusedgpt.kernels import compile_report as cr

# ------------------------------------------------------------------ the peers' launches


def _liger_layernorm(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    from liger_kernel.ops import layer_norm as liger

    m, n = workload.tokens, workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    x = cr.meta_tensor(m, n, dtype=dtype)
    weight, bias = cr.meta_tensor(n, dtype=dtype), cr.meta_tensor(n, dtype=dtype)
    with cr.launches(liger, "_layer_norm_forward_kernel") as forward:
        _, _, mean, rstd, _, _ = liger.layer_norm_forward(x, weight, bias, 1e-5)
    with cr.launches(liger, "_layer_norm_backward_kernel") as backward:
        liger.layer_norm_backward(cr.meta_tensor(m, n, dtype=dtype), x, weight, bias, mean, rstd)
    return [
        cr.jit_variant("layernorm", "fwd", forward[0], impl="liger-kernel", workload=workload, show=("BLOCK_SIZE",),
                       work=cr.Work("element", n, 2 * item + 8 / n)),
        # One program per SM walks rows_per_program rows: one loop iteration per row.
        cr.jit_variant("layernorm", "bwd", backward[0], impl="liger-kernel", workload=workload,
                       show=("BLOCK_SIZE",), work=cr.Work("element", n, 3 * item + 8 / n)),
    ]


def _liger_cross_entropy(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    from liger_kernel.ops import cross_entropy as liger

    from fusedgpt.kernels.linear_cross_entropy import default_chunk_size

    v, item = workload.vocab, torch.empty((), dtype=dtype).element_size()
    rows = default_chunk_size(workload.tokens, v, dtype, use_triton=True)
    logits = cr.meta_tensor(rows, v, dtype=dtype, strides=(workload.logits_row_stride, 1)).requires_grad_()
    target = torch.zeros(rows, dtype=torch.int64)  # its launcher reads the targets on the host
    with cr.launches(liger, "liger_cross_entropy_kernel") as both:
        liger.cross_entropy_forward(logits, target, None, -100, 0.0, 0.0, "mean", None, False)
    # The loss and the gradient in one launch, written over the logits (as fusedgpt's
    # forward+backward mode): read, then written, once each.
    return [cr.jit_variant("cross_entropy", "fwd+bwd", both[0], impl="liger-kernel", workload=workload,
                           show=("BLOCK_SIZE",), work=cr.Work("logit", both[0].args["BLOCK_SIZE"], 2 * item,
                                                              loops="sequence"))]


# flag-gems asks torch about the GPU when it is imported (vendor, device name for its tuning
# cache, capability) and enters ``torch.cuda.device(...)`` around launches; here there is
# none. For its description torch answers as an H100 would (flag-gems 5.0.2 tunes the same
# configs for Ampere and Hopper), and the device context is a no-op on meta tensors.
_STAND_IN_GPU = dict(name="NVIDIA H100 80GB HBM3", capability=(9, 0), multi_processor_count=132)


@contextlib.contextmanager
def _stand_in_gpu() -> Iterator[None]:
    properties = types.SimpleNamespace(name=_STAND_IN_GPU["name"], major=9, minor=0, total_memory=80 << 30,
                                       multi_processor_count=_STAND_IN_GPU["multi_processor_count"])
    answers = dict(
        get_device_name=lambda *args, **kwargs: _STAND_IN_GPU["name"],
        get_device_properties=lambda *args, **kwargs: properties,
        get_device_capability=lambda *args, **kwargs: _STAND_IN_GPU["capability"],
        device_count=lambda: 1, current_device=lambda: 0,
        device=lambda *args, **kwargs: contextlib.nullcontext(),
    )
    saved = {name: getattr(torch.cuda, name) for name in answers}
    vendor = os.environ.get("GEMS_VENDOR")
    os.environ["GEMS_VENDOR"] = "nvidia"
    try:
        for name, answer in answers.items():
            setattr(torch.cuda, name, answer)
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)
        if vendor is None:
            os.environ.pop("GEMS_VENDOR", None)
        else:
            os.environ["GEMS_VENDOR"] = vendor


def _flag_gems_layernorm(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    m, n = workload.tokens, workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    x, dy = cr.meta_tensor(m, n, dtype=dtype), cr.meta_tensor(m, n, dtype=dtype)
    weight, bias = cr.meta_tensor(n, dtype=dtype), cr.meta_tensor(n, dtype=dtype)
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.ops.layernorm")
        with cr.launches(gems, "layer_norm_persistent_kernel", "layer_norm_loop_kernel") as forward:
            _, mean, rstd = gems.layer_norm(x, (n,), weight, bias, 1e-5)
        with cr.launches(gems, "layer_norm_backward_kernel", "weight_bias_backward_kernel") as backward:
            gems.layer_norm_backward(dy, x, (n,), mean, rstd, weight, bias, output_mask=[True, True, True])
    found = []
    for launch in (x for r in forward for x in cr.expand(r)):  # a program per row, no loop
        found.append(cr.jit_variant("layernorm", "fwd", launch, impl="flag-gems", workload=workload,
                                    show=("TILE_N",), work=cr.Work("element", n, 2 * item + 8 / n)))
    for launch in (x for r in backward for x in cr.expand(r)):
        # Each iteration: BLOCK_ROW_SIZE rows x BLOCK_COL_SIZE columns (of which n are real).
        # dX reads dY and X twice (two loops) and writes dX; dW/dB is a second kernel that
        # reads dY and X again, looping over rows.
        rows, cols = launch.args["BLOCK_ROW_SIZE"], min(launch.args["BLOCK_COL_SIZE"], n)
        input_grad = "dX" in launch.args
        found.append(cr.jit_variant(
            "layernorm", "bwd", launch, impl="flag-gems", workload=workload, show=("BLOCK_ROW_SIZE", "BLOCK_COL_SIZE"),
            work=cr.Work("element", rows * cols, (3 if input_grad else 2) * item + 8 / n, loops="sequence")))
    return found


def _flag_gems_cross_entropy(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    from fusedgpt.kernels.linear_cross_entropy import default_chunk_size

    v, item = workload.vocab, torch.empty((), dtype=dtype).element_size()
    rows = default_chunk_size(workload.tokens, v, dtype, use_triton=True)
    logits = cr.meta_tensor(rows, v, dtype=dtype, strides=(workload.logits_row_stride, 1)).requires_grad_()
    target = cr.meta_tensor(rows, dtype=torch.int64)
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.fused.cross_entropy_loss")
        with cr.launches(gems, "celoss_indices_kernel", "sum_and_scale") as forward:
            gems.CrossEntropyLoss.apply(logits, target, None, 1, -100, 0.0)  # reduction 1 = mean
    # Each iteration of its loop over the classes: BLOCK_C classes of BLOCK_D positions
    # (one real position: the logits are (N, C), D = 1). The mean over rows after it is a
    # single small program, left out.
    return [cr.jit_variant("cross_entropy", "fwd", launch, impl="flag-gems", workload=workload,
                           show=("BLOCK_C", "BLOCK_D"), work=cr.Work("logit", launch.args["BLOCK_C"], item))
            for launch in (x for r in forward[:1] for x in cr.expand(r))]


def _flag_gems_cross_entropy_backward(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    """Its backward reads the mean divisor with ``.item()``: on meta tensors this raises, and
    the table says so."""
    v = workload.vocab
    logits = cr.meta_tensor(8, v, dtype=dtype).requires_grad_()
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.fused.cross_entropy_loss")
        with cr.launches(gems, "celoss_indices_kernel", "sum_and_scale", "celoss_indices_bwd"):
            loss = gems.CrossEntropyLoss.apply(logits, cr.meta_tensor(8, dtype=torch.int64), None, 1, -100, 0.0)
            loss.backward()
    return []


def _flag_gems_attention(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    t, d = workload.seq, workload.head_dim
    item = torch.empty((), dtype=dtype).element_size()
    q, k, v = cr.attention_inputs(workload, dtype)
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.ops.attention")
        with cr.launches(gems, "_attn_fwd") as forward:
            gems.scaled_dot_product_attention_forward(q, k, v, is_causal=True)
    per_head = t * (t + 1) / 2 / 1024
    found = []
    for launch in (x for r in forward for x in cr.expand(r)):
        # It autotunes over 45 configs on a GPU; compiled here: those with 3 stages and key
        # blocks of at least 32 (the 16-wide ones are for head dims below 64).
        if launch.options["num_stages"] != 3 or launch.args["BLOCK_N"] < 32:
            continue
        found.append(cr.jit_variant(
            "attention", "fwd", launch, impl="flag-gems", workload=workload, show=("BLOCK_M", "BLOCK_N", "PRE_LOAD_V"),
            work=cr.Work("1K pairs", launch.args["BLOCK_M"] * launch.args["BLOCK_N"] / 1024,
                         (4 * t * d * item + 4 * t) / per_head, 2 * 2 * d * 1024)))
    return found


def _liger_rms_norm(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    from liger_kernel.ops import rms_norm as liger

    m, n = workload.tokens, workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    x, weight = cr.meta_tensor(m, n, dtype=dtype), cr.meta_tensor(n, dtype=dtype)
    kernels = ("_rms_norm_{}_kernel", "_block_rms_norm_{}_kernel")
    with cr.launches(liger, *(k.format("forward") for k in kernels)) as forward:
        _, _, rstd, block, warps, casting = liger.rms_norm_forward(x, weight, 1e-6, 0.0, "llama", None)
    with cr.launches(liger, *(k.format("backward") for k in kernels)) as backward:
        liger.rms_norm_backward(cr.meta_tensor(m, n, dtype=dtype), x, weight, rstd, 0.0, casting, block, warps,
                                True, None)
    # Forward: a program per row, no loop. Backward: one program per SM walks its rows.
    return [cr.jit_variant("rms_norm", pass_, launch, impl="liger-kernel", workload=workload, show=("BLOCK_SIZE",),
                           work=cr.Work("element", n, (2 if pass_ == "fwd" else 3) * item + 4 / n))
            for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0]))]


def _liger_rope(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    from liger_kernel.ops import rope as liger

    b, t, h, d = workload.batch, workload.seq, workload.heads, workload.head_dim
    item = torch.empty((), dtype=dtype).element_size()
    # Its (B, H, T, D) arguments as views of (B, T, H, D) storage, so its contiguous() copies
    # nothing; cos and sin (1, T, D) in the activations' dtype, as Hugging Face models pass.
    q, k = (cr.meta_tensor(b, t, h, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    cos, sin = cr.meta_tensor(1, t, d, dtype=dtype), cr.meta_tensor(1, t, d, dtype=dtype)
    with cr.launches(liger, "_triton_rope") as forward:
        liger.rope_forward(q, k, cos, sin)
    with cr.launches(liger, "_triton_rope") as backward:
        liger.rope_backward(q, k, cos, sin)
    # A program per token rotates all heads of q and k, without a loop; in place.
    return [cr.jit_variant("rotary", pass_, launch, impl="liger-kernel", workload=workload,
                           show=("BLOCK_SIZE", "BACKWARD_PASS"), work=cr.Work("element", 2 * h * d, 2 * item))
            for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0]))]


def _liger_swiglu(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    from liger_kernel.ops import swiglu as liger

    m, f = workload.tokens, 4 * workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    gate, up = cr.meta_tensor(m, f, dtype=dtype), cr.meta_tensor(m, f, dtype=dtype)
    with cr.launches(liger, "_swiglu_forward_kernel", "_swiglu_forward_kernel_tiled") as forward:
        liger.swiglu_forward(gate, up)
    with cr.launches(liger, "_swiglu_backward_kernel", "_swiglu_backward_kernel_tiled") as backward:
        liger.swiglu_backward(gate, up, cr.meta_tensor(m, f, dtype=dtype))
    # A program per row, no loop. Forward reads gate and up, writes y; backward reads dy,
    # gate and up and writes both gradients (over gate and up).
    return [cr.jit_variant("swiglu", pass_, launch, impl="liger-kernel", workload=workload, show=("BLOCK_SIZE",),
                           work=cr.Work("element", f, (3 if pass_ == "fwd" else 5) * item))
            for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0]))]


def _flag_gems_rms_norm(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    m, n = workload.tokens, workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    x, dy, weight = cr.meta_tensor(m, n, dtype=dtype), cr.meta_tensor(m, n, dtype=dtype), cr.meta_tensor(n, dtype=dtype)
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.ops.rms_norm")
        with cr.launches(gems, "rms_norm_kernel", "rms_norm_loop_kernel") as forward:
            _, inv_rms = gems.rms_norm_forward(x, (n,), weight, 1e-6)
        with cr.launches(gems, "rms_norm_grad_dx_kernel", "rms_norm_grad_dw_kernel") as backward:
            gems.rms_norm_backward(dy, x, inv_rms, (n,), weight, 1e-6)
    found = [cr.jit_variant("rms_norm", "fwd", launch, impl="flag-gems", workload=workload, show=("BLOCK_SIZE",),
                            work=cr.Work("element", n, 2 * item + 4 / n))  # a program per row, no loop
             for launch in (x for r in forward for x in cr.expand(r))]
    for launch in (x for r in backward for x in cr.expand(r)):
        # dX: a program per row (reads dY and X, writes dX); dW: a second kernel, a program
        # per ROW_BLOCK_SIZE x COL_BLOCK_SIZE tile that reads dY and X again.
        tile = "ROW_BLOCK_SIZE" in launch.args
        per_program = launch.args["ROW_BLOCK_SIZE"] * launch.args["COL_BLOCK_SIZE"] if tile else n
        found.append(cr.jit_variant(
            "rms_norm", "bwd", launch, impl="flag-gems", workload=workload,
            show=("ROW_BLOCK_SIZE", "COL_BLOCK_SIZE") if tile else ("BLOCK_SIZE",),
            work=cr.Work("element", per_program, 2 * item if tile else 3 * item + 4 / n)))
    return found


def _flag_gems_rotary(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    """Forward only: flag-gems 5.0.2 defines no backward for its rotary embedding."""
    b, t, h, d = workload.batch, workload.seq, workload.heads, workload.head_dim
    item = torch.empty((), dtype=dtype).element_size()
    q, k = cr.meta_tensor(b, t, h, d, dtype=dtype), cr.meta_tensor(b, t, h, d, dtype=dtype)
    cos, sin = cr.meta_tensor(t, d // 2, dtype=torch.float32), cr.meta_tensor(t, d // 2, dtype=torch.float32)
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.fused.rotary_embedding")
        with cr.launches(gems, "apply_rotary_pos_emb_kernel") as forward:
            gems.apply_rotary_pos_emb(q, k, cos, sin)
    # A program per token rotates all heads of q and k, without a loop.
    return [cr.jit_variant("rotary", "fwd", launch, impl="flag-gems", workload=workload, show=("PADDED_HEAD_DIM",),
                           work=cr.Work("element", 2 * h * d, 2 * item))
            for launch in (x for r in forward for x in cr.expand(r))]


def _flag_gems_attention_backward(dtype: torch.dtype, workload: cr.Workload) -> list[cr.KernelVariant]:
    b, t, h, d = workload.batch, workload.seq, workload.heads, workload.head_dim
    item = torch.empty((), dtype=dtype).element_size()
    # Its backward asserts contiguous (B, H, T, D) inputs.
    q, k, v, o, do = (cr.meta_tensor(b, h, t, d, dtype=dtype) for _ in range(5))
    lse = cr.meta_tensor(b, h, t, dtype=torch.float32)
    with _stand_in_gpu():
        gems = importlib.import_module("flag_gems.ops.attention")
        with cr.launches(gems, "_attn_bwd_preprocess", "_attn_bwd") as backward:
            gems.scaled_dot_product_attention_backward(do, q, k, v, o, lse, is_causal=True)
    per_head, tensors, vectors = t * (t + 1) / 2 / 1024, t * d * item, 4 * t
    found = []
    for launch in (x for r in backward for x in cr.expand(r)):
        args = launch.args
        if "BLOCK_M1" not in args:  # delta = rowsum(o * dO): BLOCK_M queries of (T + 1) / 2 keys each
            work = cr.Work("1K pairs", args["BLOCK_M"] * (t + 1) / 2 / 1024, (2 * tensors + vectors) / per_head,
                           10 * d * 1024, loops="sequence")
            found.append(cr.jit_variant("attention", "bwd", launch, impl="flag-gems", workload=workload,
                                        show=("BLOCK_M",), work=work))
            continue
        # It autotunes over 18 configs on a GPU; compiled here: those with 3 stages. One
        # kernel: dK/dV of a key block (a diagonal loop over query blocks of BLOCK_M1 / SLICE,
        # then full ones of BLOCK_M1), then dQ of a query block (diagonal key blocks of
        # BLOCK_N2 / SLICE, then full ones of BLOCK_N2) — four loops on different tiles. It
        # must read q, k, v, dO, lse and delta and write dQ, dK and dV.
        if launch.options["num_stages"] != 3:
            continue
        m1, n1, m2, n2, sl = (args[k] for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "BLK_SLICE_FACTOR"))
        work = cr.Work("1K pairs", (m1 // sl * n1 / 1024, m1 * n1 / 1024, m2 * n2 // sl / 1024, m2 * n2 / 1024),
                       (7 * tensors + 2 * vectors) / per_head, 10 * d * 1024,
                       loops=("masked", "main", "masked", "main"))
        found.append(cr.jit_variant("attention", "bwd", launch, impl="flag-gems", workload=workload,
                                    show=("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), work=work))
    return found


def _not_described(package: str, why: str) -> Callable:
    """A peer kernel this tool cannot yet normalise: importing the package is tried (so an
    import failure is the reason given), then ``why``."""

    def describe(dtype: torch.dtype, workload: cr.Workload) -> list:
        with _stand_in_gpu():
            importlib.import_module(package)
        raise NotImplementedError(why)

    return describe


# (package, op, describe): describe(dtype, workload) -> variants. A package whose import or
# launcher fails is reported with the reason.
PEERS: list[tuple[str, str, Callable]] = [
    ("liger-kernel", "layernorm", _liger_layernorm),
    ("liger-kernel", "cross_entropy", _liger_cross_entropy),
    ("flag-gems", "layernorm", _flag_gems_layernorm),
    ("flag-gems", "cross_entropy", _flag_gems_cross_entropy),
    ("flag-gems", "cross_entropy", _flag_gems_cross_entropy_backward),
    ("flag-gems", "attention", _flag_gems_attention),
    ("liger-kernel", "rms_norm", _liger_rms_norm),
    ("flag-gems", "rms_norm", _flag_gems_rms_norm),
    ("liger-kernel", "rotary", _liger_rope),
    ("flag-gems", "rotary", _flag_gems_rotary),
    ("liger-kernel", "swiglu", _liger_swiglu),
    ("flag-gems", "attention", _flag_gems_attention_backward),
    ("flash-attn-triton", "attention", _not_described("flash_attn_triton", "imported; no description yet")),
]


def peer_variants(dtypes: Sequence[str], workload_name: str, ops: Optional[Sequence[str]] = None,
                  failures: Optional[list] = None, packages: Optional[Sequence[str]] = None) -> list[cr.KernelVariant]:
    """The peers' variants for the workload (of ``packages``, default all); what fails is
    appended to ``failures``."""
    found = []
    for package, op, describe in PEERS:
        if (ops and op not in ops) or (packages and package not in packages):
            continue
        for dtype_name in dtypes:
            try:
                variants = describe(cr.DTYPES[dtype_name], cr.workload(workload_name))
                if not variants:
                    raise RuntimeError("no kernel of this op is described for the static comparison yet")
                found += variants
            except Exception as exc:  # a peer that does not import or launch is a finding
                if failures is not None:
                    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    failures.append(dict(op=op, impl=package, dtype=str(cr.DTYPES[dtype_name]).removeprefix("torch."),
                                         workload=workload_name, error=reason[:300]))
    return found


def _fusedgpt_variants(ops, dtypes, workload_name) -> list[cr.KernelVariant]:
    return cr.variants(ops, dtypes, workload_name)


# ------------------------------------------------------------------ comparison


def _comparable(row: dict) -> bool:
    """The fusedgpt launches that do what the peers' do (see the module docstring)."""
    config = row["config"]
    return not (config.get("HAS_RESIDUAL") or config.get("HAS_DSUM") or config.get("HAS_DROPOUT"))


def per_pass(rows: Sequence[dict]) -> list[dict]:
    """One line per op x pass x arch x dtype x impl: the cheapest config of each kernel,
    summed over the kernels of the pass, which run one after the other (the attention
    backward: delta, dK/dV, dQ); loop shape, load widths and FTZ are the costliest kernel's.
    fusedgpt's attention has two backwards, each with its line; its "bwd" line is the one
    the launcher takes by default (the fused one)."""
    best: dict = {}
    for row in rows:
        if "error" in row or (row["impl"] == "fusedgpt" and not _comparable(row)):
            continue
        key = (row["op"], row["pass"], row["arch"], row["dtype"], row["impl"], row["kernel"])
        if key not in best or row["model_cycles_per_unit"] < best[key]["model_cycles_per_unit"]:
            best[key] = row
    groups: dict = defaultdict(list)
    for (op, pass_, arch, dtype, impl, _), row in best.items():
        groups[(op, pass_, arch, dtype, impl)].append(row)
    lines = []
    for (op, pass_, arch, dtype, impl), kernels in sorted(groups.items()):
        total = lambda key: sum(k[key] or 0 for k in kernels)  # noqa: E731
        main = max(kernels, key=lambda k: k["model_cycles_per_unit"])
        mma = [k["mma_redundancy"] for k in kernels if k["mma_redundancy"] is not None]
        lines.append(dict(
            op=op, pass_=pass_, arch=arch, dtype=dtype, impl=impl, unit=main["unit"],
            kernels="; ".join(f"{k['kernel']} {' '.join(f'{a}={b}' for a, b in k['config'].items())} "
                              f"w{k['num_warps']}s{k['num_stages']}" for k in kernels),
            registers=max(k["registers"] for k in kernels), spill_bytes=total("spill_bytes"),
            insts_per_unit=total("insts_per_unit"),
            masked_insts_per_unit=main["masked_insts_per_unit"],
            mufu_per_unit=total("mufu_per_unit"),
            exp_ftz=main["exp_ftz"], load_widths=main["load_widths"], tma=total("tma"),
            bytes_per_unit=total("bytes_per_unit"), min_bytes_per_unit=total("min_bytes_per_unit"),
            mma_redundancy=sum(mma) if mma else None,
            model_cycles_per_unit=total("model_cycles_per_unit"),
        ))
    lines += _attention_backward_taken(lines)
    best_peer: dict = {}
    for line in lines:
        if line["impl"] != "fusedgpt":
            key = (line["op"], line["pass_"], line["arch"], line["dtype"])
            best_peer[key] = min(best_peer.get(key, float("inf")), line["model_cycles_per_unit"])
    for line in lines:
        # Both of fusedgpt's attention backwards ("bwd-fused", "bwd-recompute") against the peers' "bwd".
        peer = best_peer.get((line["op"], line["pass_"].split("-")[0], line["arch"], line["dtype"]))
        line["ratio_to_best_peer"] = round(line["model_cycles_per_unit"] / peer, 2) if peer else None
    return sorted(lines, key=lambda line: (line["op"], line["pass_"], line["arch"], line["dtype"], line["impl"]))


def _attention_backward_taken(lines: Sequence[dict]) -> list[dict]:
    """fusedgpt's attention "bwd" line per arch and dtype: the backward the launcher takes
    by default, the fused one (the recompute one only under deterministic algorithms)."""
    return [dict(line, pass_="bwd", kernels=f"({line['pass_']}) {line['kernels']}") for line in lines
            if line["impl"] == "fusedgpt" and line["op"] == "attention" and line["pass_"] == "bwd-fused"]


def markdown(lines: Sequence[dict], failures: Sequence[dict], header: str) -> str:
    cols = ["op", "pass", "arch", "dtype", "impl", "unit", "insts/unit", "masked", "MUFU/unit", "exp FTZ",
            "global mem (main loop)", "B/unit (min)", "MMA redund.", "regs", "model cyc/unit", "vs best peer",
            "config"]
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda x, spec=".3g": "-" if x is None else format(x, spec)  # noqa: E731
    for line in lines:
        out.append("| " + " | ".join([
            line["op"], line["pass_"], line["arch"], line["dtype"], line["impl"], line["unit"],
            fmt(line["insts_per_unit"]), fmt(line["masked_insts_per_unit"]), fmt(line["mufu_per_unit"]),
            {None: "-", True: "yes", False: "no"}[line["exp_ftz"]],
            " ".join(f"{k}x{v}" for k, v in sorted(line["load_widths"].items())) or "-",
            f"{fmt(line['bytes_per_unit'])} ({fmt(line['min_bytes_per_unit'])})", fmt(line["mma_redundancy"], ".2f"),
            str(line["registers"]), fmt(line["model_cycles_per_unit"]), fmt(line["ratio_to_best_peer"], ".2f"),
            line["kernels"],
        ]) + " |")
    if failures:
        out += ["", "Peers that did not build (listed, not dropped):", ""]
        out += [f"- {f['impl']} / {f['op']} ({f['dtype']}): {f['error']}" for f in failures]
    return "\n".join(out) + "\n"


def json_rows(rows: Sequence[dict], failures: Sequence[dict]) -> list[dict]:
    """Every build (the fields the issue names first), then the peers that failed."""
    return [{"op": r["op"], "pass": r["pass"], "impl": r["impl"], "kernel": r["kernel"], "dtype": r["dtype"],
             "arch": r["arch"], "workload": r["workload"], "config": {**r["config"], "num_warps": r["num_warps"],
                                                                      "num_stages": r["num_stages"]},
             **{k: v for k, v in r.items() if k not in ("op", "pass", "impl", "kernel", "dtype", "arch", "workload",
                                                         "config")}}
            for r in rows] + [dict(f, kernel=None, arch=None) for f in failures]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="?", const="all", default=None,
                        help=f"compile peer kernels too: all, or some of {sorted({p for p, _, _ in PEERS})}")
    parser.add_argument("--arch", default="sm_80,sm_90")
    parser.add_argument("--workload", default="gpt2", help=f"one of {', '.join(cr.WORKLOADS)}")
    parser.add_argument("--dtype", default="bf16", help="comma-separated: fp32, fp16, bf16")
    parser.add_argument("--op", default=None, help="comma-separated ops (default: all)")
    parser.add_argument("--json", action="store_true", help="print every build as JSON rows")
    parser.add_argument("--out", default=None, help="also write static-<workload>.md and .json to this folder")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "bench.static", *(argv or sys.argv[1:])], env=env)
    archs = [a for a in args.arch.split(",") if a]
    dtypes = [d for d in args.dtype.split(",") if d]
    ops = args.op.split(",") if args.op else None
    workload = cr.workload(args.workload)
    rows = cr.report(archs, workers=args.workers, source="bench.static:_fusedgpt_variants",
                     source_kwargs=dict(ops=ops, dtypes=dtypes, workload_name=workload.name))
    failures: list = []
    if args.peers:
        packages = None if args.peers == "all" else args.peers.split(",")
        unknown = set(packages or ()) - {p for p, _, _ in PEERS}
        if unknown:
            parser.error(f"--peers: unknown {sorted(unknown)}")
        peer_variants(dtypes, workload.name, ops, failures, packages)  # in this process: collect the reasons
        rows += cr.report(archs, workers=args.workers, source="bench.static:peer_variants",
                          source_kwargs=dict(dtypes=dtypes, workload_name=workload.name, ops=ops, packages=packages))
    # A config that does not compile is one an autotuner skips on a GPU; it is listed too.
    failures += [dict(op=r["op"], impl=r["impl"], dtype=r["dtype"], workload=r["workload"],
                      error=f"config {' '.join(f'{k}={v}' for k, v in r['config'].items())} w{r['num_warps']}"
                            f"s{r['num_stages']} of {r['kernel']} does not compile for {r['arch']}: {r['error']}")
                 for r in rows if "error" in r]
    from bench import common

    versions = common.versions()
    header = (f"# Static cost: fusedgpt vs peer Triton kernels, workload `{workload.name}` "
              f"({workload})\n\nA MODEL read from SASS of ahead-of-time builds (no GPU ran anything): "
              f"per unit of work, main-loop instructions, MUFU, global memory instructions and bytes, MMA "
              f"redundancy, and modelled SM cycles = max(tensor core, MUFU, issue, HBM, L2) per kernel, added over "
              f"the kernels of a pass, with the constants of "
              f"docs/verification.md (sm_80 = A100 SXM 80GB, sm_90 = H100 SXM). Ratio < 1: fusedgpt modelled "
              f"cheaper than the best peer. Triton {versions['triton']}, torch {versions['torch']}, commit "
              f"{versions['commit']}, {versions['date']}. Regenerate: `python -m bench.static --peers --out "
              f"bench/results/static`.")
    table = markdown(per_pass(rows), failures, header)
    if args.json:
        print(json.dumps(json_rows(rows, failures), indent=1))
    else:
        print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"static-{workload.name}.md"), "w") as handle:
            handle.write(table)
        with open(os.path.join(args.out, f"static-{workload.name}.json"), "w") as handle:
            json.dump(json_rows(rows, failures), handle, indent=1)
    return 1 if cr.problems([r for r in rows if r["impl"] == "fusedgpt"]) else 0


if __name__ == "__main__":
    sys.exit(main())
