r"""Fused flash attention (FlashAttention-2), forward and backward, with in-kernel dropout.

For one (batch, head) with queries Q (Tq, D), keys K and values V (Tk, D), scale c
(default 1/sqrt(D)) and the causal mask aligned to the bottom right (query i sees key j
iff j <= i + Tk - Tq, so with a KV cache the newest query sees every key):

    S = c Q K^T                      (Tq, Tk), masked entries -inf
    P = softmax(S) row-wise           rows that see no key (causal, Tq > Tk) are all 0
    Z = keep mask, P(keep) = 1 - p    (dropout; Z = 1 without it)
    O = (P * Z / (1 - p)) V
    L = logsumexp(S) row-wise         fp32; -inf for rows that see no key

Forward. Each program owns BLOCK_M query rows and streams BLOCK_N keys at a time, keeping a
running row max m, row sum l and unnormalised output acc (online softmax). Exponentials are
taken in base 2 with the scale folded into log2(e) (``exp(x) = exp2(x log2 e)``), which is
what the hardware computes natively. Key blocks that every row of the query block sees in
full are processed without masks; only the diagonal blocks (causal) and the ragged tail
(Tk not a block multiple) pay for the mask. Head dims up to 128 are padded to a 64- or
128-wide block whose extra columns are masked (loaded as 0, never stored).

Backward (FlashAttention-2): with dO the output gradient,

    dV    = (P * Z / (1 - p))^T dO
    dP    = (dO V^T) * Z / (1 - p)
    dS    = P * (dP - delta),   delta = rowsum(P * dP) = rowsum(dO * O)   (fp32)
    dQ    = c dS K,   dK = c dS^T Q

delta takes one small preprocess kernel (the second form: O is at hand, P is not). P is
recomputed from Q, K and the saved L (``P = exp2(S log2 e - L log2 e)``), never stored.
One kernel owns a key block and loops over the query blocks that see it, accumulating dK
and dV; a second owns a query block and loops over the key blocks it sees, accumulating
dQ. Both are deterministic (no atomics) and skip the blocks the causal mask hides.

Dropout draws Philox random numbers (the generator behind ``tl.rand``) keyed by ``seed``
with the counter (key j, query i, batch*head, 0): every element has its own counter, with
up to 2^32 positions per axis, and both backward kernels regenerate exactly the forward's
mask, so no mask is stored.

Dtypes. fp16 and bf16 inputs multiply on tensor cores (mma.sync on sm_80, wgmma on sm_90)
with fp32 accumulation; P and dS are rounded to the input dtype before their matmuls, as
in FlashAttention. fp32 inputs are computed in true fp32 (``input_precision="ieee"``: FMA
on CUDA cores, not TF32), so they match the reference to fp32 rounding but run without
tensor cores, on small tiles; use fp16/bf16 for speed. Statistics (m, l, L, delta) are
always fp32.

Saved for backward: q, k, v, o and L (B*H*Tq floats) — nothing with Tq x Tk elements.
IO per (batch, head): the forward reads Q once and K, V once per query block, and writes O
and L. The backward reads O and dO once (delta); the dK/dV kernel reads K, V once and Q,
dO once per key block; the dQ kernel reads Q, dO once and K, V once per query block.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels import reference
from fusedgpt.kernels.checks import (
    check_bool,
    check_float,
    check_number,
    check_same_device,
    float64_unsupported,
    with_unit_last_stride,
)
from fusedgpt.kernels.triton_compat import tl, triton

Tensor = torch.Tensor

MAX_HEAD_DIM = 128
LOG2_E = math.log2(math.e)
_LOG2_E = tl.constexpr(LOG2_E)  # the same, for use inside kernels
DELTA_BLOCK_M = 64


# --------------------------------------------------------------------------- kernels


@triton.jit
def _head(ptr, b, h, stride_b, stride_h):
    """The (batch b, head h) slice of a (B, H, T, D) tensor; int64, as B x H x T x D can
    pass 2**31."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _tile(base, start, stride_t, n_rows, cols, n_cols, BLOCK: tl.constexpr):
    """Pointers and mask for rows start .. start+BLOCK of one head's (n_rows, n_cols) matrix
    with unit column stride. The block start is offset in int64 (position x stride can pass
    2**31 in packed layouts); the in-block offsets stay int32."""
    rows = tl.arange(0, BLOCK)
    ptrs = base + tl.cast(start, tl.int64) * stride_t + rows[:, None] * stride_t + cols[None, :]
    mask = (start + rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return ptrs, mask


@triton.jit
def _load_rows(base, start, stride_t, n_rows, cols, n_cols, BLOCK: tl.constexpr):
    """A (BLOCK, len(cols)) tile, 0 outside the matrix."""
    ptrs, mask = _tile(base, start, stride_t, n_rows, cols, n_cols, BLOCK)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, start, stride_t, n_rows, cols, n_cols, value, BLOCK: tl.constexpr):
    ptrs, mask = _tile(base, start, stride_t, n_rows, cols, n_cols, BLOCK)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _visible(q_idx, k_idx, Tq, Tk, CAUSAL: tl.constexpr):
    """Which (query, key) pairs attend; ``q_idx``/``k_idx`` broadcast to the tile, in either
    orientation (the dK/dV kernel works on transposed tiles)."""
    visible = k_idx < Tk
    if CAUSAL:
        visible = visible & (k_idx <= q_idx + (Tk - Tq))
    return visible


@triton.jit
def _dropout_keep(seed, bh, q_idx, k_idx, dropout_p):
    """The keep decision for each (query, key) pair of the tile: Philox with counter
    (key, query, batch*head, 0), so the forward and both backward passes agree."""
    zero = (q_idx + k_idx) * 0
    c0 = k_idx + zero
    c1 = q_idx + zero
    c2 = zero + bh
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _key_bounds(start_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For query rows start_m .. start_m+BLOCK_M: ``(full_end, end)``. Key blocks before
    ``full_end`` are visible to every row (no mask needed); blocks up to ``end`` are visible
    to some row (diagonal and ragged tail: masked); later keys are never visible."""
    if CAUSAL:
        # The first row sees keys j <= start_m + Tk - Tq, the last row one block further.
        full_end = tl.maximum(tl.minimum(Tk, start_m + 1 + Tk - Tq), 0)
        end = tl.maximum(tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq), 0)
    else:
        full_end = Tk
        end = Tk
    return (full_end // BLOCK_N) * BLOCK_N, end


@triton.jit
def _fwd_key_blocks(
    acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d,
    start, end, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start_n, stride_kt, Tk, offs_d, D, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED and CAUSAL:
            # A row that has seen no key so far keeps m = -inf; subtract 0 instead so that
            # its probabilities come out 0, not nan (-inf - -inf).
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.exp2(s - m_new_safe[:, None])
        alpha = tl.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # l sums the probabilities before dropout; only what reaches V is dropped. The
            # 1 / (1 - p) rescale is applied once, at the end.
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p), p, 0.0)
        v = _load_rows(V, start_n, stride_vt, Tk, offs_d, D, BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed", "q_bucket", "k_bucket"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, Tq, Tk, D, qk_scale, dropout_p, seed, q_bucket, k_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # q_bucket and k_bucket are only the autotuner's cache key (padded sequence lengths).
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    Q = _head(Q, b, h, stride_qb, stride_qh)
    K = _head(K, b, h, stride_kb, stride_kh)
    V = _head(V, b, h, stride_vb, stride_vh)
    O = _head(O, b, h, stride_ob, stride_oh)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, start_m, stride_qt, Tq, offs_d, D, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    full_end, end = _key_bounds(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, 0, full_end,
        Tq, Tk, D, qk_scale, dropout_p, seed, bh,
        BLOCK_N, CAUSAL, HAS_DROPOUT, False, DOT_PRECISION,
    )
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, full_end, end,
        Tq, Tk, D, qk_scale, dropout_p, seed, bh,
        BLOCK_N, CAUSAL, HAS_DROPOUT, True, DOT_PRECISION,
    )

    # Rows that saw no key have l = 0: their output is 0 and their logsumexp -inf.
    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    _store_rows(O, start_m, stride_ot, Tq, offs_d, D, acc * inv_l[:, None], BLOCK_M)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / _LOG2_E, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    H, Tq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    O = _head(O, b, h, stride_ob, stride_oh)
    DO = _head(DO, b, h, stride_dob, stride_doh)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O, start_m, stride_ot, Tq, offs_d, D, BLOCK_M).to(tl.float32)
    do = _load_rows(DO, start_m, stride_dot, Tq, offs_d, D, BLOCK_M).to(tl.float32)
    tl.store(DELTA + (b * H + h).to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_query_blocks(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, offs_d,
    start, end, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block from query blocks start .. end, on transposed (key, query)
    tiles so that every product has the key block as its M dimension."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, start_m, stride_qt, Tq, offs_d, D, BLOCK_M)
        do = _load_rows(DO, start_m, stride_dot, Tq, offs_d, D, BLOCK_M)
        # Queries past Tq get L = +inf, hence P = 0, and contribute nothing.
        lse = tl.load(LSE + offs_m, mask=offs_m < Tq, other=float("inf")) * _LOG2_E
        delta = tl.load(DELTA + offs_m, mask=offs_m < Tq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            # After exp2, so that rows with L = -inf (they see no key) give 0, not nan.
            p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], Tq, Tk, CAUSAL), p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], dropout_p)
            scale = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep, p_t * scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep, dp_t * scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "q_bucket", "k_bucket"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, Tq, Tk, D, qk_scale, softmax_scale, dropout_p, seed, q_bucket, k_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    Q = _head(Q, b, h, stride_qb, stride_qh)
    K = _head(K, b, h, stride_kb, stride_kh)
    V = _head(V, b, h, stride_vb, stride_vh)
    DO = _head(DO, b, h, stride_dob, stride_doh)
    DK = _head(DK, b, h, stride_dkb, stride_dkh)
    DV = _head(DV, b, h, stride_dvb, stride_dvh)
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, start_n, stride_kt, Tk, offs_d, D, BLOCK_N)
    v = _load_rows(V, start_n, stride_vt, Tk, offs_d, D, BLOCK_N)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    if CAUSAL:
        # Query i sees key j iff i >= j - (Tk - Tq): queries before the block's first key
        # minus the offset see none of it; from its last key minus the offset on, all of it.
        start = (tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
        full_start = tl.maximum(full_start, start)
        dk, dv = _bwd_query_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, offs_d,
            start, tl.minimum(full_start, Tq), Tq, Tk, D, qk_scale, dropout_p, seed, bh,
            BLOCK_M, CAUSAL, HAS_DROPOUT, True, DOT_PRECISION,
        )
    else:
        full_start = 0
    # Ragged tails need no mask here: queries past Tq have P = 0, and key rows past Tk
    # are never stored.
    dk, dv = _bwd_query_blocks(
        dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, offs_d,
        full_start, Tq, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
        BLOCK_M, CAUSAL, HAS_DROPOUT, False, DOT_PRECISION,
    )
    _store_rows(DK, start_n, stride_dkt, Tk, offs_d, D, dk * softmax_scale, BLOCK_N)
    _store_rows(DV, start_n, stride_dvt, Tk, offs_d, D, dv, BLOCK_N)


@triton.jit
def _bwd_key_blocks(
    dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d,
    start, end, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block from key blocks start .. end."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start_n, stride_kt, Tk, offs_d, D, BLOCK_N)
        v = _load_rows(V, start_n, stride_vt, Tk, offs_d, D, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "q_bucket", "k_bucket"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, Tq, Tk, D, qk_scale, softmax_scale, dropout_p, seed, q_bucket, k_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    Q = _head(Q, b, h, stride_qb, stride_qh)
    K = _head(K, b, h, stride_kb, stride_kh)
    V = _head(V, b, h, stride_vb, stride_vh)
    DO = _head(DO, b, h, stride_dob, stride_doh)
    DQ = _head(DQ, b, h, stride_dqb, stride_dqh)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, start_m, stride_qt, Tq, offs_d, D, BLOCK_M)
    do = _load_rows(DO, start_m, stride_dot, Tq, offs_d, D, BLOCK_M)
    row = bh.to(tl.int64) * Tq + offs_m
    # Queries past Tq get L = +inf, hence P = 0; their dQ rows are not stored anyway.
    lse = tl.load(LSE + row, mask=offs_m < Tq, other=float("inf")) * _LOG2_E
    delta = tl.load(DELTA + row, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    full_end, end = _key_bounds(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_key_blocks(
        dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, 0, full_end,
        Tq, Tk, D, qk_scale, dropout_p, seed, bh, BLOCK_N, CAUSAL, HAS_DROPOUT, False, DOT_PRECISION,
    )
    dq = _bwd_key_blocks(
        dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, full_end, end,
        Tq, Tk, D, qk_scale, dropout_p, seed, bh, BLOCK_N, CAUSAL, HAS_DROPOUT, True, DOT_PRECISION,
    )
    _store_rows(DQ, start_m, stride_dqt, Tq, offs_d, D, dq * softmax_scale, BLOCK_M)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    MASK, Tq, Tk, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
    ptrs = MASK + bh.to(tl.int64) * Tq * Tk + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# --------------------------------------------------------------------------- launch configs


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# BLOCK_M is always the query block and BLOCK_N the key block. The forward and dQ kernels
# own a query block and loop over key blocks; the dK/dV kernel owns a key block and loops
# over query blocks. In every config the owned block is at least as large as the looped
# one, so a program crosses the causal diagonal in at most two masked tiles; the kernels'
# bounds are exact for any pair of blocks, so causal needs no further pruning.
#
# fp16/bf16: the M dimension of every product (the owned block) is at least 64 and warps a
# multiple of 4, which Triton needs to emit wgmma on sm_90. Each config was kept only if
# its heaviest specialisation (causal, dropout: Philox state costs registers per element)
# builds without spills and within shared memory on sm_80 and sm_90 (the compile report
# checks it). Per head-dim block: a small config for short sequences and decoding, a large
# one for long sequences; at D=128 the dK/dV and dQ accumulators leave room for one only.
HALF_CONFIGS = {
    64: {
        "fwd": [_config(64, 32, 4, 2), _config(128, 64, 8, 3)],
        "dkdv": [_config(32, 64, 4, 3), _config(32, 128, 8, 3)],
        "dq": [_config(64, 32, 4, 3), _config(128, 64, 8, 2)],
    },
    128: {
        "fwd": [_config(64, 32, 4, 3), _config(128, 64, 8, 3)],
        "dkdv": [_config(32, 64, 8, 3)],
        "dq": [_config(64, 32, 4, 3)],
    },
}
# True fp32 multiplies on CUDA cores hold whole operand rows in registers: small tiles,
# single-stage, for every head-dim block.
FP32_CONFIGS = {
    "fwd": [_config(32, 32, 8, 1)],
    "dkdv": [_config(16, 32, 4, 1)],
    "dq": [_config(32, 16, 4, 1)],
}
# Under the interpreter every program is a Python loop over numpy blocks: one small pinned
# config per kernel keeps tests deterministic and quick, with BLOCK_M != BLOCK_N so that
# the diagonal bookkeeping is exercised with unequal blocks.
INTERPRETER_CONFIGS = {
    "fwd": [_config(32, 16, 4, 1)],
    "dkdv": [_config(16, 32, 4, 1)],
    "dq": [_config(32, 16, 4, 1)],
}
HEAD_DIM_BLOCKS = (64, 128)


def head_dim_block(head_dim: int) -> int:
    """The padded head-dim block: 64 for D <= 64, else 128; the extra columns are masked.
    (Two blocks keep the number of compiled variants small; D < 64 pays for 64.)"""
    return HEAD_DIM_BLOCKS[0] if head_dim <= HEAD_DIM_BLOCKS[0] else HEAD_DIM_BLOCKS[1]


def gpu_configs(kind: str, dtype: torch.dtype, block_d: int) -> list[triton.Config]:
    """The autotune list of kernel ``kind`` ("fwd", "dkdv", "dq") for inputs of ``dtype``
    and head-dim block ``block_d``."""
    return FP32_CONFIGS[kind] if dtype == torch.float32 else HALF_CONFIGS[block_d][kind]


def _prune(kind: str):
    """Autotune pruning for ``kind``: the configs for the dtype and head-dim block, with
    blocks no larger than the padded sequence length they tile (down to the smallest block
    on offer, which wgmma needs)."""

    def prune(configs, named_args, **kwargs):
        pool = gpu_configs(kind, named_args["Q"].dtype, kwargs["BLOCK_D"])
        smallest_m = min(c.kwargs["BLOCK_M"] for c in pool)
        smallest_n = min(c.kwargs["BLOCK_N"] for c in pool)
        return [
            c for c in pool
            if c.kwargs["BLOCK_M"] <= max(smallest_m, named_args["q_bucket"])
            and c.kwargs["BLOCK_N"] <= max(smallest_n, named_args["k_bucket"])
        ]

    return prune


def _autotuned(kind: str, kernel):
    if _backend.INTERPRETER_ON:
        configs = INTERPRETER_CONFIGS[kind]
    else:
        configs = FP32_CONFIGS[kind] + [c for by_kind in HALF_CONFIGS.values() for c in by_kind[kind]]
    return triton.autotune(
        configs=configs,
        key=["q_bucket", "k_bucket", "D", "CAUSAL", "HAS_DROPOUT"],
        prune_configs_by={"early_config_prune": _prune(kind)},
    )(kernel)


_attn_fwd = _autotuned("fwd", _attn_fwd_kernel)
_attn_bwd_dkdv = _autotuned("dkdv", _attn_bwd_dkdv_kernel)
_attn_bwd_dq = _autotuned("dq", _attn_bwd_dq_kernel)


# --------------------------------------------------------------------------- launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 in true fp32 (see the module docstring); fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bht_strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _common_meta(q: Tensor, causal: bool, dropout_p: float) -> dict:
    return dict(
        BLOCK_D=head_dim_block(q.shape[-1]), CAUSAL=causal, HAS_DROPOUT=dropout_p > 0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )


def _buckets(tq: int, tk: int) -> tuple[int, int]:
    return triton.next_power_of_2(tq), triton.next_power_of_2(tk)


def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Launch the forward for q (B, H, Tq, D), k and v (B, H, Tk, D), any strides.

    Returns ``o`` (B, H, Tq, D) in q's dtype — stored as (B, Tq, H, D), so that
    ``o.transpose(1, 2).reshape(B, Tq, H * D)`` is free — and the fp32 ``lse`` (B, H, Tq).
    """
    q, k, v = (with_unit_last_stride(t) for t in (q, k, v))
    b, h, tq, d = q.shape
    tk = k.shape[2]
    o = q.new_empty(b, tq, h, d).transpose(1, 2)
    lse = q.new_empty(b, h, tq, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), h, b)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o, lse, *_bht_strides(q, k, v, o),
        h, tq, tk, d, softmax_scale * LOG2_E, dropout_p, seed, *_buckets(tq, tk),
        **_common_meta(q, causal, dropout_p),
    )
    return o, lse


def flash_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: ``delta`` preprocess, then the dK/dV and the dQ kernels.

    Takes the forward's inputs, its ``o`` and ``lse``, and ``do`` like ``o`` (any strides).
    Returns ``dq``, ``dk``, ``dv`` like q, k, v, in their dtype.
    """
    do, q, k, v, o = (with_unit_last_stride(t) for t in (do, q, k, v, o))
    b, h, tq, d = q.shape
    tk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    meta = _common_meta(q, causal, dropout_p)
    delta = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(tq, DELTA_BLOCK_M), h, b)](
        o, do, delta, *_bht_strides(o, do), h, tq, d,
        BLOCK_M=DELTA_BLOCK_M, BLOCK_D=meta["BLOCK_D"], num_warps=4,
    )
    scalars = (h, tq, tk, d, softmax_scale * LOG2_E, softmax_scale, dropout_p, seed, *_buckets(tq, tk))
    _attn_bwd_dkdv[lambda m: (triton.cdiv(tk, m["BLOCK_N"]), h, b)](
        q, k, v, do, lse, delta, dk, dv, *_bht_strides(q, k, v, do, dk, dv), *scalars, **meta,
    )
    _attn_bwd_dq[lambda m: (triton.cdiv(tq, m["BLOCK_M"]), h, b)](
        q, k, v, do, lse, delta, dq, *_bht_strides(q, k, v, do, dq), *scalars, **meta,
    )
    return dq, dk, dv


def dropout_mask(
    seed: int, shape: tuple[int, int, int, int], dropout_p: float, device: torch.device | str
) -> Tensor:
    """The keep mask (B, H, Tq, Tk) bool, True = kept, that the kernels draw for ``seed`` and
    ``dropout_p`` — for tests and debugging (it is Tq x Tk; the kernels never store it).
    ``reference.attention(..., dropout_mask=mask)`` then reproduces the kernel's draw."""
    dropout_p, seed = _check_dropout("dropout_mask", dropout_p, seed)
    b, h, tq, tk = shape
    device = torch.device(device)
    mask = torch.empty(b, h, tq, tk, dtype=torch.int8, device=device)
    _backend.choose("dropout_mask", "triton", [mask])
    _dropout_mask_kernel[(triton.cdiv(tq, 32), triton.cdiv(tk, 32), b * h)](
        mask, tq, tk, dropout_p, int(seed), BLOCK_M=32, BLOCK_N=32,
    )
    return mask.bool()


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    return flash_attention_forward(q, k, v, causal, softmax_scale, dropout_p, seed)


@_flash_attention_fwd_op.register_fake
def _(q, k, v, causal, softmax_scale, dropout_p, seed):
    b, h, tq, d = q.shape
    return q.new_empty(b, tq, h, d).transpose(1, 2), q.new_empty(b, h, tq, dtype=torch.float32)


@torch.library.custom_op("fusedgpt::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return flash_attention_backward(do, q, k, v, o, lse, causal, softmax_scale, dropout_p, seed)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# --------------------------------------------------------------------------- autograd


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, dropout_p, seed):
        o, lse = torch.ops.fusedgpt.flash_attention_fwd(q, k, v, causal, softmax_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.params = (causal, softmax_scale, dropout_p, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fusedgpt.flash_attention_bwd(do, q, k, v, o, lse, *ctx.params)
        return dq, dk, dv, None, None, None, None


# --------------------------------------------------------------------------- public

_OP = "flash_attention"
# Triton grids allow 65535 programs along their second and third axes (heads, batch).
MAX_GRID_YZ = 65535


def _check_dropout(op: str, dropout_p: object, seed: object) -> tuple[float, Optional[int]]:
    """``(dropout_p, seed)`` as Python scalars, after checking them; ``seed`` may be None."""
    dropout_p = check_number(op, "dropout_p", dropout_p, at_least=0.0, below=1.0)
    return dropout_p, None if seed is None else check_number(op, "seed", seed, integer=True, at_least=0, below=2**63)


def _check(q, k, v, causal, softmax_scale, dropout_p, seed) -> tuple[bool, Optional[float], float, Optional[int]]:
    """Raises on bad input; returns ``(causal, softmax_scale, dropout_p, seed)`` as Python
    scalars."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(_OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    check_same_device(_OP, q=q, k=k, v=v)
    b, h, tq, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (b, h, d):
            raise ValueError(
                f"{_OP}: {name} must have shape (B, H, Tk, D) = ({b}, {h}, Tk, {d}) to match q "
                f"{tuple(q.shape)}, got {tuple(t.shape)}"
            )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{_OP}: k and v must have the same length Tk, got {k.shape[2]} and {v.shape[2]}")
    if tq < 1 or k.shape[2] < 1 or d < 1:
        raise ValueError(
            f"{_OP}: sequence lengths and head dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    causal = check_bool(_OP, "causal", causal)
    if softmax_scale is not None:
        softmax_scale = check_number(_OP, "softmax_scale", softmax_scale, above=0.0)
    return (causal, softmax_scale, *_check_dropout(_OP, dropout_p, seed))


def _kernel_unsupported(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """The reason the kernel cannot take this call (the dispatcher then uses the reference
    under ``auto`` and raises under ``triton``), or None."""
    b, h, _, d = q.shape
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM} is not supported by the kernel"
    if b > MAX_GRID_YZ or h > MAX_GRID_YZ:
        return f"batch {b} or heads {h} exceed the kernel grid limit {MAX_GRID_YZ}"
    return float64_unsupported(q, k, v)


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes dropout reproducible.
    return int(torch.randint(0, 2**31 - 1, ()).item())


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, fused.

    Args:
        q: (B, H, Tq, D) float32, float16 or bfloat16 (float64 on the reference path); any
            strides — e.g. the views of a packed (B, T, 3, H, D) projection are read in
            place (a head dim with non-unit stride is copied first).
        k, v: (B, H, Tk, D), q's dtype and device. Tq, Tk >= 1 and may differ; D up to 128
            on the kernel path (any D on the reference path).
        causal: mask aligned to the bottom right: query i sees key j iff
            ``j <= i + Tk - Tq``; rows that see no key (Tq > Tk) output 0.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        dropout_p: probability of dropping an attention weight, in [0, 1); the kept ones
            are scaled by ``1 / (1 - dropout_p)``.
        seed: the dropout seed; drawn from torch's generator when None. On the kernel path
            the same seed gives the same mask (see :func:`dropout_mask`); on the reference
            path a seed also gives a reproducible, but different, mask. Pass one under
            ``torch.compile``: drawing it is a graph break.
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        (B, H, Tq, D) in q's dtype (stored as (B, Tq, H, D) on the kernel path). fp16/bf16
        use tensor cores with fp32 accumulation; fp32 is computed in true fp32 (no TF32).
    """
    causal, softmax_scale, dropout_p, seed = _check(q, k, v, causal, softmax_scale, dropout_p, seed)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    path = _backend.choose(_OP, backend, (q, k, v), unsupported=_kernel_unsupported(q, k, v))
    if dropout_p > 0 and seed is None:
        seed = _draw_seed()
    if path == "triton":
        return _FlashAttentionFunction.apply(q, k, v, causal, scale, dropout_p, seed or 0)
    mask = None
    if dropout_p > 0:
        generator = torch.Generator(device=q.device).manual_seed(seed)
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mask = torch.rand(shape, generator=generator, device=q.device) >= dropout_p
    return reference.attention(q, k, v, causal, scale, dropout_p, mask)


# --------------------------------------------------------------------------- compile report


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """The launches a training step of ``workload`` (default gpt2) makes, recorded from the
    launchers on meta tensors laid out as the model's (q, k, v split from one (B, T, 3C)
    projection; o and dO (B, T, H, D)), causal, with dropout off and on: the forward, the
    delta preprocess, the dK/dV and the dQ kernels, each autotune config the pruner keeps."""
    import sys

    from fusedgpt.kernels import compile_report as cr

    workload = workload or cr.WORKLOADS["gpt2"]
    b, t, h, d = workload.batch, workload.seq, workload.heads, workload.head_dim
    item = torch.empty((), dtype=dtype).element_size()
    qkv = cr.meta_tensor(b, t, 3 * h * d, dtype=dtype)
    q, k, v = (x.view(b, t, h, d).transpose(1, 2) for x in qkv.split(h * d, dim=2))
    o = cr.meta_tensor(b, t, h, d, dtype=dtype).transpose(1, 2)
    lse = cr.meta_tensor(b, h, t, dtype=torch.float32)
    # Per head, causal: T (T + 1) / 2 query-key pairs. Bytes the pass must move per 1K
    # pairs: q, k, v, o and the fp32 logsumexp forward; backward q, k, v, o, dO read, dQ,
    # dK, dV written, logsumexp read, delta written and read.
    per_head = t * (t + 1) / 2 / 1024
    passes = {
        "fwd": dict(min_bytes=(4 * t * d * item + 4 * t) / per_head, mma_flops=2 * 2 * d * 1024),
        "bwd": dict(min_bytes=(8 * t * d * item + 12 * t) / per_head, mma_flops=5 * 2 * d * 1024),
    }
    module = sys.modules[__name__]
    found = []
    for dropout_p in (0.0, workload.dropout_p):
        with cr.launches(module, "_attn_fwd") as forward:
            flash_attention_forward(q, k, v, True, d ** -0.5, dropout_p, 1234)
        with cr.launches(module, "_attn_bwd_delta_kernel", "_attn_bwd_dkdv", "_attn_bwd_dq") as backward:
            flash_attention_backward(o, q, k, v, o, lse, True, d ** -0.5, dropout_p, 1234)
        for pass_, recorded in (("fwd", forward), ("bwd", backward)):
            for launch in (x for r in recorded for x in cr.expand(r)):
                if "BLOCK_N" in launch.args:  # the main kernels: BLOCK_M x BLOCK_N pairs per iteration
                    per_iteration, loops = launch.args["BLOCK_M"] * launch.args["BLOCK_N"] / 1024, "alternatives"
                    show = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_DROPOUT")
                else:  # the delta preprocess: BLOCK_M queries of (T + 1) / 2 keys on average
                    per_iteration, loops = launch.args["BLOCK_M"] * (t + 1) / 2 / 1024, "sequence"
                    show = ("BLOCK_M", "BLOCK_D")
                found.append(cr.jit_variant(
                    "attention", pass_, launch, workload=workload, show=show,
                    work=cr.Work("1K pairs", per_iteration, loops=loops, **passes[pass_]),
                ))
    return found
