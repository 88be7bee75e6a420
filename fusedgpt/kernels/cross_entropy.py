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
``exp(m_old - m_new)`` when the maximum grows; the lanes are summed once at the end. The
exponentials are taken as ``exp2(x log2(e) - m log2(e))``: one FFMA and one MUFU.EX2 per
logit (``exp`` would add a subnormal range fix-up around each). With ``u = x_t log2(e) -
m log2(e)`` against that very shift,

    nll = lse - x_t = -u ln2 + log1p(expm1(u ln2) + D)

which never subtracts two large rounded numbers: a confident row (p_t near 1) has u near
0 and a small D, and its small loss keeps its digits (an error in u cancels between the two
terms to first order).

Layout: each row is split into a head of up to 16 bytes before the first 16-byte boundary,
a body of whole BLOCK_V blocks from there, and the tail. The body is read (and the gradient
written) unmasked, 128 bits at a time, whatever the row stride (GPT-2's 50257 included);
the head and tail together take one masked block (two where they pass BLOCK_V). The body
block holding the target is visited first, so only it pays for excluding the target.

Backward, with ``p_j = exp(x_j - lse)`` recomputed from the logits:

    dloss/dx_j = p_j (1 + 2 z lse) - s / V - (1 - s) [j == t]

times the row's incoming gradient (``g / n_kept`` for "mean", ``g`` for "sum", ``g_i``
for "none"); 0 for ignored rows. Every term is in fp32 and rounded once when stored. The
true class uses ``p_t - 1 = expm1(-nll)``: as a difference of numbers near 1 it would lose
its digits (all of them in a half-precision softmax, which rounds ``p_t`` to 1, and most
of them even in fp32).

Saved for backward: the logits (the caller's tensor, not a copy), the targets and one fp32
per row, ``r = lse - c`` with ``c`` the target's logit (so ``r`` is the nll: an fp32
``lse`` of 20 has no digits left for a 1e-6 difference from ``x_t``), or ``c = 0`` where
that logit is -inf (the nll is then infinite, the logsumexp is not): 4 bytes per row,
never probabilities.

Non-finite logits behave as in ``F.cross_entropy``: a row with no finite logsumexp (a NaN
or a +inf logit, or only -inf) has a NaN loss and an all-NaN gradient; -inf logits are
classes of probability 0, and a -inf target logit gives an infinite loss with the finite
gradient softmax - onehot. One difference: ignored rows are never read, so their gradient
is 0 whatever they hold (torch's is 0 * NaN = NaN for a NaN there).

IO per row: the forward reads the logits once and writes two floats; the backward reads
them once more and writes the gradient. Rows whose target is ignored are not read at all.
The fused mode that ``linear_cross_entropy`` uses runs both passes in one program and
writes the gradient over the logits in place (each block is read before it is written).

Offsets: the row offset ``row * stride`` is int64, so N x V may pass 2**31. A target that
is neither ``ignore_index`` nor in [0, V) is never used as an address (its loads are
masked off): the kernel gives that row a NaN loss and NaN gradient instead. The public
functions reject such targets with a ValueError first, unless called with
``validate=False`` (the check is one device-to-host synchronisation, which CUDA-graph
capture cannot have).
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
# Registers per thread each build stays within, by (BLOCK_V, bytes per logit, label
# smoothing on): the most any mode uses on sm_80 or sm_90 (Triton 3.8), rounded up to the
# allocation unit of 8. The compile report test checks the training builds (4096, no
# smoothing); rows_per_wave counts resident rows from these: at 40, three 16-warp programs
# share an SM's 65536 registers; at 64, two.
REGISTER_BUDGET = {
    (SMALL_VOCAB_BLOCK, 2, False): 48, (SMALL_VOCAB_BLOCK, 4, False): 56,
    (SMALL_VOCAB_BLOCK, 2, True): 48, (SMALL_VOCAB_BLOCK, 4, True): 56,
    (LARGE_VOCAB_BLOCK, 2, False): 40, (LARGE_VOCAB_BLOCK, 4, False): 64,
    (LARGE_VOCAB_BLOCK, 2, True): 64, (LARGE_VOCAB_BLOCK, 4, True): 64,
}
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- kernel

# exp(x) = exp2(x log2 e): the kernels call exp2, which compiles to a bare MUFU.EX2.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _row_split(row_start, V, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr):
    """How a row's V columns are visited: ``head`` columns up to the first ALIGN-element
    (16-byte) boundary, then ``body`` columns in whole BLOCK_V blocks starting there (loaded
    unmasked, 128 bits at a time), then the ``rest`` = the head and the tail past the body,
    in masked blocks. Returns (head, body, rest)."""
    head = tl.minimum((ALIGN - row_start % ALIGN) % ALIGN, V).to(tl.int32)
    body = (V - head) // BLOCK_V * BLOCK_V
    return head, body, V - body


@triton.jit
def _rest_columns(k, head, body):
    """Column of the k-th column outside the body: the head first, then the tail."""
    return tl.where(k < head, k, k + body)


@triton.jit
def _target_block(target_col, head, blocks, BLOCK_V: tl.constexpr):
    """Index of the body block that holds the target's column, 0 when none does."""
    index = (target_col - head) // BLOCK_V
    return tl.where((target_col >= head) & (index < blocks), index, 0)


@triton.jit
def _accumulate(X, cols, in_row, is_target, m, others, x_sum, MASKED: tl.constexpr, HOLDS_TARGET: tl.constexpr,
                SMOOTHING: tl.constexpr):
    """Adds the block of logits at ``X + cols`` (where MASKED, only the columns ``in_row``)
    to the running maximum ``m``, the per-lane sums ``others`` of exp(x_j - m) over j !=
    target, and, with label smoothing, the sum of the logits. ``is_target`` marks the
    target's column in a block that may hold it (HOLDS_TARGET). One helper call per block:
    the interpreter pays for each call."""
    if MASKED:
        x = tl.load(X + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(X + cols).to(tl.float32)
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # In log2 units: one FFMA and one MUFU.EX2 per logit. While every logit so far is
    # -inf, shift by 0 so that the sums stay 0 rather than nan.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new * LOG2E)
    e = tl.exp2(x * LOG2E - shift)
    if HOLDS_TARGET:
        e = tl.where(is_target, 0.0, e)
    others = others * tl.exp2(m * LOG2E - shift) + e
    if SMOOTHING:  # a second reduction only in the build that needs it
        if MASKED:
            x = tl.where(in_row, x, 0.0)
        x_sum += tl.sum(x, axis=0)
    return m_new, others, x_sum


@triton.jit
def _write_gradient(X, DX, cols, in_row, usable, is_target, lse2, prob_scale, uniform_scale, grad_target,
                    MASKED: tl.constexpr, HOLDS_TARGET: tl.constexpr):
    """dloss/dx for the block at ``X + cols`` (where MASKED, only the columns ``in_row``),
    written to ``DX + cols``: p_j f - s/V times the row's scale, with p_j = exp2(x_j log2 e
    - lse log2 e), and the target's own value where the block holds it. A row that is not
    ``usable`` is not read: its scale makes it 0 (or NaN)."""
    if MASKED:
        x = tl.load(X + cols, mask=in_row & usable, other=0.0).to(tl.float32)
    else:
        x = tl.load(X + cols, mask=usable, other=0.0).to(tl.float32)
    grad = tl.exp2(x * LOG2E - lse2) * prob_scale - uniform_scale
    if HOLDS_TARGET:
        grad = tl.where(is_target, grad_target, grad)
    if MASKED:
        tl.store(DX + cols, grad.to(DX.dtype.element_ty), mask=in_row)
    else:
        tl.store(DX + cols, grad.to(DX.dtype.element_ty))


@triton.jit
def _cross_entropy_kernel(
    X, DX, TARGET, LOSS, NLL, GRAD,
    stride, stride_grad,
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
    SMOOTHING: tl.constexpr,
    FORWARD: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One program per row; X and DX (which may be X itself) have rows ``stride`` apart.
    SMOOTHING (label_smoothing > 0) builds in the sum of the logits that smoothing needs.
    FORWARD: the loss and the saved ``lse - c`` from the logits. BACKWARD: the gradient into DX, from
    ``lse - c`` (this launch's, or a saved one) and the row's incoming gradient
    GRAD[row * stride_grad] (stride 0: one for all rows)."""
    row = tl.program_id(0).to(tl.int64)
    row_start = row * stride
    x_row = X + row_start
    dx_row = DX + row_start
    head, body, rest = _row_split(row_start, V, BLOCK_V, ALIGN)
    # The body's first element is 16-byte aligned (when X is, as the JIT checks).
    x_body = X + tl.multiple_of(row_start + head, ALIGN)
    dx_body = DX + tl.multiple_of(row_start + head, ALIGN)
    offsets = tl.arange(0, BLOCK_V)
    target = tl.load(TARGET + row)
    kept = target != ignore_index
    usable = kept & (target >= 0) & (target < V)
    bad = kept & ~usable
    x_target = tl.load(x_row + target, mask=usable, other=0.0).to(tl.float32)
    # The target as a column index; -1 (no column) where it is not a usable class.
    target_col = tl.where(usable, target, -1).to(tl.int32)
    # The reference point c of the saved r = lse - c: the target's logit, or 0 where it is
    # -inf (the nll is then infinite, but the logsumexp that the gradient needs is not).
    target_infinite = x_target == float("-inf")
    ref = tl.where(target_infinite, 0.0, x_target)
    if FORWARD:
        m = tl.full((), float("-inf"), tl.float32)
        others = tl.zeros((BLOCK_V,), tl.float32)  # per lane: sum over j != t of exp(x_j - m)
        x_sum = tl.zeros((), tl.float32)
        # Ignored and bad rows visit no block: their logits are never read. The body's block
        # holding the target goes first, so that the others pay no compare and select.
        blocks = tl.where(usable, body // BLOCK_V, 0)
        first = _target_block(target_col, head, blocks, BLOCK_V)
        if blocks > 0:
            cols = first * BLOCK_V + offsets
            m, others, x_sum = _accumulate(x_body, cols, None, head + cols == target_col, m, others, x_sum,
                                           False, True, SMOOTHING)
        for i in range(1, blocks):
            start = (first + i) * BLOCK_V
            start = tl.multiple_of(tl.where(start >= body, start - body, start), BLOCK_V)  # mod body
            m, others, x_sum = _accumulate(x_body, start + offsets, None, None, m, others, x_sum,
                                           False, False, SMOOTHING)
        # The head and the tail: one masked block, two where together they pass BLOCK_V.
        for part in tl.static_range(2):
            if usable & (part * BLOCK_V < rest):
                k = part * BLOCK_V + offsets
                cols = _rest_columns(k, head, body)
                m, others, x_sum = _accumulate(x_row, cols, k < rest, cols == target_col, m, others, x_sum,
                                               True, True, SMOOTHING)
        shift = tl.where(m == float("-inf"), 0.0, m * LOG2E)
        # exp(x_t - m') = exp2(u) against the very shift m' the sums used, and
        # sum_j exp(x_j - m') = exp2(u) + D. A confident row has u near 0 and a small D:
        # r = nll = -u ln 2 + log1p(expm1(u ln 2) + D) keeps the digits of its small nll
        # (an error in u cancels between the two terms to first order).
        u = x_target * LOG2E - shift
        log_sum = _log1p(_expm1(u * LN2) + tl.sum(others, axis=0))
        r = tl.where(target_infinite, shift * LN2, -u * LN2) + log_sum
        lse = ref + r
        # NaN or +inf anywhere in the row, or only -inf, leave no finite logsumexp: the row's
        # loss and gradient are NaN, as torch's log_softmax gives.
        finite = tl.abs(lse) < float("inf")
        r = tl.where(usable, tl.where(finite, r, float("nan")), 0.0)
        nll = tl.where(target_infinite, float("inf"), r)
        smoothed = lse - x_sum / V  # multiplied by s = 0 when unused
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smoothed + z_loss * lse * lse
        loss = tl.where(usable, tl.where(finite, loss, float("nan")), 0.0)
        tl.store(LOSS + row, tl.where(bad, float("nan"), loss))
        tl.store(NLL + row, r)
    else:
        r = tl.load(NLL + row)
    if BACKWARD:
        # Unusable rows are not read (their r is 0): the scale makes them 0, or NaN when bad.
        scale = tl.load(GRAD + row * stride_grad).to(tl.float32)
        scale = tl.where(bad, float("nan"), tl.where(kept, scale, 0.0))
        lse = ref + r
        nll = tl.where(target_infinite, float("inf"), r)
        prob_factor = 1.0 + 2.0 * z_loss * lse
        uniform = label_smoothing / V
        # p_t f - s/V - (1 - s) = -(1 - p_t) f + (f - 1) + s (1 - 1/V), with 1 - p_t =
        # -expm1(-nll): no difference of numbers near 1 where p_t is near 1.
        grad_target = (_expm1(-nll) * prob_factor + 2.0 * z_loss * lse + (label_smoothing - uniform)) * scale
        lse2 = lse * LOG2E
        prob_scale = prob_factor * scale
        uniform_scale = uniform * scale
        blocks = body // BLOCK_V
        first = _target_block(target_col, head, blocks, BLOCK_V)
        grad_args = (lse2, prob_scale, uniform_scale, grad_target)
        if blocks > 0:
            cols = first * BLOCK_V + offsets
            _write_gradient(x_body, dx_body, cols, None, usable, head + cols == target_col, *grad_args, False, True)
        for i in range(1, blocks):
            start = (first + i) * BLOCK_V
            start = tl.multiple_of(tl.where(start >= body, start - body, start), BLOCK_V)  # mod body
            _write_gradient(x_body, dx_body, start + offsets, None, usable, None, *grad_args, False, False)
        for part in tl.static_range(2):
            if part * BLOCK_V < rest:
                k = part * BLOCK_V + offsets
                cols = _rest_columns(k, head, body)
                _write_gradient(x_row, dx_row, cols, k < rest, usable, cols == target_col, *grad_args, True, True)


# --------------------------------------------------------------------------- launchers


def block_config(v: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``v`` logits: 1024-wide blocks for a small
    vocabulary (masked past ``v``), 4096-wide ones looped over a large one.

    Eight logits per thread keep every mode within ``REGISTER_BUDGET`` without spills, so
    three rows (two with label smoothing) are in flight per SM at 4096. 16
    per thread would cut the per-block reduction's share of the main loop (about 0.25
    instead of 0.33 warp instructions per logit forward), but needs 80 to 112 registers:
    fewer rows in flight for a loop that is memory-bound either way.
    """
    block_v = SMALL_VOCAB_BLOCK if v <= SMALL_VOCAB_BLOCK else LARGE_VOCAB_BLOCK
    return block_v, block_v // 256


def rows_per_wave(device: torch.device, v: int, dtype: torch.dtype, label_smoothing: float) -> int:
    """Rows of ``v`` logits of ``dtype`` the kernel runs at once on ``device`` (one program
    per row): SMs x programs resident per SM, as the warps and ``REGISTER_BUDGET`` allow
    (65536 registers and 64 warps per SM on sm_80 and sm_90); 1 off CUDA."""
    if device.type != "cuda":
        return 1
    block_v, num_warps = block_config(v)
    registers = REGISTER_BUDGET[block_v, torch.empty((), dtype=dtype).element_size(), label_smoothing > 0]
    per_sm = min(64 // num_warps, 65536 // (registers * 32 * num_warps))
    return torch.cuda.get_device_properties(device).multi_processor_count * max(1, per_sm)


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
    if backward and n > 1 and grad.stride(0) != logits.stride(0):
        raise ValueError("cross_entropy: the gradient must be laid out like the logits (the same row stride)")
    block_v, num_warps = block_config(v)
    # Outputs a mode does not write are never touched (constexpr flags); any tensor stands in.
    _cross_entropy_kernel[(n,)](
        logits, grad if backward else logits, target, loss if forward else nll, nll,
        grad_scale if backward else nll,
        logits.stride(0), grad_scale.stride(0) if backward and grad_scale.dim() else 0,
        v, ignore_index, label_smoothing, z_loss,
        BLOCK_V=block_v, ALIGN=16 // logits.element_size(), SMOOTHING=label_smoothing > 0, FORWARD=forward,
        BACKWARD=backward,
        num_warps=num_warps,
    )
    return loss, nll


def _empty_rows_like(logits: Tensor) -> Tensor:
    """An uninitialised tensor with the row layout of ``logits`` (N, V): the kernel reads
    and writes the rows of both through one row stride."""
    return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)


def cross_entropy_forward(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float) -> tuple[Tensor, Tensor]:
    """Per-row ``loss`` and the saved ``r = lse - c`` (fp32, (N,); 0 for ignored rows) for
    logits (N, V) with unit column stride and contiguous int64 targets (N,)."""
    return _launch(logits, target, None, None, None, ignore_index, label_smoothing, z_loss)


def cross_entropy_backward(logits: Tensor, target: Tensor, nll: Tensor, grad_scale: Tensor, ignore_index: int,
                           label_smoothing: float, z_loss: float, out: Optional[Tensor] = None) -> Tensor:
    """The gradient of ``sum_i grad_scale_i * loss_i`` with respect to the logits (N, V), in
    their dtype and row layout, from the forward's saved ``r``; written to ``out`` (laid out
    like ``logits``, or ``logits`` itself: in place) or a new tensor. ``grad_scale``: fp32,
    0-dim (all rows alike) or (N,)."""
    grad = _empty_rows_like(logits) if out is None else out
    _launch(logits, target, nll, grad, grad_scale, ignore_index, label_smoothing, z_loss)
    return grad


def cross_entropy_forward_backward_(logits: Tensor, target: Tensor, grad_scale: Tensor, ignore_index: int,
                                    label_smoothing: float, z_loss: float) -> tuple[Tensor, Tensor]:
    """Both in one launch: returns per-row ``loss`` and ``r`` and OVERWRITES ``logits`` with
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
    return _empty_rows_like(logits)


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
        if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
            rows = rows.contiguous()  # overlapping rows (an expanded view): the gradient needs its own
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
