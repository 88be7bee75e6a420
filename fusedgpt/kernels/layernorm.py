r"""Fused LayerNorm and RMSNorm, alone or after the residual add of a pre-norm block.

One pair of kernels serves both norms; a constexpr ``CENTERED`` says whether the row's mean
is subtracted (LayerNorm) or not (RMSNorm, whose public functions live in ``rms_norm.py``).
Forward, per row of N features (any leading shape is flattened to M rows):

    s     = x + r                     (the add_ variants; stored in r's dtype)
    mean  = sum(s) / N                (LayerNorm; 0 for RMSNorm)
    rstd  = 1 / sqrt(sum((s - mean)^2) / N + eps)
    xhat  = (s - mean) * rstd
    y     = xhat * (w + offset) + b   (offset = 0 for LayerNorm; b only for LayerNorm)

Statistics are computed and kept in fp32 whatever the input dtypes. Inputs may differ in
dtype (under autocast: a bf16 branch output x, an fp32 residual stream r): ``summed`` has
r's dtype and ``y`` has ``out_dtype`` (default x's). The normalisation uses the sum *after*
rounding to r's dtype, so ``y`` is exactly the norm of the ``summed`` the caller gets back.

Backward, with ``g = (w + offset) * dy``:

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))   (the mean(g) term: LayerNorm only)
         + d summed                                      (the gradient from the stream)
    dw = sum over rows of dy * xhat
    db = sum over rows of dy

``dx`` goes to both ``x`` and ``residual``, written once in each one's dtype. ``dw`` and
``db`` are reduced in two deterministic stages, without atomics: each of G persistent
programs owns a slice of the rows and accumulates an fp32 partial sum (G, N); the partials
are then summed over G. With a single block per row, each program loads the weight once,
before its loop over rows.

Saved for backward: the normalised input (``x``, or ``summed``), the weight, and the fp32
``rstd`` (and ``mean`` for LayerNorm), M floats each; ``xhat`` is recomputed, never stored.

Both kernels are persistent (a fixed number of programs, each looping over its rows), so
with one block per row the weight (and bias) is read once per program, not once per row.
IO per row, when the row fits one block (N <= 4096): forward reads x (and r) once and
writes y (and s) once; backward reads s and dy (and d summed) once and writes dx (and, when
x's dtype differs from r's, dx again in x's dtype). Per element of a GPT-2 block under bf16
autocast that is 2 + 4 bytes read and 4 + 2 written forward. Wider rows (up to any N) are
processed in chunks of 4096 in a loop: the forward then reads its input twice (for
LayerNorm, Chan's parallel variance in the first pass; normalisation in the second) and the
backward reads s and dy twice.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels import reference
from fusedgpt.kernels.checks import (
    as_rows, check_float, check_number, check_out_dtype, check_same_device, float64_unsupported,
)
from fusedgpt.kernels.triton_compat import tl, triton

Tensor = torch.Tensor

MAX_BLOCK_N = 4096


# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_input(X, R, S, x_row, r_row, s_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One chunk of the row to normalise, as fp32. With a residual, also stores x + r
    (rounded to the stream's dtype, then used as rounded)."""
    x = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + r_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + s_row + cols, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _load_weight(W, cols, mask, weight_offset):
    """fp32 ``w + offset`` (Gemma stores RMSNorm weights as offsets from 1)."""
    return tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset


@triton.jit
def _load_affine(W, B, cols, mask, weight_offset, HAS_BIAS: tl.constexpr):
    """fp32 ``(w + offset, b)`` for a chunk of columns (``b`` is ``w`` itself, unused,
    without a bias)."""
    w = _load_weight(W, cols, mask, weight_offset)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32) if HAS_BIAS else w
    return w, b


@triton.jit
def _normalize_and_store(x, mean, rstd, w, b, Y, y_row, cols, mask, HAS_BIAS: tl.constexpr):
    y = (x - mean) * rstd * w
    if HAS_BIAS:
        y += b
    tl.store(Y + y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_s,
    M, N, eps, weight_offset,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    CENTERED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # Persistent: program p normalises rows p, p + G, p + 2G, ... With one block per row
    # the weight and bias are loaded once per program, before the loop, so the loop moves
    # only the rows themselves.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        w, b = _load_affine(W, B, cols, mask, weight_offset, HAS_BIAS)
        inv_n = 1.0 / N  # one division per program; the loop multiplies
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            x = _load_input(X, R, S, row64 * stride_x, row64 * stride_r, row64 * stride_s, cols, mask, HAS_RESIDUAL)
            if CENTERED:
                mean = tl.sum(x, axis=0) * inv_n
                deviation = tl.where(mask, x - mean, 0.0)
            else:
                mean = 0.0
                deviation = x  # masked columns loaded as 0
            rstd = tl.math.rsqrt(tl.sum(deviation * deviation, axis=0) * inv_n + eps)
            _normalize_and_store(x, mean, rstd, w, b, Y, row64 * stride_y, cols, mask, HAS_BIAS)
            if CENTERED:
                tl.store(MEAN + row64, mean)
            tl.store(RSTD + row64, rstd)
    else:
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            x_row, r_row, y_row, s_row = row64 * stride_x, row64 * stride_r, row64 * stride_y, row64 * stride_s
            # Pass 1: the sum of squared deviations. LayerNorm merges per-chunk means and
            # deviations (Chan et al.), which stays accurate where sum(x^2) - N mean^2
            # would cancel; RMSNorm's deviations are from 0, so it just sums squares.
            mean = 0.0
            m2 = 0.0
            count = 0.0
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = _load_input(X, R, S, x_row, r_row, s_row, start + cols, mask, HAS_RESIDUAL)
                if CENTERED:
                    chunk_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                    chunk_mean = tl.sum(x, axis=0) / chunk_count
                    deviation = tl.where(mask, x - chunk_mean, 0.0)
                    delta = chunk_mean - mean
                    total = count + chunk_count
                    mean += delta * chunk_count / total
                    m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * count * chunk_count / total
                    count = total
                else:
                    m2 += tl.sum(x * x, axis=0)
            rstd = tl.math.rsqrt(m2 / N + eps)
            # Pass 2: normalise; with a residual, read back the rounded sum stored in pass 1.
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                if HAS_RESIDUAL:
                    x = tl.load(S + s_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(X + x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w, b = _load_affine(W, B, start + cols, mask, weight_offset, HAS_BIAS)
                _normalize_and_store(x, mean, rstd, w, b, Y, y_row, start + cols, mask, HAS_BIAS)
            if CENTERED:
                tl.store(MEAN + row64, mean)
            tl.store(RSTD + row64, rstd)


@triton.jit
def _input_grad_terms(DY, X, dy_row, x_row, cols, mask, w, mean, rstd):
    """fp32 (dy, xhat, w * dy) for one chunk of a row; ``w`` is the chunk's loaded
    ``weight + offset``. Outside the mask dy and w * dy are 0, so xhat (not 0 there) adds
    nothing to the row's sums nor to dw, and is never stored."""
    dy = tl.load(DY + dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    return dy, (x - mean) * rstd, w * dy


@triton.jit
def _store_input_grad(
    DX, DSUM, DBRANCH, dx_row, dsum_row, dbranch_row, cols, mask, g, xhat, c1, c2, rstd,
    HAS_DSUM: tl.constexpr, HAS_DBRANCH: tl.constexpr,
):
    dx = (g - (xhat * c1 + c2)) * rstd
    if HAS_DSUM:
        dx += tl.load(DSUM + dsum_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DBRANCH:  # the branch x has its own dtype: the same gradient, rounded to it
        tl.store(DBRANCH + dbranch_row + cols, dx.to(DBRANCH.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats(MEAN, RSTD, row, CENTERED: tl.constexpr):
    mean = tl.load(MEAN + row) if CENTERED else 0.0
    return mean, tl.load(RSTD + row)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DSUM, DX, DBRANCH, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_x, stride_dsum, stride_dx, stride_dbranch,
    M, N, weight_offset,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    CENTERED: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_DBRANCH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # Persistent: program p takes rows p, p + G, p + 2G, ... and owns row p of the partials.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    partial_row = pid.to(tl.int64) * N
    if ONE_BLOCK:
        mask = cols < N
        w = _load_weight(W, cols, mask, weight_offset)  # once for all of this program's rows
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        inv_n = 1.0 / N
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            mean, rstd = _row_stats(MEAN, RSTD, row64, CENTERED)
            dy, xhat, g = _input_grad_terms(DY, X, row64 * stride_dy, row64 * stride_x, cols, mask, w, mean, rstd)
            c1 = tl.sum(g * xhat, axis=0) * inv_n
            c2 = tl.sum(g, axis=0) * inv_n if CENTERED else 0.0
            _store_input_grad(DX, DSUM, DBRANCH, row64 * stride_dx, row64 * stride_dsum, row64 * stride_dbranch,
                              cols, mask, g, xhat, c1, c2, rstd, HAS_DSUM, HAS_DBRANCH)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        tl.store(DW_PARTIAL + partial_row + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + partial_row + cols, db_acc, mask=mask)
    else:
        # The partials start at zero (the launcher allocates them so) and only this program
        # touches its row, so read-add-write is deterministic.
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            mean, rstd = _row_stats(MEAN, RSTD, row64, CENTERED)
            dy_row, x_row = row64 * stride_dy, row64 * stride_x
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                w = _load_weight(W, start + cols, mask, weight_offset)
                dy, xhat, g = _input_grad_terms(DY, X, dy_row, x_row, start + cols, mask, w, mean, rstd)
                c1 += tl.sum(g * xhat, axis=0)
                if CENTERED:
                    c2 += tl.sum(g, axis=0)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                w = _load_weight(W, start + cols, mask, weight_offset)
                dy, xhat, g = _input_grad_terms(DY, X, dy_row, x_row, start + cols, mask, w, mean, rstd)
                _store_input_grad(DX, DSUM, DBRANCH, row64 * stride_dx, row64 * stride_dsum,
                                  row64 * stride_dbranch, start + cols, mask, g, xhat, c1, c2, rstd,
                                  HAS_DSUM, HAS_DBRANCH)
                dw_ptrs = DW_PARTIAL + partial_row + start + cols
                tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    db_ptrs = DB_PARTIAL + partial_row + start + cols
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=mask, other=0.0) + dy, mask=mask)


# --------------------------------------------------------------------------- launchers


def block_config(n: int) -> tuple[int, int, bool]:
    """``(BLOCK_N, num_warps, ONE_BLOCK)`` for rows of ``n`` features.

    Block sizes are powers of two from 128 to 4096 (narrower rows are masked), with at most
    8 elements of a row per thread, which keeps the backward's live fp32 vectors in
    registers (see the compile report); rows wider than 4096 loop over 4096-wide chunks.
    """
    block_n = min(max(triton.next_power_of_2(n), 128), MAX_BLOCK_N)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps, n <= MAX_BLOCK_N


def resident_programs(device: torch.device, rows: int, num_warps: int) -> int:
    """How many programs a persistent row loop launches: 32 warps per SM (half of what
    sm_80 and sm_90 hold; at up to 64 registers per thread, as the compile report shows,
    all of them are resident at once, so no program waits for a second wave), at most one
    per row. Off CUDA (the interpreter, meta tensors) a few, as for the backward's reduction."""
    if device.type != "cuda":
        return _backend.num_programs_for_reduction(device, rows)
    per_sm = max(1, 32 // num_warps)
    return max(1, min(rows, per_sm * torch.cuda.get_device_properties(device).multi_processor_count))


def launch_configs() -> list[tuple[int, int, bool]]:
    """Every ``block_config`` the launchers can pick (for the compile report)."""
    sizes = [128 << i for i in range((MAX_BLOCK_N // 128).bit_length())]
    configs = [block_config(n) for n in sizes] + [block_config(MAX_BLOCK_N + 1)]
    return sorted(set(configs), key=lambda c: (not c[2], c[0]))


def layer_norm_forward(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
    centered: bool, weight_offset: float, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward on rows ``x`` (M, N) (and ``residual``, same shape, any float
    dtype), both with unit column stride.

    Returns ``y`` (M, N) in ``out_dtype``, ``summed`` (M, N) in the residual's dtype (empty
    without a residual), and the fp32 ``mean`` (M,) (empty unless ``centered``) and
    ``rstd`` (M,).
    """
    m, n = x.shape
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(residual, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    mean = torch.empty(m if centered else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, summed, mean, rstd
    block_n, num_warps, one_block = block_config(n)
    # Absent optional tensors are never read (the constexpr flags are off); others stand in.
    _layer_norm_fwd_kernel[(resident_programs(x.device, m, num_warps),)](
        x, residual if residual is not None else x, weight, bias if bias is not None else weight,
        y, summed if residual is not None else y, mean if centered else rstd, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        summed.stride(0) if residual is not None else 0,
        m, n, eps, weight_offset,
        BLOCK_N=block_n, ONE_BLOCK=one_block, CENTERED=centered,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return y, summed, mean, rstd


def layer_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, dsummed: Optional[Tensor],
    centered: bool, weight_offset: float, has_bias: bool, branch_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward for rows ``x`` (M, N), the input that was normalised.

    Returns ``dx`` (M, N) in x's dtype (plus ``dsummed`` when given); ``dbranch``, the same
    gradient in ``branch_dtype`` (empty when that is None); and fp32 ``dweight`` and
    ``dbias`` (N,) (``dbias`` empty when ``has_bias`` is false).
    """
    m, n = x.shape
    dx = torch.empty_like(x)
    dbranch = torch.empty(m, n, dtype=branch_dtype, device=x.device) if branch_dtype is not None else dx.new_empty(0)
    if m == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=x.device)
        return dx, dbranch, zeros, zeros.clone() if has_bias else zeros.new_empty(0)
    block_n, num_warps, one_block = block_config(n)
    programs = _backend.num_programs_for_reduction(x.device, m)
    dw_partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device)
    db_partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device) if has_bias else dw_partial
    _layer_norm_bwd_kernel[(programs,)](
        dy, x, weight, mean if centered else rstd, rstd, dsummed if dsummed is not None else dy, dx,
        dbranch if branch_dtype is not None else dx, dw_partial, db_partial,
        dy.stride(0), x.stride(0), dsummed.stride(0) if dsummed is not None else 0, dx.stride(0),
        dbranch.stride(0) if branch_dtype is not None else 0,
        m, n, weight_offset,
        BLOCK_N=block_n, ONE_BLOCK=one_block, CENTERED=centered, HAS_DSUM=dsummed is not None,
        HAS_DBRANCH=branch_dtype is not None, HAS_BIAS=has_bias,
        num_warps=num_warps,
    )
    dbias = db_partial.sum(0) if has_bias else dw_partial.new_empty(0)
    return dx, dbranch, dw_partial.sum(0), dbias


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
    centered: bool, weight_offset: float, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_forward(x, residual, weight, bias, eps, centered, weight_offset, out_dtype)


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, centered, weight_offset, out_dtype):
    m, n = x.shape
    rstd = x.new_empty(m, dtype=torch.float32)
    summed = residual.new_empty(m, n) if residual is not None else x.new_empty(0)
    return x.new_empty(m, n, dtype=out_dtype), summed, rstd.new_empty(m if centered else 0), rstd


@torch.library.custom_op("fusedgpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, dsummed: Optional[Tensor],
    centered: bool, weight_offset: float, has_bias: bool, branch_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_backward(dy, x, weight, mean, rstd, dsummed, centered, weight_offset, has_bias, branch_dtype)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, dsummed, centered, weight_offset, has_bias, branch_dtype):
    m, n = x.shape
    dw = x.new_empty(n, dtype=torch.float32)
    dbranch = x.new_empty(m, n, dtype=branch_dtype) if branch_dtype is not None else x.new_empty(0)
    return torch.empty_like(x), dbranch, dw, dw.new_empty(n if has_bias else 0)


# --------------------------------------------------------------------------- autograd


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, centered, weight_offset, out_dtype):
        rows = as_rows(x)
        y, summed, mean, rstd = torch.ops.fusedgpt.layer_norm_fwd(
            rows, None if residual is None else as_rows(residual), weight.contiguous(),
            None if bias is None else bias.contiguous(), eps, centered, weight_offset, out_dtype,
        )
        ctx.save_for_backward(rows if residual is None else summed, weight.contiguous(), mean, rstd)
        # The branch gradient needs its own copy only when x and the stream differ in dtype.
        branch_dtype = x.dtype if residual is not None and residual.dtype != x.dtype else None
        ctx.params = (x.shape, x.dtype, residual is not None, bias is not None, centered, weight_offset,
                      branch_dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        if residual is None:
            ctx.mark_non_differentiable(summed)
            return y.view(x.shape), summed
        return y.view(x.shape), summed.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dsummed):
        normalized_input, weight, mean, rstd = ctx.saved_tensors
        (shape, x_dtype, has_residual, has_bias, centered, weight_offset,
         branch_dtype, weight_dtype, bias_dtype) = ctx.params
        dsummed_rows = as_rows(dsummed) if has_residual and dsummed is not None else None
        if dy is None:  # only the residual stream was used downstream
            if dsummed_rows is None:
                return None, None, None, None, None, None, None, None
            dstream = dsummed_rows.view(shape)
            return dstream.to(x_dtype), dstream, None, None, None, None, None, None
        dx, dbranch, dweight, dbias = torch.ops.fusedgpt.layer_norm_bwd(
            as_rows(dy), normalized_input, weight, mean, rstd, dsummed_rows, centered, weight_offset,
            has_bias, branch_dtype,
        )
        dx = dx.view(shape)
        return (
            dbranch.view(shape) if branch_dtype is not None else dx,
            dx if has_residual else None,
            dweight.to(weight_dtype),
            dbias.to(bias_dtype) if has_bias else None,
            None, None, None, None,
        )


# --------------------------------------------------------------------------- public


def _check(op: str, x, residual, weight, bias, eps, weight_offset, out_dtype) -> tuple[float, float, torch.dtype]:
    """Raises on bad input; returns ``(eps, weight_offset, out_dtype)`` resolved."""
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if residual is not None:
        check_float(op, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if bias is not None:
        check_float(op, "bias", bias)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the normalised one)")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{op}: x's last dimension must be at least 1")
    if weight.shape != (n,):
        raise ValueError(f"{op}: weight must have shape ({n},) to match x's last dimension, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},) to match x's last dimension, got {tuple(bias.shape)}")
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)
    eps = check_number(op, "eps", eps, above=0.0)
    weight_offset = check_number(op, "offset", weight_offset)
    return eps, weight_offset, check_out_dtype(op, out_dtype, x.dtype)


def normalize(
    op: str, x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float, *,
    centered: bool, weight_offset: float, out_dtype: Optional[torch.dtype], backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    """Check, then run LayerNorm (``centered``) or RMSNorm on the chosen path; returns
    ``(normed, summed)`` (``summed`` is x itself without a residual). Shared by the public
    functions here and in ``rms_norm.py``."""
    eps, weight_offset, out_dtype = _check(op, x, residual, weight, bias, eps, weight_offset, out_dtype)
    tensors = (x, residual, weight, bias)
    unsupported = float64_unsupported(*tensors) or (
        "float64 output runs on the reference path only" if out_dtype == torch.float64 else None
    )
    path = _backend.choose(op, backend, tensors, unsupported=unsupported)
    if path == "triton":
        return _NormFunction.apply(x, residual, weight, bias, eps, centered, weight_offset, out_dtype)
    if centered:
        if residual is None:
            return reference.layer_norm(x, weight, bias, eps, out_dtype=out_dtype), x
        return reference.add_layer_norm(x, residual, weight, bias, eps, out_dtype=out_dtype)
    if residual is None:
        return reference.rms_norm(x, weight, eps, offset=weight_offset, out_dtype=out_dtype), x
    return reference.add_rms_norm(x, residual, weight, eps, offset=weight_offset, out_dtype=out_dtype)


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """LayerNorm over the last dimension.

    Args:
        x: (..., N) float32, float16 or bfloat16 (float64 on the reference path); any strides.
        weight: (N,) float, on x's device (its dtype may differ from x's, e.g. fp32 master
            weights with fp16 activations).
        bias: (N,) or None.
        eps: added to the variance; > 0.
        out_dtype: the output's dtype (default x's): e.g. bf16 for the next matmul while
            x is an fp32 residual stream.
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        (..., N) in ``out_dtype``. Mean and variance are computed in fp32.
    """
    y, _ = normalize("layer_norm", x, None, weight, bias, eps, centered=True, weight_offset=0.0,
                     out_dtype=out_dtype, backend=backend)
    return y


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``summed = x + residual`` and ``layer_norm(summed)`` in one pass.

    Args:
        x: (..., N) the branch output, float32, float16 or bfloat16.
        residual: (..., N) the residual stream; its dtype may differ from x's (under
            autocast: x bf16, residual fp32), the sum is computed in fp32.
        weight, bias, eps, backend: as in :func:`layer_norm`.
        out_dtype: the dtype of ``normed`` (default x's dtype).

    Returns:
        ``(normed, summed)``, both (..., N): ``normed`` in ``out_dtype``, ``summed`` in the
        residual's dtype. Gradients reach ``x`` and ``residual`` through both outputs.
    """
    return normalize("add_layer_norm", x, residual, weight, bias, eps, centered=True, weight_offset=0.0,
                     out_dtype=out_dtype, backend=backend)


# --------------------------------------------------------------------------- compile report


def norm_variants(op: str, dtype: torch.dtype, workload, centered: bool) -> list:
    """The compile report's builds of a norm (``centered``: LayerNorm, else RMSNorm) at
    ``workload``'s width, recorded from the launchers on meta tensors, forward and backward:

    - the norm alone on ``dtype`` rows with fp32 weights (as under autocast): the peers'
      case, so the one compared with them (a pre-norm model's first norm runs this kernel
      on its fp32 stream);
    - the add + norm of every later block of a pre-norm model as it trains under autocast:
      a ``dtype`` branch added to the fp32 residual stream, fp32 weights, ``normed`` in
      ``dtype`` (half dtypes also write the branch's gradient in its own dtype).
    """
    import dataclasses
    import sys

    from fusedgpt.kernels import compile_report as cr

    m, n = workload.tokens, workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    mixed = dtype != torch.float32
    stats = (8 if centered else 4) / n  # the fp32 mean and rstd of each row, per element
    rstd = cr.meta_tensor(m, dtype=torch.float32)
    mean = rstd if centered else rstd[:0]
    module = sys.modules[__name__]
    found = []
    for has_residual in (False, True):
        stream_dtype = torch.float32 if has_residual else dtype
        rows, dy = cr.meta_tensor(m, n, dtype=stream_dtype), cr.meta_tensor(m, n, dtype=dtype)
        weight = cr.meta_tensor(n, dtype=torch.float32)
        bias = weight if centered else None
        x, residual = (cr.meta_tensor(m, n, dtype=dtype), rows) if has_residual else (rows, None)
        with cr.launches(module, "_layer_norm_fwd_kernel") as forward:
            layer_norm_forward(x, residual, weight, bias, 1e-5, centered, 0.0, dtype)
        with cr.launches(module, "_layer_norm_bwd_kernel") as backward:
            layer_norm_backward(dy, rows, weight, mean, rstd, rows if has_residual else None, centered, 0.0,
                                centered, dtype if has_residual and mixed else None)
        # Minimum bytes per element. Forward: read x (and the stream), write the output (and
        # the sum). Backward: read dy and the normalised rows (and d summed), write their
        # gradient (and the branch's, in its dtype).
        if has_residual:
            min_bytes = {"fwd": 2 * item + 8 + stats, "bwd": item + 12 + (item if mixed else 0) + stats}
        else:
            min_bytes = {"fwd": 2 * item + stats, "bwd": 3 * item + stats}
        for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0])):
            # Both loop over rows; a row wider than one block is a loop over BLOCK_N chunks.
            per_iteration = n if launch.args["ONE_BLOCK"] else launch.args["BLOCK_N"]
            variant = cr.jit_variant(
                op, pass_, launch, workload=workload,
                show=("BLOCK_N", "ONE_BLOCK", "HAS_RESIDUAL" if pass_ == "fwd" else "HAS_DSUM"),
                work=cr.Work("element", per_iteration, min_bytes[pass_], loops="sequence"),
            )
            # Labelled by the activations' dtype, although the first tensor may be the stream.
            found.append(dataclasses.replace(variant, config={**variant.config, "dtype": str(dtype).removeprefix("torch.")}))
    return found


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """LayerNorm at ``workload``'s width (default gpt2): see :func:`norm_variants`."""
    from fusedgpt.kernels import compile_report as cr

    return norm_variants("layernorm", dtype, workload or cr.WORKLOADS["gpt2"], centered=True)
