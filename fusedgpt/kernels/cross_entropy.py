r"""Fused softmax cross-entropy over a large vocabulary, forward and backward.

Per row of V logits ``x`` with target class ``t`` (``s`` the label smoothing, ``z`` the
z-loss weight):

    lse  = log sum_j exp(x_j)
    nll  = lse - x_t                                  (the target's negative log-likelihood)
    loss = (1 - s) nll + s (lse - mean_j x_j) + z lse^2

and 0 where ``t == ignore_index``. "mean" divides the sum by the number of rows not
ignored, and is 0 (with zero gradient) when every row is ignored.

The logsumexp takes one pass over the row in BLOCK_V-wide blocks ("online softmax"), all
in fp32: a running maximum ``m`` (one scalar per row, raised once per block) and per-lane
partial sums ``D`` of ``exp(x_j - m)`` over the classes other than the target, rescaled by
``exp(m_old - m_new)`` when the maximum grows; the lanes are summed once at the end. One
exponential per logit and one cross-lane reduction per block. Then

    nll = lse - x_t = (m - x_t) + log1p((exp(x_t - m) - 1) + D)

which never subtracts two large rounded numbers: a confident row (p_t near 1) has
x_t = m and a small D, and its small loss keeps its digits.

Backward, with ``p_j = exp((x_j - x_t) - nll)`` recomputed from the logits:

    dloss/dx_j = p_j (1 + 2 z lse) - s / V - (1 - s) [j == t]

times the row's incoming gradient (``g / n_kept`` for "mean", ``g`` for "sum", ``g_i``
for "none"); 0 for ignored rows. Every term is in fp32 and rounded once when stored. The
true class uses ``p_t - 1 = expm1(-nll)``: as a difference of numbers near 1 it would lose
its digits (all of them in a half-precision softmax, which rounds ``p_t`` to 1, and most
of them even in fp32).

Saved for backward: the logits (the caller's tensor, not a copy), the targets and the
fp32 logsumexp of each row, kept as ``nll = lse - x_t`` (an fp32 ``lse`` of 20 has no
digits left for a 1e-6 difference from ``x_t``): 4 bytes per row, never probabilities.

IO per row: the forward reads the logits once and writes two floats; the backward reads
them once more and writes the gradient. Rows whose target is ignored are not read at all.
The fused mode that ``linear_cross_entropy`` uses runs both passes in one program and
writes the gradient over the logits in place (each block is read before it is written).

Offsets: the row offset ``row * stride`` is int64, so N x V may pass 2**31. A target that
is neither ``ignore_index`` nor in [0, V) is never used as an address (its loads are
masked off): the kernel gives that row a NaN loss and NaN gradient instead. The public
functions reject such targets with a ValueError first, unless called with
``validate=False`` (the check is one device-to-host synchronisation, which CUDA-graph
capture cannot have). A target whose logit is -inf has an infinite loss and a NaN gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels import reference
from fusedgpt.kernels.checks import (
    as_rows,
    check_bool,
    check_float,
    check_number,
    check_same_device,
    check_tensor,
    float64_unsupported,
)
from fusedgpt.kernels.triton_compat import tl, triton

Tensor = torch.Tensor

SMALL_VOCAB_BLOCK = 1024
LARGE_VOCAB_BLOCK = 4096
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- kernel


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulps for small u (Goldberg): the rounding of 1 + u cancels."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))  # no 0/0, even discarded


@triton.jit
def _expm1(x):
    """exp(x) - 1 to a few ulps for small x (Kahan): the rounding of exp(x) cancels."""
    u = tl.exp(x)
    exact = (u == 1.0) | (u == 0.0)
    ratio = x / tl.log(tl.where(exact, 0.5, u))  # no x / 0, even discarded
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * ratio))


@triton.jit
def _cross_entropy_kernel(
    X, DX, TARGET, LOSS, NLL, GRAD,
    stride_x, stride_dx, stride_grad,
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr,
    FORWARD: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One program per row. FORWARD: the loss and the nll from the logits. BACKWARD: the
    gradient into DX (which may be X itself), from the nll (this launch's, or a saved one)
    and the row's incoming gradient GRAD[row * stride_grad] (stride 0: one for all rows)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    offsets = tl.arange(0, BLOCK_V)
    target = tl.load(TARGET + row)
    kept = target != ignore_index
    usable = kept & (target >= 0) & (target < V)
    bad = kept & ~usable
    x_target = tl.load(x_row + target, mask=usable, other=0.0).to(tl.float32)
    # The target as a column index; -1 (no column) where it is not a usable class.
    target_col = tl.where(usable, target, -1).to(tl.int32)
    if FORWARD:
        m = tl.full((), float("-inf"), tl.float32)
        others = tl.zeros((BLOCK_V,), tl.float32)  # per lane: sum over j != t of exp(x_j - m)
        x_sum = tl.zeros((), tl.float32)
        # Ignored and bad rows run the loop zero times: their logits are never read.
        for start in range(0, tl.where(usable, V, 0), BLOCK_V):
            cols = start + offsets
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every logit so far is -inf, shift by 0 so the sums stay 0 rather than nan.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            others = others * tl.exp(m - shift) + tl.where(cols == target_col, 0.0, tl.exp(x - shift))
            m = m_new
            if label_smoothing > 0:  # a second reduction only where smoothing needs it
                x_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        # Skipped rows (m = -inf) take m = 0: their discarded values stay finite.
        m = tl.where(usable, m, 0.0)
        # sum_j exp(x_j - m) = e_t + D. A confident row has x_t = m, e_t = 1 and a small D:
        # log1p keeps the digits of its small nll that log(1 + D) would round away.
        e_target_minus_1 = tl.exp(x_target - m) - 1.0
        rest = tl.sum(others, axis=0)
        nll = tl.where(usable, (m - x_target) + _log1p(e_target_minus_1 + rest), 0.0)
        lse = x_target + nll
        smoothed = lse - x_sum / V  # multiplied by s = 0 when unused
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smoothed + z_loss * lse * lse
        loss = tl.where(usable, loss, 0.0)
        tl.store(LOSS + row, tl.where(bad, float("nan"), loss))
        tl.store(NLL + row, nll)
    else:
        nll = tl.load(NLL + row)
    if BACKWARD:
        scale = tl.load(GRAD + row * stride_grad).to(tl.float32)
        scale = tl.where(bad, float("nan"), tl.where(kept, scale, 0.0))
        lse = x_target + nll
        prob_factor = 1.0 + 2.0 * z_loss * lse
        uniform = label_smoothing / V
        # p_t f - s/V - (1 - s) = -(1 - p_t) f + (f - 1) + s (1 - 1/V), with 1 - p_t =
        # -expm1(-nll): no difference of numbers near 1 where p_t is near 1.
        grad_target = _expm1(-nll) * prob_factor + 2.0 * z_loss * lse + (label_smoothing - uniform)
        dx_row = DX + row * stride_dx
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            # Unusable rows read nothing: exp(0) stays finite, then scale makes it 0 (or nan).
            x = tl.load(x_row + cols, mask=in_row & usable, other=0.0).to(tl.float32)
            grad = tl.exp((x - x_target) - nll) * prob_factor - uniform
            grad = tl.where(cols == target_col, grad_target, grad) * scale
            tl.store(dx_row + cols, grad.to(DX.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------- launchers


def block_config(v: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``v`` logits: 1024-wide blocks for a small
    vocabulary (masked past ``v``), 4096-wide ones looped over a large one.

    Eight logits per thread keep every mode under 64 registers without spills, so two
    rows are in flight per SM at 4096 (see the compile report); 16 per thread would about
    double the registers and halve the rows in flight.
    """
    block_v = SMALL_VOCAB_BLOCK if v <= SMALL_VOCAB_BLOCK else LARGE_VOCAB_BLOCK
    return block_v, block_v // 256


def launch_configs() -> list[tuple[int, int]]:
    """Every ``block_config`` the launchers can pick (for the compile report)."""
    return sorted({block_config(1), block_config(LARGE_VOCAB_BLOCK)})


def _launch(logits: Tensor, target: Tensor, nll: Optional[Tensor], grad: Optional[Tensor],
            grad_scale: Optional[Tensor], ignore_index: int, label_smoothing: float,
            z_loss: float) -> tuple[Tensor, Tensor]:
    n, v = logits.shape
    forward, backward = nll is None, grad is not None
    loss = torch.empty(n if forward else 0, dtype=torch.float32, device=logits.device)
    if forward:
        nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, nll
    block_v, num_warps = block_config(v)
    # Outputs a mode does not write are never touched (constexpr flags); any tensor stands in.
    _cross_entropy_kernel[(n,)](
        logits, grad if backward else logits, target, loss if forward else nll, nll,
        grad_scale if backward else nll,
        logits.stride(0), grad.stride(0) if backward else 0,
        grad_scale.stride(0) if backward and grad_scale.dim() else 0,
        v, ignore_index, label_smoothing, z_loss,
        BLOCK_V=block_v, FORWARD=forward, BACKWARD=backward, num_warps=num_warps,
    )
    return loss, nll


def cross_entropy_forward(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float) -> tuple[Tensor, Tensor]:
    """Per-row ``loss`` and ``nll = lse - x_target`` (fp32, (N,); 0 for ignored rows) for
    logits (N, V) with unit column stride and contiguous int64 targets (N,)."""
    return _launch(logits, target, None, None, None, ignore_index, label_smoothing, z_loss)


def cross_entropy_backward(logits: Tensor, target: Tensor, nll: Tensor, grad_scale: Tensor, ignore_index: int,
                           label_smoothing: float, z_loss: float, out: Optional[Tensor] = None) -> Tensor:
    """The gradient of ``sum_i grad_scale_i * loss_i`` with respect to the logits (N, V), in
    their dtype, from the forward's ``nll``; written to ``out`` (which may be ``logits``
    itself: in place) or a new tensor. ``grad_scale``: fp32, 0-dim (all rows alike) or (N,)."""
    grad = torch.empty_like(logits) if out is None else out
    _launch(logits, target, nll, grad, grad_scale, ignore_index, label_smoothing, z_loss)
    return grad


def cross_entropy_forward_backward_(logits: Tensor, target: Tensor, grad_scale: Tensor, ignore_index: int,
                                    label_smoothing: float, z_loss: float) -> tuple[Tensor, Tensor]:
    """Both in one launch: returns per-row ``loss`` and ``nll`` and OVERWRITES ``logits`` with
    the gradient of ``sum_i grad_scale_i * loss_i``; each row is read twice, written once."""
    return _launch(logits, target, None, logits, grad_scale, ignore_index, label_smoothing, z_loss)


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::checked_target", mutates_args=())
def _checked_target_op(target: Tensor, num_classes: int, ignore_index: int, op: str) -> Tensor:
    # Inside an op so that torch.compile keeps it (its output feeds the loss) without
    # tracing the data-dependent test, which is this function's one host synchronisation.
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        example = int(target[bad][0])
        raise ValueError(
            f"{op}: target holds {example}, which is neither ignore_index ({ignore_index}) nor a "
            f"class in [0, {num_classes})"
        )
    return target.clone()


@_checked_target_op.register_fake
def _(target, num_classes, ignore_index, op):
    return torch.empty_like(target)


@torch.library.custom_op("fusedgpt::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float) -> tuple[Tensor, Tensor]:
    return cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss)


@_cross_entropy_fwd_op.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows)


@torch.library.custom_op("fusedgpt::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(logits: Tensor, target: Tensor, nll: Tensor, grad_scale: Tensor, ignore_index: int,
                          label_smoothing: float, z_loss: float) -> Tensor:
    return cross_entropy_backward(logits, target, nll, grad_scale, ignore_index, label_smoothing, z_loss)


@_cross_entropy_bwd_op.register_fake
def _(logits, target, nll, grad_scale, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits)


# ------------------------------------------------------- shared by the two loss ops


def mean_divisor(target: Tensor, ignore_index: int) -> Tensor:
    """fp32 number of rows not ignored, at least 1 (so "mean" of nothing is 0, not nan).
    A device tensor: no synchronisation."""
    return (target != ignore_index).sum().clamp(min=1).to(torch.float32)


def reduce_loss(loss: Tensor, target: Tensor, ignore_index: int, reduction: str, shape: torch.Size) -> Tensor:
    """Per-row fp32 losses -> the loss of ``reduction`` (``shape`` for "none")."""
    if reduction == "none":
        return loss.view(shape)
    total = loss.sum()
    return total / mean_divisor(target, ignore_index) if reduction == "mean" else total


def row_grad_scale(grad_output: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """The incoming gradient of each row's loss, fp32 (fp64 from fp64): 0-dim for "mean" and
    "sum", (N,) for "none"."""
    grad = grad_output.to(torch.promote_types(grad_output.dtype, torch.float32))
    if reduction == "none":
        return grad.reshape(-1).contiguous()
    return grad / mean_divisor(target, ignore_index) if reduction == "mean" else grad


def check_loss_args(op: str, target: Tensor, expected_shape: torch.Size, ignore_index: object, reduction: str,
                    label_smoothing: object, z_loss: object, validate: object) -> tuple[int, float, float, bool]:
    """Checks common to ``cross_entropy`` and ``linear_cross_entropy`` (not the target
    values); returns ``(ignore_index, label_smoothing, z_loss, validate)`` as Python scalars."""
    check_tensor(op, "target", target)
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be int64 class indices, got {target.dtype}")
    if target.shape != expected_shape:
        raise ValueError(f"{op}: target must have shape {tuple(expected_shape)}, got {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return (
        # Compared with int64 targets: a value past int64 could never match one.
        check_number(op, "ignore_index", ignore_index, integer=True, at_least=-(2**63), below=2**63),
        check_number(op, "label_smoothing", label_smoothing, at_least=0.0, at_most=1.0),
        check_number(op, "z_loss", z_loss, at_least=0.0),
        check_bool(op, "validate", validate),
    )


def checked_target(op: str, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``target``, after a ValueError if a value is neither ``ignore_index`` nor a class."""
    return torch.ops.fusedgpt.checked_target(target, num_classes, ignore_index, op)


# --------------------------------------------------------------------------- autograd


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, z_loss):
        rows = as_rows(logits)
        flat_target = target.reshape(-1).contiguous()
        loss, nll = torch.ops.fusedgpt.cross_entropy_fwd(rows, flat_target, ignore_index, label_smoothing, z_loss)
        ctx.save_for_backward(rows, flat_target, nll)
        ctx.params = (logits.shape, ignore_index, reduction, label_smoothing, z_loss)
        return reduce_loss(loss, flat_target, ignore_index, reduction, target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        rows, flat_target, nll = ctx.saved_tensors
        shape, ignore_index, reduction, label_smoothing, z_loss = ctx.params
        scale = row_grad_scale(grad_output, flat_target, ignore_index, reduction)
        grad = torch.ops.fusedgpt.cross_entropy_bwd(
            rows, flat_target, nll, scale, ignore_index, label_smoothing, z_loss
        )
        return grad.view(shape), None, None, None, None, None


# --------------------------------------------------------------------------- public


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    validate: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """Softmax cross-entropy over the last dimension (``torch.nn.functional.cross_entropy``
    semantics with the classes last), plus an optional z-loss.

    Args:
        logits: (..., V) float32, float16 or bfloat16 (float64 on the reference path); any
            strides (a copy is made only when the last dimension is not contiguous).
        target: (...) int64 class indices in [0, V), or ``ignore_index``.
        ignore_index: rows with this target add nothing to the loss or its gradient; an
            int in int64's range (numbers here may be Python or numpy scalars).
        reduction: "mean" (over the rows not ignored; 0 when every row is ignored, where
            torch gives nan), "sum" or "none".
        label_smoothing: s in [0, 1]: the target distribution is (1 - s) one-hot + s / V.
        z_loss: adds ``z_loss * logsumexp(logits) ** 2`` per row (PaLM), reduced like the loss.
        validate: check that every target is ``ignore_index`` or in [0, V) (one
            device-to-host synchronisation). With False, a bad target is never read out of
            bounds but gives a NaN loss and gradient for its row (on either backend).
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        fp32 loss (fp64 for fp64 logits): a scalar, or (...) for "none". The gradient
        reaches ``logits`` in their dtype.
    """
    op = "cross_entropy"
    check_float(op, "logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    ignore_index, label_smoothing, z_loss, validate = check_loss_args(
        op, target, logits.shape[:-1], ignore_index, reduction, label_smoothing, z_loss, validate
    )
    check_same_device(op, logits=logits, target=target)
    path = _backend.choose(op, backend, (logits,), unsupported=float64_unsupported(logits))
    if validate:
        target = checked_target(op, target, logits.shape[-1], ignore_index)
    if path == "triton":
        return _CrossEntropyFunction.apply(logits, target, ignore_index, reduction, label_smoothing, z_loss)
    return reference.cross_entropy(logits, target, ignore_index, reduction, label_smoothing, z_loss)


# --------------------------------------------------------------------------- compile report


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """The launches of the linear cross-entropy of ``workload`` (default gpt2), recorded
    from the launchers on meta tensors: one chunk of logits of ``dtype`` laid out as the
    head writes them (rows ``logits_row_stride`` apart), in the three modes — forward,
    backward from a saved nll, and both in one launch (in place)."""
    import sys

    from fusedgpt.kernels import compile_report as cr
    from fusedgpt.kernels.linear_cross_entropy import default_chunk_size

    workload = workload or cr.WORKLOADS["gpt2"]
    v, item = workload.vocab, torch.empty((), dtype=dtype).element_size()
    rows = default_chunk_size(workload.tokens, v, dtype, use_triton=True)
    logits = cr.meta_tensor(rows, v, dtype=dtype, strides=(workload.logits_row_stride, 1))
    target = cr.meta_tensor(rows, dtype=torch.int64)
    nll, scale = cr.meta_tensor(rows, dtype=torch.float32), cr.meta_tensor(dtype=torch.float32)
    args = (-100, 0.0, 0.0)  # ignore_index, label_smoothing, z_loss as training passes them
    module = sys.modules[__name__]
    with cr.launches(module, "_cross_entropy_kernel") as forward:
        cross_entropy_forward(logits, target, *args)
    with cr.launches(module, "_cross_entropy_kernel") as backward:
        cross_entropy_backward(logits, target, nll, scale, *args, out=logits)
    with cr.launches(module, "_cross_entropy_kernel") as both:
        cross_entropy_forward_backward_(logits, target, scale, *args)
    # Minimum bytes per logit: read once; the backward also writes the gradient.
    return [
        cr.jit_variant("cross_entropy", pass_, launch, workload=workload, show=("BLOCK_V", "FORWARD", "BACKWARD"),
                       work=cr.Work("logit", launch.args["BLOCK_V"], item * (1 if pass_ == "fwd" else 2),
                                    loops="sequence"))
        for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0]), ("fwd+bwd", both[0]))
    ]
