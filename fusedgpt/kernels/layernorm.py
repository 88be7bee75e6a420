r"""Fused LayerNorm, and the residual add + LayerNorm of a pre-LN transformer block.

Forward, per row of N features (any leading shape is flattened to M rows):

    s     = x + r                        (add_layer_norm only; stored in x's dtype)
    mean  = sum(s) / N
    rstd  = 1 / sqrt(sum((s - mean)^2) / N + eps)
    xhat  = (s - mean) * rstd
    y     = xhat * w + b

Statistics are computed and kept in fp32 whatever the input dtype. The normalisation uses
the sum *after* rounding to the input dtype, so ``y`` is exactly ``layer_norm(summed)`` of
the ``summed`` tensor the caller gets back.

Backward, with ``g = w * dy``:

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))   (+ d summed, the gradient that
                                                          reaches the residual stream)
    dw = sum over rows of dy * xhat
    db = sum over rows of dy

``dx`` goes to both ``x`` and ``residual``. ``dw`` and ``db`` are reduced in two
deterministic stages, without atomics: each of G persistent programs owns a slice of the
rows and accumulates an fp32 partial sum (G, N); the partials are then summed over G.

Saved for backward: the normalised input (``x``, or ``summed``), the weight, and the fp32
``mean`` and ``rstd`` (2 x M floats); ``xhat`` is recomputed, never stored.

IO per row, when the row fits one block (N <= 4096): forward reads x (and r) once and
writes y (and s) once; backward reads x and dy once and writes dx. Wider rows (up to any
N) are processed in chunks of 4096 in a loop: the forward then reads its input twice
(Chan's parallel variance in the first pass, normalisation in the second) and the backward
reads x and dy twice.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels.checks import as_rows, check_float, check_number, check_same_device, float64_unsupported

Tensor = torch.Tensor

MAX_BLOCK_N = 4096


# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_input(X, R, S, x_row, r_row, s_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One chunk of the row to normalise, as fp32. With a residual, also stores x + r
    (rounded to the storage dtype, then used as rounded)."""
    x = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + r_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + s_row + cols, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _normalize_and_store(x, mean, rstd, W, B, Y, y_row, cols, mask, HAS_BIAS: tl.constexpr):
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_s,
    N, eps,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row, y_row, s_row = row * stride_x, row * stride_r, row * stride_y, row * stride_s
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        x = _load_input(X, R, S, x_row, r_row, s_row, cols, mask, HAS_RESIDUAL)
        mean = tl.sum(x, axis=0) / N
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
        _normalize_and_store(x, mean, rstd, W, B, Y, y_row, cols, mask, HAS_BIAS)
    else:
        # Pass 1: mean and sum of squared deviations, merged chunk by chunk (Chan et al.),
        # which stays accurate where sum(x^2) - N mean^2 would cancel.
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = _load_input(X, R, S, x_row, r_row, s_row, start + cols, mask, HAS_RESIDUAL)
            chunk_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(x, axis=0) / chunk_count
            centered = tl.where(mask, x - chunk_mean, 0.0)
            delta = chunk_mean - mean
            total = count + chunk_count
            mean += delta * chunk_count / total
            m2 += tl.sum(centered * centered, axis=0) + delta * delta * count * chunk_count / total
            count = total
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: normalise; with a residual, read back the rounded sum stored in pass 1.
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            if HAS_RESIDUAL:
                x = tl.load(S + s_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            _normalize_and_store(x, mean, rstd, W, B, Y, y_row, start + cols, mask, HAS_BIAS)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _input_grad_terms(DY, X, W, dy_row, x_row, cols, mask, mean, rstd):
    """fp32 (dy, xhat, w * dy) for one chunk of a row, zero outside the mask."""
    dy = tl.load(DY + dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    return dy, xhat, w * dy


@triton.jit
def _store_input_grad(DX, DSUM, dx_row, dsum_row, cols, mask, g, xhat, c1, c2, rstd, HAS_DSUM: tl.constexpr):
    dx = (g - (xhat * c1 + c2)) * rstd
    if HAS_DSUM:
        dx += tl.load(DSUM + dsum_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DSUM, DX, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_x, stride_dsum, stride_dx,
    M, N,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # Persistent: program p takes rows p, p + G, p + 2G, ... and owns row p of the partials.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    partial_row = pid.to(tl.int64) * N
    if ONE_BLOCK:
        mask = cols < N
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            dy, xhat, g = _input_grad_terms(DY, X, W, row64 * stride_dy, row64 * stride_x, cols, mask, mean, rstd)
            c1 = tl.sum(g * xhat, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            _store_input_grad(DX, DSUM, row64 * stride_dx, row64 * stride_dsum, cols, mask, g, xhat, c1, c2, rstd, HAS_DSUM)
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(DW_PARTIAL + partial_row + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + partial_row + cols, db_acc, mask=mask)
    else:
        # The partials start at zero (the launcher allocates them so) and only this program
        # touches its row, so read-add-write is deterministic.
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            dy_row, x_row = row64 * stride_dy, row64 * stride_x
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                dy, xhat, g = _input_grad_terms(DY, X, W, dy_row, x_row, start + cols, mask, mean, rstd)
                c1 += tl.sum(g * xhat, axis=0)
                c2 += tl.sum(g, axis=0)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                dy, xhat, g = _input_grad_terms(DY, X, W, dy_row, x_row, start + cols, mask, mean, rstd)
                _store_input_grad(DX, DSUM, row64 * stride_dx, row64 * stride_dsum, start + cols, mask, g, xhat, c1, c2, rstd, HAS_DSUM)
                dw_ptrs = DW_PARTIAL + partial_row + start + cols
                tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    db_ptrs = DB_PARTIAL + partial_row + start + cols
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=mask, other=0.0) + dy, mask=mask)


# --------------------------------------------------------------------------- launchers


def block_config(n: int) -> tuple[int, int, bool]:
    """``(BLOCK_N, num_warps, ONE_BLOCK)`` for rows of ``n`` features.

    Block sizes are powers of two from 128 to 4096 (narrower rows are masked), with at most
    8 elements of a row per thread, which keeps the backward's six live fp32 vectors in
    registers (see the compile report); rows wider than 4096 loop over 4096-wide chunks.
    """
    block_n = min(max(triton.next_power_of_2(n), 128), MAX_BLOCK_N)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps, n <= MAX_BLOCK_N


def launch_configs() -> list[tuple[int, int, bool]]:
    """Every ``block_config`` the launchers can pick (for the compile report)."""
    sizes = [128 << i for i in range((MAX_BLOCK_N // 128).bit_length())]
    configs = [block_config(n) for n in sizes] + [block_config(MAX_BLOCK_N + 1)]
    return sorted(set(configs), key=lambda c: (not c[2], c[0]))


def layer_norm_forward(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward on rows ``x`` (M, N) with unit column stride.

    Returns ``y`` (M, N) in x's dtype, ``summed`` (M, N) (empty without a residual), and the
    fp32 ``mean`` and ``rstd`` (M,).
    """
    m, n = x.shape
    y = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, summed, mean, rstd
    block_n, num_warps, one_block = block_config(n)
    # Absent optional tensors are never read (the constexpr flags are off); x stands in.
    _layer_norm_fwd_kernel[(m,)](
        x, residual if residual is not None else x, weight, bias if bias is not None else weight,
        y, summed if residual is not None else y, mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        summed.stride(0) if residual is not None else 0,
        n, eps,
        BLOCK_N=block_n, ONE_BLOCK=one_block,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return y, summed, mean, rstd


def layer_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    dsummed: Optional[Tensor], has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward for rows ``x`` (M, N), the input that was normalised.

    Returns ``dx`` (M, N) in x's dtype (plus ``dsummed`` when given), and fp32 ``dweight``
    and ``dbias`` (N,) (``dbias`` empty when ``has_bias`` is false).
    """
    m, n = x.shape
    dx = torch.empty_like(x)
    if m == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone() if has_bias else zeros.new_empty(0)
    block_n, num_warps, one_block = block_config(n)
    programs = _backend.num_programs_for_reduction(x.device, m)
    dw_partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device)
    db_partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device) if has_bias else dw_partial
    _layer_norm_bwd_kernel[(programs,)](
        dy, x, weight, mean, rstd, dsummed if dsummed is not None else dy, dx, dw_partial, db_partial,
        dy.stride(0), x.stride(0), dsummed.stride(0) if dsummed is not None else 0, dx.stride(0),
        m, n,
        BLOCK_N=block_n, ONE_BLOCK=one_block, HAS_DSUM=dsummed is not None, HAS_BIAS=has_bias,
        num_warps=num_warps,
    )
    dbias = db_partial.sum(0) if has_bias else dw_partial.new_empty(0)
    return dx, dw_partial.sum(0), dbias


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_forward(x, residual, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    m = x.shape[0]
    stats = x.new_empty(m, dtype=torch.float32)
    summed = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), summed, stats, torch.empty_like(stats)


@torch.library.custom_op("fusedgpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    dsummed: Optional[Tensor], has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return layer_norm_backward(dy, x, weight, mean, rstd, dsummed, has_bias)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, dsummed, has_bias):
    n = x.shape[1]
    dw = x.new_empty(n, dtype=torch.float32)
    return torch.empty_like(x), dw, x.new_empty(n if has_bias else 0, dtype=torch.float32)


# --------------------------------------------------------------------------- autograd


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        rows = as_rows(x)
        y, summed, mean, rstd = torch.ops.fusedgpt.layer_norm_fwd(
            rows, None if residual is None else as_rows(residual), weight.contiguous(),
            None if bias is None else bias.contiguous(), eps,
        )
        ctx.save_for_backward(rows if residual is None else summed, weight.contiguous(), mean, rstd)
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None
        ctx.shape = x.shape
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        if residual is None:
            ctx.mark_non_differentiable(summed)
            return y.view(x.shape), summed
        return y.view(x.shape), summed.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dsummed):
        normalized_input, weight, mean, rstd = ctx.saved_tensors
        dsummed_rows = as_rows(dsummed) if ctx.has_residual and dsummed is not None else None
        if dy is None:  # only the residual stream was used downstream
            dx = dsummed_rows.view(ctx.shape) if dsummed_rows is not None else None
            return dx, dx, None, None, None
        dx, dweight, dbias = torch.ops.fusedgpt.layer_norm_bwd(
            as_rows(dy), normalized_input, weight, mean, rstd, dsummed_rows, ctx.has_bias
        )
        dx = dx.view(ctx.shape)
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            dx,
            dx if ctx.has_residual else None,
            dweight.to(weight_dtype),
            dbias.to(bias_dtype) if ctx.has_bias else None,
            None,
        )


# --------------------------------------------------------------------------- public


def _check(op: str, x, residual, weight, bias, eps) -> float:
    """Raises on bad input; returns ``eps`` as a float."""
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if residual is not None:
        check_float(op, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
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
    return check_number(op, "eps", eps, above=0.0)


def _dispatch(op, x, residual, weight, bias, eps, backend) -> tuple[Tensor, Tensor]:
    eps = _check(op, x, residual, weight, bias, eps)
    tensors = (x, residual, weight, bias)
    path = _backend.choose(op, backend, tensors, unsupported=float64_unsupported(*tensors))
    if path == "triton":
        return _LayerNormFunction.apply(x, residual, weight, bias, eps)
    from fusedgpt.kernels import reference

    if residual is None:
        return reference.layer_norm(x, weight, bias, eps), x
    return reference.add_layer_norm(x, residual, weight, bias, eps)


def layer_norm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: Optional[str] = None
) -> Tensor:
    """LayerNorm over the last dimension.

    Args:
        x: (..., N) float32, float16 or bfloat16 (float64 on the reference path); any strides.
        weight: (N,) float, on x's device (its dtype may differ from x's, e.g. fp32 master
            weights with fp16 activations).
        bias: (N,) or None.
        eps: added to the variance; > 0.
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        (..., N) in x's dtype. Mean and variance are computed in fp32.
    """
    y, _ = _dispatch("layer_norm", x, None, weight, bias, eps, backend)
    return y


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``summed = x + residual`` and ``layer_norm(summed)`` in one pass.

    Args:
        x, residual: (..., N), same shape and dtype (float32, float16 or bfloat16).
        weight, bias, eps, backend: as in :func:`layer_norm`.

    Returns:
        ``(normed, summed)``, both (..., N) in x's dtype. Gradients reach ``x`` and
        ``residual`` through both outputs.
    """
    return _dispatch("add_layer_norm", x, residual, weight, bias, eps, backend)


# --------------------------------------------------------------------------- compile report


def aot_variants(dtype: torch.dtype) -> list:
    """Every (kernel, config) the launchers can pick for activations of ``dtype``, with all
    optional features on (residual, bias, incoming residual gradient): the heaviest
    specialisation of each config. Weights are taken as fp32 (master weights)."""
    from fusedgpt.kernels.compile_report import KernelVariant, pointer

    act, f32 = pointer(dtype), pointer(torch.float32)
    found = []
    for block_n, num_warps, one_block in launch_configs():
        config = dict(dtype=str(dtype).removeprefix("torch."), BLOCK_N=block_n, ONE_BLOCK=one_block)
        flags = dict(BLOCK_N=block_n, ONE_BLOCK=one_block, HAS_BIAS=True)
        found.append(KernelVariant(
            op="layernorm", kernel=_layer_norm_fwd_kernel,
            signature=dict(X=act, R=act, W=f32, B=f32, Y=act, S=act, MEAN=f32, RSTD=f32,
                           stride_x="i32", stride_r="i32", stride_y="i32", stride_s="i32",
                           N="i32", eps="fp32", BLOCK_N="constexpr", ONE_BLOCK="constexpr",
                           HAS_RESIDUAL="constexpr", HAS_BIAS="constexpr"),
            constexprs={**flags, "HAS_RESIDUAL": True},
            aligned=("X", "R", "W", "B", "Y", "S", "MEAN", "RSTD", "stride_x", "stride_r", "stride_y", "stride_s"),
            num_warps=num_warps, num_stages=1, config=config,
        ))
        found.append(KernelVariant(
            op="layernorm", kernel=_layer_norm_bwd_kernel,
            signature=dict(DY=act, X=act, W=f32, MEAN=f32, RSTD=f32, DSUM=act, DX=act,
                           DW_PARTIAL=f32, DB_PARTIAL=f32,
                           stride_dy="i32", stride_x="i32", stride_dsum="i32", stride_dx="i32",
                           M="i32", N="i32", BLOCK_N="constexpr", ONE_BLOCK="constexpr",
                           HAS_DSUM="constexpr", HAS_BIAS="constexpr"),
            constexprs={**flags, "HAS_DSUM": True},
            aligned=("DY", "X", "W", "MEAN", "RSTD", "DSUM", "DX", "DW_PARTIAL", "DB_PARTIAL",
                     "stride_dy", "stride_x", "stride_dsum", "stride_dx"),
            num_warps=num_warps, num_stages=1, config=config,
        ))
    return found
