r"""Fused flash attention (FlashAttention-2), forward and backward, with in-kernel dropout,
grouped-query heads, a sliding window, logit soft-capping and packed variable-length
sequences.

For one (batch, head) with queries Q (Tq, D), keys K and values V (Tk, D), scale c
(default 1/sqrt(D)), and positions aligned to the bottom right (query i sits at
i' = i + Tk - Tq, so with a KV cache the newest query is level with the newest key):

    S = c Q K^T                      (Tq, Tk)
    S = C tanh(S / C)                 with soft-capping C (Gemma 2); otherwise S as is
    S = -inf where key j is hidden:   causal: j > i';  window w: also j <= i' - w
    P = softmax(S) row-wise           rows that see no key (causal, Tq > Tk) are all 0
    Z = keep mask, P(keep) = 1 - p    (dropout; Z = 1 without it)
    O = (P * Z / (1 - p)) V
    L = logsumexp(S) row-wise         fp32; -inf for rows that see no key

Grouped-query attention: K and V have H_kv heads, H_kv dividing the H query heads, and
query head h reads key/value head h // (H / H_kv) in place (multi-query: H_kv = 1).
Packed variable-length sequences (``cu_seqlens``): the batch is one row of packed tokens;
sequence b owns queries cu_seqlens_q[b] .. cu_seqlens_q[b+1] and keys cu_seqlens_k[b] ..
cu_seqlens_k[b+1], and the formulas above hold per sequence with its own Tq, Tk. A NaN
anywhere in a row's visible scores gives a NaN output row (as PyTorch's own ops do): only
a row whose row sum l is exactly 0, which the mask left without keys, outputs 0.

Forward. Each program owns BLOCK_M query rows of one sequence and streams BLOCK_N keys at a
time, keeping a running row max m, row sum l and unnormalised output acc (online softmax).
Exponentials are taken in base 2 with the scale folded into log2(e) (``exp(x) = exp2(x
log2 e)``), which is what the hardware computes natively; the raw scores are scaled inside
the exponent's argument (``exp2(s c log2 e - m)``, one fused multiply-add per score) and
only the row max is scaled on its own. The keys a query block sees form
one range (``_key_range``): blocks that every row sees in full run without masks; only the
blocks on the causal diagonal, on the window's lower edge and the ragged tail pay for the
mask; blocks outside the window are never visited. Head dims up to 128 are padded to a 64-
or 128-wide block whose extra columns are masked (loaded as 0, never stored).

Backward (FlashAttention-2): with dO the output gradient,

    dV    = (P * Z / (1 - p))^T dO
    dP    = (dO V^T) * Z / (1 - p)
    dS    = P * (dP - delta),   delta = rowsum(P * dP) = rowsum(dO * O)   (fp32)
    dS    = dS * (1 - (S / C)^2)                       with soft-capping (tanh' = 1 - tanh^2)
    dQ    = c dS K,   dK = c dS^T Q

delta takes one small preprocess kernel (the second form: O is at hand, P is not). P is
recomputed from Q, K and the saved L (``P = exp2(S log2 e - L log2 e)``), never stored.
One kernel owns a key block of a key/value head and loops over the query heads of its
group and, for each, the query blocks that see the key block (``_query_range``),
accumulating dK and dV in registers: the group's sum is formed in a fixed order, with no
atomics and no per-query-head copy. Two backwards share that kernel. Fused: each of the
five products is computed once, the kernel also forming this key block's share of dQ (dS K)
and adding it with atomics into fp32 sums; each program then counts itself finished, and
the last one of its (sequence, key/value head) — the sums complete and still in L2 —
writes dQ = c * sums and zeroes them for the next call (``_finish_dq``: release/acquire on
the count, as a grid-wide barrier orders memory). No pass zeroes the sums and none reads
them back from HBM. Atomics make dQ's summation order, and so its last bits, vary from run
to run. Recompute: the kernel leaves dQ to a second kernel that owns a query block and
loops over the key blocks it sees, recomputing S and dP to accumulate dQ in registers
(seven products, a fixed order, bitwise reproducible). The launcher takes the fused one,
which the static cost model rates cheaper on sm_80 and sm_90, and the recompute one under
``torch.use_deterministic_algorithms(True)`` (or ``$FUSEDGPT_ATTENTION_BACKWARD``).
Every kernel skips hidden blocks.

Dropout draws Philox random numbers (the generator behind ``tl.rand``) keyed by ``seed``
with the counter (key j, query i, batch*H + head, 0) — positions along the packed rows for
variable-length sequences: every element has its own counter, with up to 2^32 positions
per axis, and both backward kernels regenerate exactly the forward's mask, so no mask is
stored.

Dtypes. fp16 and bf16 inputs multiply on tensor cores (mma.sync on sm_80, wgmma on sm_90)
with fp32 accumulation; P and dS are rounded to the input dtype before their matmuls, as
in FlashAttention. fp32 inputs are computed in true fp32 (``input_precision="ieee"``: FMA
on CUDA cores, not TF32), so they match the reference to fp32 rounding but run without
tensor cores, on small tiles; use fp16/bf16 for speed. Statistics (m, l, L, delta) are
always fp32.

Saved for backward: q, k, v, o and L (B*H*Tq floats) — nothing with Tq x Tk elements — and
the cu_seqlens offsets when given.
IO per (batch, head): the forward reads Q once and K, V once per query block, and writes O
and L. The backward reads O and dO once (delta); the dK/dV kernel reads K, V once and Q,
dO once per key block and query head of the group, adds into the T x D fp32 dQ sums once
per key block (in L2), and its last program reads the sums and writes dQ. The recompute
backward's dQ kernel instead reads Q, dO once and K, V once per query block.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels import reference
from fusedgpt.kernels.checks import (
    check_bool,
    check_float,
    check_number,
    check_same_device,
    check_same_dtype,
    check_tensor,
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
def _rows(ptr, b, h, start, stride_b, stride_h, stride_t):
    """Head h of batch row b of a (B, H, T, D) tensor, from token ``start`` on; int64, as
    B x H x T x D can pass 2**31."""
    return ptr + tl.cast(b, tl.int64) * stride_b + tl.cast(h, tl.int64) * stride_h + tl.cast(start, tl.int64) * stride_t


@triton.jit
def _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, b, Tq, Tk, VARLEN: tl.constexpr):
    """The program's sequence: ``(batch row, q_start, k_start, seqlen_q, seqlen_k)``. Dense:
    all of batch row b. Packed: sequence b's tokens in the one batch row."""
    if VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + b)
        k_start = tl.load(CU_SEQLENS_K + b)
        return 0, q_start, k_start, tl.load(CU_SEQLENS_Q + b + 1) - q_start, tl.load(CU_SEQLENS_K + b + 1) - k_start
    else:
        return b, 0, 0, Tq, Tk


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
def _tanh(x):
    # 1 - 2 / (e^2x + 1): one exp2 and a division; e^2x = inf gives 1 and 0 gives -1.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2_E)) + 1.0)


@triton.jit
def _scores(a, b_t, qk_scale, qk_softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``(s, unit)``: the scores ``a @ b_t`` and the factor that takes them to the kernels'
    log2 units (scale * log2 e). Without soft-capping the scores stay unscaled and ``unit``
    is qk_scale, so that the callers fold it into the exponent's argument (one FFMA per
    score, ``exp2(s * unit - m)``, rather than a multiply first); soft-capped ones are
    ``qk_softcap * tanh(s * qk_scale / qk_softcap)`` (the cap in log2 units), unit 1."""
    s = tl.dot(a, b_t, input_precision=DOT_PRECISION)
    unit = qk_scale
    if SOFTCAP:
        s = qk_softcap * _tanh(s * (qk_scale / qk_softcap))
        unit = 1.0
    return s, unit


@triton.jit
def _through_softcap(ds, s, qk_softcap, SOFTCAP: tl.constexpr):
    """The gradient ``ds`` of the capped scores ``s``, taken back through the cap:
    d(C tanh(x / C))/dx = 1 - tanh^2 = 1 - (s / C)^2."""
    if SOFTCAP:
        t = s / qk_softcap
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _visible(q_idx, k_idx, seqlen_q, seqlen_k, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Which (query, key) pairs of one sequence attend; ``q_idx``/``k_idx`` broadcast to the
    tile, in either orientation (the dK/dV kernel works on transposed tiles)."""
    visible = k_idx < seqlen_k
    if CAUSAL:
        aligned = q_idx + (seqlen_k - seqlen_q)  # the query's position among the keys
        visible = visible & (k_idx <= aligned)
        if WINDOWED:
            visible = visible & (k_idx > aligned - window)
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
def _split_masked(lo, full_lo, full_hi):
    """``(a, b)`` splitting lo .. hi into masked [lo, a), unmasked [a, b), masked [b, hi):
    where no block is free of masks (a window narrower than the block), a = b."""
    a = tl.maximum(lo, tl.minimum(full_lo, full_hi))
    return a, tl.maximum(a, full_hi)


@triton.jit
def _key_range(
    start_m, seqlen_q, seqlen_k, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
):
    """For query rows start_m .. start_m+BLOCK_M: ``(lo, a, b, hi)``. Keys lo .. hi are
    visible to some row; blocks in [a, b) to every row (no mask); [lo, a) (the window's
    lower edge) and [b, hi) (the diagonal and the ragged tail) are masked."""
    shift = seqlen_k - seqlen_q
    if CAUSAL:
        # Row i sees keys j <= i + shift: the first row up to start_m + shift, the last
        # row BLOCK_M - 1 further.
        full_hi = tl.maximum(tl.minimum(seqlen_k, start_m + 1 + shift), 0)
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + shift), 0)
    else:
        full_hi = seqlen_k
        hi = seqlen_k
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    if WINDOWED:
        # ... and keys j > i + shift - window: from start_m + shift - window + 1 on for the
        # first row, BLOCK_M - 1 later for the last.
        lo = (tl.maximum(start_m + shift - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M + shift - window, 0), BLOCK_N) * BLOCK_N
        a, b = _split_masked(lo, full_lo, full_hi)
    else:
        lo = 0
        a = 0
        b = full_hi
    return lo, a, b, hi


@triton.jit
def _query_range(
    start_n, seqlen_q, seqlen_k, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
):
    """For key rows start_n .. start_n+BLOCK_N: ``(lo, a, b, hi)``. Queries lo .. hi see
    some key of the block; query blocks in [a, b) see all of them (no mask); [lo, a) (the
    diagonal) and [b, hi) (the window's upper edge) are masked. The ragged tails need no
    mask: queries past seqlen_q have P = 0 and key rows past seqlen_k are never stored."""
    shift = seqlen_k - seqlen_q
    if CAUSAL:
        # Query i sees key j iff i >= j - shift: none of the block before its first key
        # minus the shift, all of it from its last key minus the shift on.
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    if WINDOWED:
        # ... and iff i < j + window - shift: all of the block before its first key's
        # bound, some of it before its last key's.
        full_hi = (tl.maximum(start_n + window - shift, 0) // BLOCK_M) * BLOCK_M
        hi = tl.minimum(seqlen_q, tl.maximum(start_n + BLOCK_N - 1 + window - shift, 0))
    else:
        full_hi = seqlen_q
        hi = seqlen_q
    a, b = _split_masked(lo, full_lo, full_hi)
    return lo, a, b, hi


@triton.jit
def _fwd_key_blocks(
    acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, start, end,
    seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start_n, stride_kt, seqlen_k, offs_d, D, BLOCK_N)
        s, unit = _scores(q, tl.trans(k), qk_scale, qk_softcap, SOFTCAP, DOT_PRECISION)
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, window, CAUSAL, WINDOWED)
            s = tl.where(visible, s, float("-inf"))
        # m is in log2 units: the row max is scaled once (unit > 0 keeps it the max).
        m_new = tl.maximum(m_i, tl.max(s, 1) * unit)
        if MASKED and CAUSAL:
            # A row that has seen no key so far keeps m = -inf; subtract 0 instead so that
            # its probabilities come out 0, not nan (-inf - -inf).
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.exp2(s * unit - m_new_safe[:, None])
        alpha = tl.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # l sums the probabilities before dropout; only what reaches V is dropped. The
            # 1 / (1 - p) rescale is applied once, at the end.
            keep = _dropout_keep(seed, bh, q_start + offs_m[:, None], k_start + offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(V, start_n, stride_vt, seqlen_k, offs_d, D, BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed", "window", "q_bucket", "k_bucket"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, kv_group, Tq, Tk, D, qk_scale, qk_softcap, window, dropout_p, seed, q_bucket, k_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # q_bucket and k_bucket are only the autotuner's cache key (padded sequence lengths);
    # kv_group is the number of query heads per key/value head.
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    batch, q_start, k_start, seqlen_q, seqlen_k = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, tl.program_id(2), Tq, Tk, VARLEN)
    if VARLEN:
        if start_m >= seqlen_q:  # past the end of a shorter packed sequence
            return
    bh = batch * H + h
    Q = _rows(Q, batch, h, q_start, stride_qb, stride_qh, stride_qt)
    K = _rows(K, batch, h // kv_group, k_start, stride_kb, stride_kh, stride_kt)
    V = _rows(V, batch, h // kv_group, k_start, stride_vb, stride_vh, stride_vt)
    O = _rows(O, batch, h, q_start, stride_ob, stride_oh, stride_ot)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, start_m, stride_qt, seqlen_q, offs_d, D, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    lo, a, b, hi = _key_range(start_m, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    if WINDOWED:
        acc, m_i, l_i = _fwd_key_blocks(
            acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, a,
            seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
            BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, True, DOT_PRECISION,
        )
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, a, b,
        seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
        BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, False, DOT_PRECISION,
    )
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, b, hi,
        seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
        BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, True, DOT_PRECISION,
    )

    # Rows that see no key (l = 0) output 0 with logsumexp -inf. A NaN score makes l NaN,
    # and such a row divides by it: NaN, never 0.
    seen = (l_i > 0.0) | (l_i != l_i)
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    _store_rows(O, start_m, stride_ot, seqlen_q, offs_d, D, acc * inv_l[:, None], BLOCK_M)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / _LOG2_E, float("-inf"))
    tl.store(LSE + tl.cast(bh, tl.int64) * Tq + q_start + offs_m, lse, mask=offs_m < seqlen_q)


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
    O = _rows(O, b, h, 0, stride_ob, stride_oh, stride_ot)
    DO = _rows(DO, b, h, 0, stride_dob, stride_doh, stride_dot)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O, start_m, stride_ot, Tq, offs_d, D, BLOCK_M).to(tl.float32)
    do = _load_rows(DO, start_m, stride_dot, Tq, offs_d, D, BLOCK_M).to(tl.float32)
    tl.store(DELTA + (b * H + h).to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_query_blocks(
    dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qh, stride_qt, stride_doh, stride_dot, offs_n, offs_d,
    start, end, kv_group, Tq, seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p,
    seed, bh, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, ACCUMULATE_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block from query blocks start .. end of each of the ``kv_group``
    query heads from the one at Q, DO, LSE, DELTA (batch*head ``bh``) on, in a fixed
    order; with ``ACCUMULATE_DQ``, also this key block's share of dQ / c, added into the
    fp32 rows at DQ_ACC (BLOCK_D wide, Tq rows a head). One flat loop over (head, block)
    rather than a loop over heads around the loop over blocks: the nested form holds more
    registers. Tiles are transposed (key, query), so that every product but dQ's has the
    key block as its M dimension."""
    blocks = tl.maximum(tl.cdiv(end - start, BLOCK_M), 0)
    g = 0  # the g-th query head of the group
    start_m = start
    for _ in range(0, kv_group * blocks):
        Qg = Q + tl.cast(g, tl.int64) * stride_qh
        DOg = DO + tl.cast(g, tl.int64) * stride_doh
        LSEg = LSE + tl.cast(g, tl.int64) * Tq
        DELTAg = DELTA + tl.cast(g, tl.int64) * Tq
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Qg, start_m, stride_qt, seqlen_q, offs_d, D, BLOCK_M)
        do = _load_rows(DOg, start_m, stride_dot, seqlen_q, offs_d, D, BLOCK_M)
        # Queries past the sequence get L = +inf, hence P = 0, and contribute nothing.
        lse = tl.load(LSEg + offs_m, mask=offs_m < seqlen_q, other=float("inf")) * _LOG2_E
        delta = tl.load(DELTAg + offs_m, mask=offs_m < seqlen_q, other=0.0)
        s_t, unit = _scores(k, tl.trans(q), qk_scale, qk_softcap, SOFTCAP, DOT_PRECISION)
        p_t = tl.exp2(s_t * unit - lse[None, :])
        if MASKED:
            # After exp2, so that rows with L = -inf (they see no key) give 0, not nan.
            visible = _visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, window, CAUSAL, WINDOWED)
            p_t = tl.where(visible, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh + g, q_start + offs_m[None, :], k_start + offs_n[:, None], dropout_p)
            scale = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep, p_t * scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep, dp_t * scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = _through_softcap(p_t * (dp_t - delta[None, :]), s_t, qk_softcap, SOFTCAP)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ACCUMULATE_DQ:
            # Relaxed: only the sum matters; _finish_dq orders every addition before its read.
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
            rows = tl.cast(g, tl.int64) * Tq + offs_m
            tl.atomic_add(DQ_ACC + rows[:, None] * BLOCK_D + offs_d[None, :], dq,
                          mask=offs_m[:, None] < seqlen_q, sem="relaxed")
        # The next block, or the first block of the next head (no division in the loop).
        start_m += BLOCK_M
        next_head = start_m >= end
        start_m = tl.where(next_head, start, start_m)
        g += next_head.to(tl.int32)
    return dk, dv


@triton.jit
def _finish_dq(
    DQ, DQ_ACC, FINISHED, stride_dqh, stride_dqt, kv_group, Tq, seqlen_q, D, softmax_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Count this program as finished with its (sequence, key/value head); the last of the
    key-block programs to finish writes dQ = c * the fp32 sums of the group's query heads
    (the rows at DQ_ACC) into DQ, and leaves the sums and the count zero for the next call.
    The sums are then fresh in L2: no pass zeroes them and none reads them back from HBM.

    Ordering, as in a grid-wide barrier: the CTA barrier puts every thread's additions
    before the count's increment, whose release (gpu scope, by one thread) publishes them;
    the last program's acquire, the barrier Triton places where it shares the count with
    all threads, and loads that bypass L1 (.cg) read the complete sums."""
    tl.debug_barrier()
    pair = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    finished_before = tl.atomic_add(FINISHED + pair, 1, sem="acq_rel", scope="gpu")
    if finished_before == tl.num_programs(0) - 1:
        offs_d = tl.arange(0, BLOCK_D)
        blocks = tl.cdiv(seqlen_q, BLOCK_M)
        for i in range(0, kv_group * blocks):
            g = i // blocks
            start_m = (i - g * blocks) * BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            sums = DQ_ACC + (tl.cast(g, tl.int64) * Tq + offs_m)[:, None] * BLOCK_D + offs_d[None, :]
            rows = offs_m[:, None] < seqlen_q
            dq = tl.load(sums, mask=rows, other=0.0, cache_modifier=".cg")
            tl.store(sums, tl.zeros_like(dq), mask=rows)
            _store_rows(DQ + tl.cast(g, tl.int64) * stride_dqh, start_m, stride_dqt, seqlen_q, offs_d, D,
                        dq * softmax_scale, BLOCK_M)
        tl.store(FINISHED + pair, 0)


@triton.jit(do_not_specialize=["seed", "window", "q_bucket", "k_bucket"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DQ_ACC, FINISHED, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, stride_dqb, stride_dqh, stride_dqt,
    H, kv_group, Tq, Tk, D, qk_scale, qk_softcap, softmax_scale, window, dropout_p, seed, q_bucket, k_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ACCUMULATE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per key block of one key/value head (program_id(1)).
    start_n = tl.program_id(0) * BLOCK_N
    h_kv = tl.program_id(1)
    batch, q_start, k_start, seqlen_q, seqlen_k = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, tl.program_id(2), Tq, Tk, VARLEN)
    K = _rows(K, batch, h_kv, k_start, stride_kb, stride_kh, stride_kt)
    V = _rows(V, batch, h_kv, k_start, stride_vb, stride_vh, stride_vt)
    DK = _rows(DK, batch, h_kv, k_start, stride_dkb, stride_dkh, stride_dkt)
    DV = _rows(DV, batch, h_kv, k_start, stride_dvb, stride_dvh, stride_dvt)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, start_n, stride_kt, seqlen_k, offs_d, D, BLOCK_N)
    v = _load_rows(V, start_n, stride_vt, seqlen_k, offs_d, D, BLOCK_N)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo, a, b, hi = _query_range(start_n, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    if VARLEN:  # past the end of a shorter packed sequence: no query to visit, still counted
        inside = start_n < seqlen_k
        lo, a, b, hi = tl.where(inside, lo, 0), tl.where(inside, a, 0), tl.where(inside, b, 0), tl.where(inside, hi, 0)

    # The group's query heads, from the first one on, in a fixed order: a deterministic sum.
    h = h_kv * kv_group
    bh = batch * H + h
    Q = _rows(Q, batch, h, q_start, stride_qb, stride_qh, stride_qt)
    DO = _rows(DO, batch, h, q_start, stride_dob, stride_doh, stride_dot)
    LSE += tl.cast(bh, tl.int64) * Tq + q_start
    DELTA += tl.cast(bh, tl.int64) * Tq + q_start
    DQ = _rows(DQ, batch, h, q_start, stride_dqb, stride_dqh, stride_dqt)
    DQ_ACC += (tl.cast(bh, tl.int64) * Tq + q_start) * BLOCK_D
    if CAUSAL:
        dk, dv = _bwd_query_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qh, stride_qt, stride_doh, stride_dot, offs_n, offs_d, lo, a,
            kv_group, Tq, seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
            BLOCK_M, BLOCK_D, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, True, ACCUMULATE_DQ, DOT_PRECISION,
        )
    dk, dv = _bwd_query_blocks(
        dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qh, stride_qt, stride_doh, stride_dot, offs_n, offs_d, a, b,
        kv_group, Tq, seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
        BLOCK_M, BLOCK_D, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, False, ACCUMULATE_DQ, DOT_PRECISION,
    )
    if WINDOWED:
        dk, dv = _bwd_query_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qh, stride_qt, stride_doh, stride_dot, offs_n, offs_d, b, hi,
            kv_group, Tq, seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
            BLOCK_M, BLOCK_D, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, True, ACCUMULATE_DQ, DOT_PRECISION,
        )
    _store_rows(DK, start_n, stride_dkt, seqlen_k, offs_d, D, dk * softmax_scale, BLOCK_N)
    _store_rows(DV, start_n, stride_dvt, seqlen_k, offs_d, D, dv, BLOCK_N)
    if ACCUMULATE_DQ:
        _finish_dq(DQ, DQ_ACC, FINISHED, stride_dqh, stride_dqt, kv_group, Tq, seqlen_q, D, softmax_scale,
                   BLOCK_N, BLOCK_D)


@triton.jit
def _bwd_key_blocks(
    dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, start, end,
    seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block from key blocks start .. end."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start_n, stride_kt, seqlen_k, offs_d, D, BLOCK_N)
        v = _load_rows(V, start_n, stride_vt, seqlen_k, offs_d, D, BLOCK_N)
        s, unit = _scores(q, tl.trans(k), qk_scale, qk_softcap, SOFTCAP, DOT_PRECISION)
        p = tl.exp2(s * unit - lse[:, None])
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, window, CAUSAL, WINDOWED)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, q_start + offs_m[:, None], k_start + offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = _through_softcap(p * (dp - delta[:, None]), s, qk_softcap, SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "window", "q_bucket", "k_bucket"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, kv_group, Tq, Tk, D, qk_scale, qk_softcap, softmax_scale, window, dropout_p, seed, q_bucket, k_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    batch, q_start, k_start, seqlen_q, seqlen_k = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, tl.program_id(2), Tq, Tk, VARLEN)
    if VARLEN:
        if start_m >= seqlen_q:  # past the end of a shorter packed sequence
            return
    bh = batch * H + h
    Q = _rows(Q, batch, h, q_start, stride_qb, stride_qh, stride_qt)
    K = _rows(K, batch, h // kv_group, k_start, stride_kb, stride_kh, stride_kt)
    V = _rows(V, batch, h // kv_group, k_start, stride_vb, stride_vh, stride_vt)
    DO = _rows(DO, batch, h, q_start, stride_dob, stride_doh, stride_dot)
    DQ = _rows(DQ, batch, h, q_start, stride_dqb, stride_dqh, stride_dqt)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, start_m, stride_qt, seqlen_q, offs_d, D, BLOCK_M)
    do = _load_rows(DO, start_m, stride_dot, seqlen_q, offs_d, D, BLOCK_M)
    row = tl.cast(bh, tl.int64) * Tq + q_start + offs_m
    # Queries past the sequence get L = +inf, hence P = 0; their dQ rows are not stored.
    lse = tl.load(LSE + row, mask=offs_m < seqlen_q, other=float("inf")) * _LOG2_E
    delta = tl.load(DELTA + row, mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    lo, a, b, hi = _key_range(start_m, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    if WINDOWED:
        dq = _bwd_key_blocks(
            dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, a,
            seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
            BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, True, DOT_PRECISION,
        )
    dq = _bwd_key_blocks(
        dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, a, b,
        seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
        BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, False, DOT_PRECISION,
    )
    dq = _bwd_key_blocks(
        dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, b, hi,
        seqlen_q, seqlen_k, q_start, k_start, D, qk_scale, qk_softcap, window, dropout_p, seed, bh,
        BLOCK_N, CAUSAL, WINDOWED, SOFTCAP, HAS_DROPOUT, True, DOT_PRECISION,
    )
    _store_rows(DQ, start_m, stride_dqt, seqlen_q, offs_d, D, dq * softmax_scale, BLOCK_M)


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


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, maxnreg: Optional[int] = None) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         maxnreg=maxnreg)


# BLOCK_M is always the query block and BLOCK_N the key block. The forward and dQ kernels
# own a query block and loop over key blocks; the dK/dV kernel owns a key block and loops
# over query blocks, with its own lists for the fused backward ("bwd", which also forms dQ)
# and the recompute one ("dkdv"). In every config the owned block is at least as large as the looped
# one, so a program crosses the causal diagonal in at most two masked tiles; the kernels'
# bounds are exact for any pair of blocks, so causal needs no further pruning.
#
# fp16/bf16: the M dimension of every product (the owned block) is at least 64 and warps a
# multiple of 4, which Triton needs to emit wgmma on sm_90. Configs are chosen per head-dim
# block and per specialisation: the dropout-free build (what training without attention
# dropout and inference run) and the dropout build (Philox state costs registers per
# element) each get the tiles that build best, by the static cost of their SASS (python -m
# bench.static --op attention): fewest main-loop instructions per (query, key) pair, no
# tensor-core product computed twice by two warp groups (MMA redundancy), no spills and
# shared memory within limits on sm_80 and sm_90 (the compile report checks it). Per list:
# a small config for short sequences and decoding, then one for long sequences, or one
# config where it wins at every length or registers leave room for no other. At D=128,
# 8 warps over a 64-key dK/dV block leave two warp groups computing the same S^T and dP^T;
# 128 keys (16 rows per warp) split them, at 16 queries a step to stay within registers.
# The fused backward holds dQ's product and its atomic additions too: 32 x 64 with 4 warps
# (both architectures, no duplicated product) and 32 x 128 with 8 (sm_90) at D=64; at
# D=128 128 keys with 8 warps — 32 queries a step without dropout, single-stage (fewest
# instructions without a spill on sm_90, and half the additions per pair of a 64-key
# block, whose atomics made it L2-bound), 16 with dropout, whose 16 x 64 w4 build spilled
# (sm_80 has its own list below: there these warps would compute some products twice).
_D64_DROPOUT = {
    "fwd": [_config(64, 32, 4, 2), _config(128, 64, 8, 3)],
    "bwd": [_config(32, 64, 4, 2), _config(32, 128, 8, 2)],
    "dkdv": [_config(32, 64, 4, 3), _config(32, 128, 8, 3)],
    "dq": [_config(64, 32, 4, 3), _config(128, 64, 8, 2)],
}
_D128_DROPOUT = {
    "fwd": [_config(64, 32, 4, 3), _config(128, 64, 8, 3)],
    "bwd": [_config(16, 128, 8, 2)],
    "dkdv": [_config(16, 128, 8, 2)],
    "dq": [_config(64, 32, 4, 3)],
}
HALF_CONFIGS = {  # (head-dim block, dropout) -> kind -> configs
    (64, True): _D64_DROPOUT,
    (64, False): {**_D64_DROPOUT, "fwd": [_config(64, 32, 4, 2), _config(128, 128, 8, 3)],
                  "bwd": [_config(32, 64, 4, 3), _config(32, 128, 8, 2)],
                  "dkdv": [_config(32, 64, 4, 3), _config(32, 128, 8, 2)]},
    (128, True): _D128_DROPOUT,
    # One dQ config: 128x32 w8 costs fewer instructions per pair than 64x32 w4 at any
    # length, and with every feature on (grouped-query, window, soft-cap, packed) builds
    # without the 64x32 build's spill on sm_80; with dropout it spills, 64x32 does not.
    (128, False): {**_D128_DROPOUT, "bwd": [_config(32, 128, 8, 1)], "dq": [_config(128, 32, 8, 2)]},
}
# Per architecture (compute capability major), where one list cannot serve both, because
# the better build spills on the other: the fused backward at D=128 on sm_80, whose 64 x 64
# tiles over 8 warps split every product between the warps (MMA redundancy 1.00; the
# shared lists' builds spill there); the forward at D=128 on sm_90, whose 128 x 128 tiles
# issue 295 instructions per 1K pairs against 381 for 128 x 64 (both at the tensor cores'
# bound in the model).
ARCH_HALF_CONFIGS = {  # (capability major, head-dim block, dropout) -> kind -> configs
    (8, 128, False): {"bwd": [_config(64, 64, 8, 2)]},
    (8, 128, True): {"bwd": [_config(64, 64, 8, 1)]},
    (9, 128, False): {"fwd": [_config(64, 32, 4, 3), _config(128, 128, 8, 3)]},
}
# True fp32 multiplies on CUDA cores hold whole operand rows in registers: small tiles,
# for every head-dim block; single-stage, except dQ, whose single-stage build spilled 8 B
# on sm_80 with dropout (two stages build clean at both head-dim blocks). Left to itself,
# ptxas held some builds at 64 or 128 registers a thread and spilled what did not fit (8 B
# with dropout, a window, soft-capping or packed sequences; 160-350 B at D=128): the
# forward and dK/dV configs raise the ceiling to the hardware's 255, which every build then
# stays under with 0 spills; dK/dV takes 8 warps, with which no build needs more than 164.
FP32_CONFIGS = {
    "fwd": [_config(32, 32, 8, 1, maxnreg=255)],
    "bwd": [_config(16, 32, 8, 1, maxnreg=255)],
    "dkdv": [_config(16, 32, 8, 1, maxnreg=255)],
    "dq": [_config(32, 16, 4, 2)],
}
# Under the interpreter every program is a Python loop over numpy blocks: one small pinned
# config per kernel keeps tests deterministic and quick, with BLOCK_M != BLOCK_N so that
# the diagonal bookkeeping is exercised with unequal blocks.
INTERPRETER_CONFIGS = {
    "fwd": [_config(32, 16, 4, 1)],
    "bwd": [_config(16, 32, 4, 1)],
    "dkdv": [_config(16, 32, 4, 1)],
    "dq": [_config(32, 16, 4, 1)],
}
HEAD_DIM_BLOCKS = (64, 128)


def head_dim_block(head_dim: int) -> int:
    """The padded head-dim block: 64 for D <= 64, else 128; the extra columns are masked.
    (Two blocks keep the number of compiled variants small; D < 64 pays for 64.)"""
    return HEAD_DIM_BLOCKS[0] if head_dim <= HEAD_DIM_BLOCKS[0] else HEAD_DIM_BLOCKS[1]


def gpu_configs(kind: str, dtype: torch.dtype, block_d: int, dropout: bool,
                features: bool = False, capability: Optional[int] = None) -> list[triton.Config]:
    """The autotune list of kernel ``kind`` ("fwd", "bwd", "dkdv", "dq") for inputs of
    ``dtype``, head-dim block ``block_d``, with or without ``dropout``; ``features``: a
    window, soft-capping or packed sequences (any of them) on; ``capability``: the GPU's
    compute capability major, for the lists made for one architecture (None: the shared
    ones)."""
    if dtype == torch.float32:
        return FP32_CONFIGS[kind]
    configs = ARCH_HALF_CONFIGS.get((capability, block_d, dropout), {}).get(kind) or HALF_CONFIGS[block_d, dropout][kind]
    if not features:
        return configs
    # The features' index arithmetic and masks hold registers the tuned lists leave no room
    # for: on sm_80 (llama3.2-1b, D=64) nearly every fp16/bf16 config spilled with some of
    # them, where each list's small config single-stage builds clean on sm_80 and sm_90.
    small = configs[0]
    return [_config(small.kwargs["BLOCK_M"], small.kwargs["BLOCK_N"], small.num_warps, 1, small.maxnreg)]


# The architecture aot_variants is listing launches for (their tensors are on no GPU).
_listed_capability: Optional[int] = None


def _capability(tensor: Tensor) -> Optional[int]:
    """The compute capability major of the GPU ``tensor`` is on; off a GPU, the one
    aot_variants is listing for, or None."""
    if tensor.device.type == "cuda":
        return torch.cuda.get_device_capability(tensor.device)[0]
    return _listed_capability


def _prune(kind: str):
    """Autotune pruning for ``kind``: the configs for the dtype, head-dim block, dropout and
    features, with blocks no larger than the padded sequence length they tile (down to the
    smallest block on offer, which wgmma needs)."""

    def prune(configs, named_args, **kwargs):
        features = kwargs["WINDOWED"] or kwargs["SOFTCAP"] or kwargs["VARLEN"]
        q = named_args["Q"]
        pool = gpu_configs(kind, q.dtype, kwargs["BLOCK_D"], kwargs["HAS_DROPOUT"], features, _capability(q))
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
        # Specialisations share some lists: each config once.
        lists = [*HALF_CONFIGS.values(), *ARCH_HALF_CONFIGS.values()]
        half = {id(c): c for by_kind in lists for c in by_kind.get(kind, [])}
        configs = FP32_CONFIGS[kind] + list(half.values())
    return triton.autotune(
        configs=configs,
        key=["q_bucket", "k_bucket", "D", "CAUSAL", "WINDOWED", "SOFTCAP", "VARLEN", "HAS_DROPOUT"],
        prune_configs_by={"early_config_prune": _prune(kind)},
    )(kernel)


_attn_fwd = _autotuned("fwd", _attn_fwd_kernel)
_attn_bwd_dkdv = _autotuned("dkdv", _attn_bwd_dkdv_kernel)
_attn_bwd_fused = _autotuned("bwd", _attn_bwd_dkdv_kernel)
_attn_bwd_dq = _autotuned("dq", _attn_bwd_dq_kernel)



# --------------------------------------------------------------------------- launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 in true fp32 (see the module docstring); fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bht_strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _buckets(tq: int, tk: int) -> tuple[int, int]:
    return triton.next_power_of_2(tq), triton.next_power_of_2(tk)


class _Launch:
    """What the three main kernels share for one call: the sequences (dense batch rows or
    packed ones) and the features, as kernel arguments."""

    def __init__(
        self, q: Tensor, k: Tensor, causal: bool, dropout_p: float, window: Optional[int],
        softcap: Optional[float], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
        max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
    ):
        b, self.heads, self.total_q, _ = q.shape
        self.total_k = k.shape[2]
        varlen = cu_seqlens_q is not None
        # One program column per sequence; each sized for the longest one.
        self.sequences = cu_seqlens_q.numel() - 1 if varlen else b
        self.max_q = max_seqlen_q if varlen else self.total_q
        self.max_k = max_seqlen_k if varlen else self.total_k
        self.cu_seqlens = (cu_seqlens_q, cu_seqlens_k)
        self.kv_group = self.heads // k.shape[1]
        # Unused values where a feature is off (its constexpr flag removes the code).
        self.window = window or 0
        self.qk_softcap = (softcap or 0.0) * LOG2_E
        self.meta = dict(
            BLOCK_D=head_dim_block(q.shape[-1]), CAUSAL=causal, WINDOWED=window is not None,
            SOFTCAP=softcap is not None, VARLEN=varlen, HAS_DROPOUT=dropout_p > 0,
            DOT_PRECISION=_dot_precision(q.dtype),
        )

    def grid(self, block: str, length: int, heads: int):
        return lambda meta: (triton.cdiv(length, meta[block]), heads, self.sequences)


def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, dropout_p: float, seed: int,
    window: Optional[int] = None, softcap: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Launch the forward for q (B, H, Tq, D), k and v (B, H_kv, Tk, D), any strides; with
    ``cu_seqlens_q``/``cu_seqlens_k`` (int32 (N+1,), with ``max_seqlen_q``/``max_seqlen_k``)
    B = 1 and T holds N packed sequences. Inputs are not checked here (see
    :func:`flash_attention`).

    Returns ``o`` (B, H, Tq, D) in q's dtype — stored as (B, Tq, H, D), so that
    ``o.transpose(1, 2).reshape(B, Tq, H * D)`` is free — and the fp32 ``lse`` (B, H, Tq).
    """
    q, k, v = (with_unit_last_stride(t) for t in (q, k, v))
    b, h, tq, d = q.shape
    o = q.new_empty(b, tq, h, d).transpose(1, 2)
    lse = q.new_empty(b, h, tq, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    run = _Launch(q, k, causal, dropout_p, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _attn_fwd[run.grid("BLOCK_M", run.max_q, h)](
        q, k, v, o, lse, *run.cu_seqlens, *_bht_strides(q, k, v, o),
        h, run.kv_group, run.total_q, run.total_k, d, softmax_scale * LOG2_E, run.qk_softcap, run.window,
        dropout_p, seed, *_buckets(run.max_q, run.max_k), **run.meta,
    )
    return o, lse


BACKWARD_ENV = "FUSEDGPT_ATTENTION_BACKWARD"


def _fused_backward_chosen() -> bool:
    """The fused backward, unless ``torch.use_deterministic_algorithms(True)`` is on or
    ``$FUSEDGPT_ATTENTION_BACKWARD`` is "recompute" (it takes "fused" or "recompute", for
    timing both on a GPU). The static cost model rates the fused one cheaper on sm_80 and
    sm_90 at every workload it builds (``python -m bench.static --op attention``): a model,
    not a timing."""
    choice = os.environ.get(BACKWARD_ENV, "")
    if choice not in ("", "fused", "recompute"):
        raise ValueError(f"${BACKWARD_ENV} must be 'fused' or 'recompute' (or unset), got {choice!r}")
    return choice != "recompute" and not torch.are_deterministic_algorithms_enabled()


# The fused backward's workspace, per device and stream: fp32 dQ sums (B x H x Tq x the
# head-dim block, flat) and one count of finished programs per (sequence, key/value head).
# Both are zero between calls — the last program of each pair zeroes what it used — so no
# call pays a pass to zero them. Grown to the largest call, never shrunk.
_DQ_WORKSPACES: dict = {}


def _dq_workspace(device: torch.device, sums: int, counts: int) -> tuple[Tensor, Tensor]:
    """Zeroed fp32 sums and int32 counts, at least ``sums`` and ``counts`` elements, for one
    fused backward on ``device``."""

    def zeros(sums: int, counts: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(sums, dtype=torch.float32, device=device), torch.zeros(counts, dtype=torch.int32, device=device)

    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return zeros(sums, counts)  # a CUDA graph zeroes what it allocates when it replays, not now
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
    kept = _DQ_WORKSPACES.get(key)
    if kept is None or kept[0].numel() < sums or kept[1].numel() < counts:
        grown = (max(sums, kept[0].numel()), max(counts, kept[1].numel())) if kept is not None else (sums, counts)
        kept = _DQ_WORKSPACES[key] = zeros(*grown)
    return kept


def flash_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, dropout_p: float, seed: int,
    window: Optional[int] = None, softcap: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
    grads: Optional[tuple[Tensor, Tensor, Tensor]] = None, fused: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward. Fused (unless :func:`_fused_backward_chosen` says otherwise):
    the ``delta`` preprocess, then one kernel that computes dK, dV and adds each key
    block's share of dQ into fp32 sums with atomics (the five products of the backward,
    each once); the last program of each (sequence, key/value head) writes dQ from the
    sums and zeroes them again. The sums and the counts of finished programs are a
    workspace kept per device and stream (B x H x Tq x the head-dim block fp32, grown to
    the largest call, never shrunk; fresh ones under CUDA-graph capture). Recompute —
    always under ``torch.use_deterministic_algorithms(True)``: the preprocess, then a dK/dV
    kernel and a dQ kernel that recomputes S and dP (seven products), which sum in a fixed
    order.

    Takes the forward's inputs and options, its ``o`` and ``lse``, and ``do`` like ``o``
    (any strides). ``fused``: which backward, overriding the choice above (the compile
    report lists both). Returns ``dq``, ``dk``, ``dv`` like q, k, v, in their dtype: written into
    ``grads`` when given (tensors of those shapes and dtype, unit last stride, e.g. views
    of one packed gradient), otherwise new.
    """
    do, q, k, v, o = (with_unit_last_stride(t) for t in (do, q, k, v, o))
    b, h, tq, d = q.shape
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if q.numel() == 0:
        return dq, dk, dv
    run = _Launch(q, k, causal, dropout_p, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    block_d = run.meta["BLOCK_D"]
    if fused is None:
        fused = _fused_backward_chosen()
    delta = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(tq, DELTA_BLOCK_M), h, b)](
        o, do, delta, *_bht_strides(o, do), h, tq, d, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d, num_warps=4,
    )
    scalars = (
        h, run.kv_group, run.total_q, run.total_k, d, softmax_scale * LOG2_E, run.qk_softcap, softmax_scale,
        run.window, dropout_p, seed, *_buckets(run.max_q, run.max_k),
    )
    sums, finished = _dq_workspace(q.device, b * h * tq * block_d, run.sequences * k.shape[1]) if fused else (delta, delta)
    dkdv = _attn_bwd_fused if fused else _attn_bwd_dkdv
    dkdv[run.grid("BLOCK_N", run.max_k, k.shape[1])](
        q, k, v, do, lse, delta, dk, dv, dq, sums, finished, *run.cu_seqlens, *_bht_strides(q, k, v, do, dk, dv, dq),
        *scalars, ACCUMULATE_DQ=fused, **run.meta,
    )
    if not fused:
        _attn_bwd_dq[run.grid("BLOCK_M", run.max_q, h)](
            q, k, v, do, lse, delta, dq, *run.cu_seqlens, *_bht_strides(q, k, v, do, dq), *scalars, **run.meta,
        )
    return dq, dk, dv


def dropout_mask(
    seed: int, shape: tuple[int, int, int, int], dropout_p: float, device: torch.device | str
) -> Tensor:
    """The keep mask (B, H, Tq, Tk) bool, True = kept, that the kernels draw for ``seed`` and
    ``dropout_p`` — for tests and debugging (it is Tq x Tk; the kernels never store it).
    For packed sequences it is the mask of the whole (1, H, total_q, total_k) packed
    matrix, of which each sequence uses its own diagonal block.
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
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, dropout_p: float, seed: int,
    window: Optional[int], softcap: Optional[float], cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
) -> tuple[Tensor, Tensor]:
    return flash_attention_forward(
        q, k, v, causal, softmax_scale, dropout_p, seed, window, softcap,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    )


@_flash_attention_fwd_op.register_fake
def _(q, k, v, *options):
    b, h, tq, d = q.shape
    return q.new_empty(b, tq, h, d).transpose(1, 2), q.new_empty(b, h, tq, dtype=torch.float32)


@torch.library.custom_op("fusedgpt::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, dropout_p: float, seed: int,
    window: Optional[int], softcap: Optional[float], cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
) -> tuple[Tensor, Tensor, Tensor]:
    return flash_attention_backward(
        do, q, k, v, o, lse, causal, softmax_scale, dropout_p, seed, window, softcap,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    )


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _unpacked(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, T, D) as views of a packed (B, T, 3, H, D) tensor."""
    return tuple(qkv.select(2, i).transpose(1, 2) for i in range(3))


@torch.library.custom_op("fusedgpt::flash_attention_qkvpacked_bwd", mutates_args=())
def _flash_attention_qkvpacked_bwd_op(
    do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor,
    causal: bool, softmax_scale: float, dropout_p: float, seed: int,
    window: Optional[int], softcap: Optional[float], cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
) -> Tensor:
    dqkv = qkv.new_empty(qkv.shape)
    flash_attention_backward(
        do, *_unpacked(qkv), o, lse, causal, softmax_scale, dropout_p, seed, window, softcap,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grads=_unpacked(dqkv),
    )
    return dqkv


@_flash_attention_qkvpacked_bwd_op.register_fake
def _(do, qkv, *rest):
    return qkv.new_empty(qkv.shape)


# --------------------------------------------------------------------------- autograd


class _FlashAttentionFunction(torch.autograd.Function):
    """Inputs q, k, v, or ``qkv``: a packed (B, T, 3, H, D) tensor that q, k, v are views of
    (then q, k, v get no gradient of their own: qkv gets one packed gradient, which the
    kernels write in place, where three separate ones would be concatenated after)."""

    @staticmethod
    def forward(ctx, qkv, q, k, v, causal, softmax_scale, dropout_p, seed, window, softcap,
                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        o, lse = torch.ops.fusedgpt.flash_attention_fwd(
            q, k, v, causal, softmax_scale, dropout_p, seed, window, softcap,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        )
        ctx.packed = qkv is not None
        ctx.save_for_backward(*((qkv,) if ctx.packed else (q, k, v)), o, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.params = (causal, softmax_scale, dropout_p, seed, window, softcap)
        ctx.lengths = (max_seqlen_q, max_seqlen_k)
        return o

    @staticmethod
    def backward(ctx, do):
        *inputs, o, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        options = (*ctx.params, cu_seqlens_q, cu_seqlens_k, *ctx.lengths)
        if ctx.packed:
            return torch.ops.fusedgpt.flash_attention_qkvpacked_bwd(do, *inputs, o, lse, *options), *[None] * 13
        return None, *torch.ops.fusedgpt.flash_attention_bwd(do, *inputs, o, lse, *options), *[None] * 10


# --------------------------------------------------------------------------- public

_OP = "flash_attention"
# Triton grids allow 65535 programs along their second and third axes (heads, batch).
MAX_GRID_YZ = 65535


def _check_dropout(op: str, dropout_p: object, seed: object) -> tuple[float, Optional[int]]:
    """``(dropout_p, seed)`` as Python scalars, after checking them; ``seed`` may be None."""
    dropout_p = check_number(op, "dropout_p", dropout_p, at_least=0.0, below=1.0)
    return dropout_p, None if seed is None else check_number(op, "seed", seed, integer=True, at_least=0, below=2**63)


def _check_tensors(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(_OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
    check_same_dtype(_OP, "q", q, k=k, v=v)
    check_same_device(_OP, q=q, k=k, v=v)
    b, h, tq, d = q.shape
    h_kv = k.shape[1]
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (b, h_kv, d):
            raise ValueError(
                f"{_OP}: {name} must have shape (B, H_kv, Tk, D) = ({b}, H_kv, Tk, {d}) to match q "
                f"{tuple(q.shape)}, with k's H_kv = {h_kv}; got {tuple(t.shape)}"
            )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{_OP}: k and v must have the same length Tk, got {k.shape[2]} and {v.shape[2]}")
    if tq < 1 or k.shape[2] < 1 or d < 1 or h_kv < 1:
        raise ValueError(
            f"{_OP}: sequence lengths, heads and head dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if h % h_kv:
        raise ValueError(
            f"{_OP}: q's heads H = {h} must be a multiple of k and v's heads H_kv = {h_kv} (grouped-query attention)"
        )


def _check_cu_seqlens(name: str, cu_seqlens: object, total: int, max_seqlen: object, q: Tensor) -> int:
    """``max_seqlen`` as an int, after checking the offsets ``cu_seqlens`` of sequences
    packed into ``total`` tokens. Their values are read (one device-to-host copy) except
    under ``torch.compile``, where reading them would break the graph and they are trusted."""
    max_name = name.replace("cu_seqlens", "max_seqlen")
    check_tensor(_OP, name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{_OP}: {name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{_OP}: {name} must have shape (N + 1,) with N >= 1 sequences, got {tuple(cu_seqlens.shape)}")
    check_same_device(_OP, q=q, **{name: cu_seqlens})
    if max_seqlen is None:
        raise ValueError(f"{_OP}: {max_name} is required with {name}")
    max_seqlen = check_number(_OP, max_name, max_seqlen, integer=True, at_least=1)
    if not torch.compiler.is_compiling():
        offsets = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or offsets[-1] != total or min(lengths) < 0:
            raise ValueError(
                f"{_OP}: {name} must rise from 0 to the packed length {total} without decreasing, got {offsets}"
            )
        if max(lengths) > max_seqlen:
            raise ValueError(f"{_OP}: {max_name} = {max_seqlen} is less than the longest sequence, {max(lengths)}")
    return max_seqlen


def _check_varlen(
    q: Tensor, k: Tensor, cu_seqlens_q: object, cu_seqlens_k: object, max_seqlen_q: object, max_seqlen_k: object
) -> tuple[Optional[int], Optional[int]]:
    """``(max_seqlen_q, max_seqlen_k)`` as ints for packed sequences, ``(None, None)`` for
    dense batches, after checking them."""
    given = {name: value for name, value in (
        ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
        ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)) if value is not None}
    if not given:
        return None, None
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError(f"{_OP}: packed sequences need both cu_seqlens_q and cu_seqlens_k, got only {sorted(given)}")
    if q.shape[0] != 1:
        raise ValueError(
            f"{_OP}: with cu_seqlens, q, k and v hold the packed tokens in one batch row (1, H, total, D), "
            f"got batch {q.shape[0]}"
        )
    max_seqlen_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[2], max_seqlen_q, q)
    max_seqlen_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[2], max_seqlen_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{_OP}: cu_seqlens_q and cu_seqlens_k must count the same sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    return max_seqlen_q, max_seqlen_k


def _check_options(causal: object, softmax_scale: object, window: object, softcap: object) -> tuple:
    """``(causal, softmax_scale, window, softcap)`` as Python scalars (None where not given)."""
    causal = check_bool(_OP, "causal", causal)
    if softmax_scale is not None:
        softmax_scale = check_number(_OP, "softmax_scale", softmax_scale, above=0.0)
    if window is not None:
        window = check_number(_OP, "window", window, integer=True, at_least=1, below=2**31)
        if not causal:
            raise ValueError(f"{_OP}: window needs causal=True (it limits how far back a query looks)")
    if softcap is not None:
        softcap = check_number(_OP, "softcap", softcap, above=0.0)
    return causal, softmax_scale, window, softcap


def _kernel_unsupported(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor]) -> Optional[str]:
    """The reason the kernel cannot take this call (the dispatcher then uses the reference
    under ``auto`` and raises under ``triton``), or None."""
    b, h, _, d = q.shape
    if cu_seqlens_q is not None:
        b = cu_seqlens_q.numel() - 1
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
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, fused.

    Args:
        q: (B, H, Tq, D) float32, float16 or bfloat16 (float64 on the reference path); any
            strides — e.g. the views of a packed (B, T, 3, H, D) projection are read in
            place (a head dim with non-unit stride is copied first).
        k, v: (B, H_kv, Tk, D), q's dtype and device, with H_kv dividing H: query head h
            reads key/value head ``h // (H // H_kv)`` (grouped-query; H_kv = 1 is
            multi-query), in place. Tq, Tk >= 1 and may differ; D up to 128 on the kernel
            path (any D on the reference path).
        causal: mask aligned to the bottom right: query i sees key j iff
            ``j <= i + Tk - Tq``; rows that see no key (Tq > Tk) output 0.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        dropout_p: probability of dropping an attention weight, in [0, 1); the kept ones
            are scaled by ``1 / (1 - dropout_p)``.
        seed: the dropout seed; drawn from torch's generator when None. On the kernel path
            the same seed gives the same mask (see :func:`dropout_mask`); on the reference
            path a seed also gives a reproducible, but different, mask. Pass one under
            ``torch.compile``: drawing it is a graph break.
        window: sliding window (needs ``causal``): query i sees only the ``window`` keys
            ``i + Tk - Tq - window < j <= i + Tk - Tq``; the kernel skips key blocks
            outside it. An int >= 1; None for no window.
        softcap: logit soft-capping (Gemma 2): scores ``s = scale q.k`` become
            ``softcap * tanh(s / softcap)`` before the softmax. A float > 0, or None.
        cu_seqlens_q, cu_seqlens_k: packed variable-length sequences, as flash-attention's
            varlen API: int32 (N + 1,) offsets rising from 0 to the packed lengths; q is
            then (1, H, total_q, D) and k, v (1, H_kv, total_k, D), sequence n owning
            tokens ``cu_seqlens[n] .. cu_seqlens[n + 1]``. Each sequence attends only
            within itself, with ``causal`` and ``window`` aligned to its own bottom right;
            no padding is stored or computed. The offsets are checked on the host (one
            small device-to-host copy), except under ``torch.compile``.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (required with
            cu_seqlens; it sizes the launch).
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        (B, H, Tq, D) in q's dtype (stored as (B, Tq, H, D) on the kernel path). fp16/bf16
        use tensor cores with fp32 accumulation; fp32 is computed in true fp32 (no TF32).
        Non-finite input propagates on both paths: a NaN in a query row gives a NaN
        output row (and NaN gradients through it), as PyTorch's own ops do, never 0;
        only a row that the mask leaves without any key outputs 0.
    """
    return _attention(
        None, q, k, v, causal, softmax_scale, dropout_p, seed, window, softcap,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend,
    )


def flash_attention_qkvpacked(
    qkv: Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`flash_attention` of q, k, v packed in one tensor, as one projection makes them.

    Args:
        qkv: (B, T, 3, H, D) — e.g. a (B, T, 3 H D) projection viewed so; its last dim of
            unit stride. q = ``qkv[:, :, 0]``, k, v the next two, each read in place as
            (B, H, T, D).
        cu_seqlens, max_seqlen: packed variable-length sequences (B = 1), the same offsets
            for queries and keys.
        The other arguments as :func:`flash_attention`'s.

    Returns:
        (B, H, T, D) in qkv's dtype. On the kernel path qkv's gradient is one (B, T, 3, H,
        D) tensor that the backward kernels write in place: without this entry point,
        autograd would concatenate separate dq, dk, dv into it (one more read and write of
        it per call).
    """
    op = f"{_OP}_qkvpacked"
    if not isinstance(qkv, Tensor):
        raise TypeError(f"{op}: qkv must be a tensor, got {type(qkv).__name__}")
    check_float(op, "qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"{op}: qkv must be (B, T, 3, H, D), got shape {tuple(qkv.shape)}")
    if (cu_seqlens is None) != (max_seqlen is None):
        raise ValueError(f"{op}: cu_seqlens and max_seqlen go together, got only "
                         f"{'cu_seqlens' if max_seqlen is None else 'max_seqlen'}")
    return _attention(
        qkv, *_unpacked(qkv), causal, softmax_scale, dropout_p, seed, window, softcap,
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, backend,
    )


def _attention(
    qkv: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, causal: object, softmax_scale: object,
    dropout_p: object, seed: object, window: object, softcap: object, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: object, max_seqlen_k: object, backend: Optional[str],
) -> Tensor:
    """Checks, then the kernel or the reference path; ``qkv``: what q, k, v are views of, or None."""
    _check_tensors(q, k, v)
    causal, softmax_scale, window, softcap = _check_options(causal, softmax_scale, window, softcap)
    dropout_p, seed = _check_dropout(_OP, dropout_p, seed)
    max_seqlen_q, max_seqlen_k = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    path = _backend.choose(_OP, backend, (q, k, v), unsupported=_kernel_unsupported(q, k, v, cu_seqlens_q))
    if dropout_p > 0 and seed is None:
        seed = _draw_seed()
    if path == "triton":
        return _FlashAttentionFunction.apply(
            qkv, q, k, v, causal, scale, dropout_p, seed or 0, window, softcap,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        )
    mask = None
    if dropout_p > 0:
        generator = torch.Generator(device=q.device).manual_seed(seed)
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mask = torch.rand(shape, generator=generator, device=q.device) >= dropout_p
    return reference.attention(
        q, k, v, causal, scale, dropout_p, mask,
        window=window, softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
    )


# --------------------------------------------------------------------------- compile report


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """The launches a training step of ``workload`` (default gpt2) makes, recorded from the
    launchers on meta tensors laid out as the model's (q, k, v split from one projection,
    grouped-query where the workload has fewer key/value heads; o and dO (B, T, H, D)),
    causal, with dropout off and on: the forward; the fused backward (pass "bwd-fused":
    the delta preprocess, the dK/dV/dQ kernel) and the recompute backward (pass
    "bwd-recompute": delta, dK/dV, dQ); each autotune config the pruner keeps. For a workload with
    ``attention_features``, also the builds a user can launch at its shapes: a sliding
    window, soft-capping, the B sequences packed (``cu_seqlens``), and all three at once."""
    import sys

    from fusedgpt.kernels import compile_report as cr

    workload = workload or cr.WORKLOADS["gpt2"]
    b, t, h, d = workload.batch, workload.seq, workload.heads, workload.head_dim
    group = h // workload.key_value_heads
    item = torch.empty((), dtype=dtype).element_size()
    # The window and cap values are runtime arguments (the window is not even specialised):
    # any value builds the same kernel; these are Mistral's and Gemma 2's kind.
    window, softcap = t // 2, 50.0
    features = [dict()]
    if workload.attention_features:
        every = dict(window=window, softcap=softcap, packed=True)
        features += [dict(window=window), dict(softcap=softcap), dict(packed=True), every]
    # Bytes each kernel must move per query head (T x D tensors of ``item`` bytes, fp32
    # vectors of T, the fp32 T x D dQ sums; a key/value head is shared by ``group`` query
    # heads): forward q, k, v read, o written, logsumexp written; delta o, dO read, delta
    # written; dK/dV q, k, v, dO, lse, delta read, dK, dV written — fused: also dQ written
    # and its sums read and written once from HBM (the additions and the last program's
    # read hit L2, but the zeroed lines go back to HBM between calls and come in again);
    # dQ the same reads as dK/dV, dQ written. Matmul flops per 1K pairs the pass needs:
    # 2 forward (QK^T, PV), 5 backward (QK^T again, dP, dV, dK, dQ).
    tensors, vectors, sums = t * d * item, 4 * t, t * d * 4
    delta, dkdv = 2 * tensors + vectors, (2 + 4 / group) * tensors + 2 * vectors
    min_bytes = {  # pass -> kernel -> bytes
        "fwd": {"_attn_fwd_kernel": (2 + 2 / group) * tensors + vectors},
        "bwd-fused": {"_attn_bwd_delta_kernel": delta, "_attn_bwd_dkdv_kernel": dkdv + tensors + 2 * sums},
        "bwd-recompute": {"_attn_bwd_delta_kernel": delta, "_attn_bwd_dkdv_kernel": dkdv,
                          "_attn_bwd_dq_kernel": (3 + 2 / group) * tensors + 2 * vectors},
    }
    backward_flops = 5 * 2 * d * 1024
    mma_flops = {"fwd": 2 * 2 * d * 1024, "bwd-fused": backward_flops, "bwd-recompute": backward_flops}
    shown = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_DROPOUT")
    if workload.attention_features:
        shown += ("kv_group", "WINDOWED", "SOFTCAP", "VARLEN")
    module = sys.modules[__name__]
    found = []
    for feature in features:
        q, k, v = cr.attention_inputs(workload, dtype, packed=feature.get("packed", False))
        o = cr.meta_tensor(q.shape[0], q.shape[2], h, d, dtype=dtype).transpose(1, 2)
        lse = cr.meta_tensor(q.shape[0], h, q.shape[2], dtype=torch.float32)
        options = dict(window=feature.get("window"), softcap=feature.get("softcap"))
        if feature.get("packed"):
            cu_seqlens = cr.meta_tensor(b + 1, dtype=torch.int32)
            options.update(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=t, max_seqlen_k=t)
        # Per head and sequence, causal: T (T + 1) / 2 query-key pairs; within a window w
        # (w < T): w (w + 1) / 2 for the first w queries, then w each.
        w = feature.get("window") or t
        per_head = (w * (w + 1) / 2 + (t - w) * w) / 1024
        for dropout_p in (0.0, workload.dropout_p):
            with cr.launches(module, "_attn_fwd") as forward:
                flash_attention_forward(q, k, v, True, d ** -0.5, dropout_p, 1234, **options)
            backward = {}
            for fused in (True, False):
                kernels = ("_attn_bwd_delta_kernel", "_attn_bwd_fused", "_attn_bwd_dkdv", "_attn_bwd_dq")
                with cr.launches(module, *kernels) as recorded:
                    flash_attention_backward(o, q, k, v, o, lse, True, d ** -0.5, dropout_p, 1234, **options,
                                             fused=fused)
                backward["bwd-fused" if fused else "bwd-recompute"] = recorded
            for pass_, recorded in (("fwd", forward), *backward.items()):
                for launch, archs in _expanded_per_architecture(recorded):
                    if "BLOCK_N" in launch.args:  # the main kernels: BLOCK_M x BLOCK_N pairs per iteration
                        per_iteration, loops = launch.args["BLOCK_M"] * launch.args["BLOCK_N"] / 1024, "alternatives"
                        show = shown
                        if launch.args.get("ACCUMULATE_DQ"):
                            per_iteration, loops = _fused_loops(per_iteration, launch.args["BLOCK_N"] * per_head / t,
                                                                window=feature.get("window") is not None)
                    elif dropout_p or feature:  # the row kernels depend on neither: listed once
                        continue
                    else:  # delta: BLOCK_M queries of pairs / T keys on average
                        per_iteration, loops = launch.args["BLOCK_M"] * per_head / t, "sequence"
                        show = ("BLOCK_M", "BLOCK_D")
                    name = cr.python_function(launch.kernel).__name__
                    # The fused and the recompute backward's builds of the shared kernel.
                    show += ("ACCUMULATE_DQ",) if "ACCUMULATE_DQ" in launch.args else ()
                    found.append(dataclasses.replace(cr.jit_variant(
                        "attention", pass_, launch, workload=workload, show=show,
                        work=cr.Work("1K pairs", per_iteration, min_bytes[pass_][name] / per_head, mma_flops[pass_],
                                     loops),
                    ), archs=archs))
    return found


def _fused_loops(pairs: float, converted: float, window: bool) -> tuple[tuple, tuple]:
    """``(per_iteration, roles)`` of the fused dK/dV kernel's innermost loops, in address
    order (causal): the diagonal's masked query blocks, the unmasked ones (the main loop),
    with a window the masked blocks at its edge, then the last program's conversion of the
    dQ sums, ``converted`` units a block of rows, which every unit goes through once."""
    roles = ("masked", "main", "masked", "main") if window else ("masked", "main", "main")
    return (pairs,) * (len(roles) - 1) + (converted,), roles


def _expanded_per_architecture(recorded: list) -> list:
    """``(launch, archs)`` for each launch the recorded ones expand into (one per autotune
    config kept): ``archs`` () where sm_80 and sm_90 keep the config alike, else the one
    architecture whose list has it (``ARCH_HALF_CONFIGS``)."""
    global _listed_capability
    from fusedgpt.kernels import compile_report as cr

    def key(launch) -> tuple:
        args = tuple((name, id(value) if isinstance(value, Tensor) else value) for name, value in launch.args.items())
        return launch.kernel, args, tuple(sorted(launch.options.items()))

    per_arch = {}
    try:
        for capability in (8, 9):
            _listed_capability = capability
            per_arch[f"sm_{capability}0"] = [x for r in recorded for x in cr.expand(r)]
    finally:
        _listed_capability = None
    everywhere = {key(x) for x in per_arch["sm_80"]} & {key(x) for x in per_arch["sm_90"]}
    found = [(x, ()) for x in per_arch["sm_80"] if key(x) in everywhere]
    return found + [(x, (arch,)) for arch, launches in per_arch.items() for x in launches if key(x) not in everywhere]
