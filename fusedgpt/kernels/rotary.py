r"""Rotary position embeddings (RoPE) for q and k, and the cos/sin tables they read.

Each head vector of D features is split into D/2 pairs ``(a_i, b_i)``; pair i of the token
at position p turns by the angle ``p * f_i``, with ``f_i = theta^(-2i/D)`` (possibly
rescaled, see :func:`rotary_cache`):

    a'_i = a_i cos(p f_i) - b_i sin(p f_i)
    b'_i = b_i cos(p f_i) + a_i sin(p f_i)

Pairs are ``(x[i], x[i + D/2])`` (GPT-NeoX / Llama / Qwen layout, the default) or
``(x[2i], x[2i + 1])`` with ``interleaved=True`` (GPT-J, the original RoPE paper).

Backward: a rotation is orthogonal, so ``dx = R(-angle) dy``: the same kernel with the sine
negated. Nothing is saved but the cos/sin tables and the positions (the tables are
constants: they get no gradient).

IO per token: reads its q and k heads once and writes them once; one program handles all
heads of a token, so the token's cos/sin row (2 x D/2 fp32) is read once, not once per
head. q and k are read through their strides: views of a packed qkv projection are
rotated in place of a copy.

A separate op, not rotation fused into the attention kernel's Q/K loads: attention loads
each key block once per query block, so it would rotate every key T/BLOCK_M times; the KV
cache must hold rotated keys anyway (decoding re-reads them every step); and the extra pass
here costs one read and one write of q and k, small against attention's own traffic.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels import reference
from fusedgpt.kernels.checks import (
    check_bool, check_float, check_number, check_same_device, check_tensor, float64_unsupported,
    with_unit_last_stride,
)
from fusedgpt.kernels.triton_compat import tl, triton

Tensor = torch.Tensor

# A program rotates at most this many (head, pair) elements of q (or k) at a time.
MAX_TILE = 4096


# --------------------------------------------------------------------------- kernels


@triton.jit
def _turn(a, b, cos, sin):
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _rotate_heads(X, Y, x_token, y_token, stride_xh, stride_yh, n_heads, cos, sin, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotate every head of one token of X into Y, BLOCK_H heads at a time. Both layouts
    read and write whole contiguous runs of each head, so loads stay 128 bits wide."""
    pairs = tl.arange(0, BLOCK_HALF)
    features = tl.arange(0, 2 * BLOCK_HALF)
    for head_start in range(0, n_heads, BLOCK_H):
        # Offsets within one token's heads fit in 32 bits (they are below its row stride);
        # only the token's base offset needs 64, which keeps the per-head address math short.
        heads = head_start + tl.arange(0, BLOCK_H)
        x_ptrs = X + x_token + (heads * stride_xh)[:, None]
        y_ptrs = Y + y_token + (heads * stride_yh)[:, None]
        if INTERLEAVED:
            # The whole head, then its (even, odd) features split apart in registers.
            mask = (heads < n_heads)[:, None] & (features < 2 * half)[None, :]
            x = tl.load(x_ptrs + features[None, :], mask=mask, other=0.0).to(tl.float32)
            a, b = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
            a, b = _turn(a, b, cos, sin)
            y = tl.reshape(tl.join(a, b), (BLOCK_H, 2 * BLOCK_HALF))
            tl.store(y_ptrs + features[None, :], y.to(Y.dtype.element_ty), mask=mask)
        else:
            mask = (heads < n_heads)[:, None] & (pairs < half)[None, :]
            a = tl.load(x_ptrs + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(x_ptrs + half + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
            a, b = _turn(a, b, cos, sin)
            tl.store(y_ptrs + pairs[None, :], a.to(Y.dtype.element_ty), mask=mask)
            tl.store(y_ptrs + half + pairs[None, :], b.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN, POS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh,
    stride_table, stride_pos_b, stride_pos_t,
    T, H, H_KV, half, max_len,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
):
    # One program per token (b, t): all heads of q and k share its cos/sin row.
    token = tl.program_id(0).to(tl.int64)
    b = token // T
    t = token % T
    if HAS_POSITIONS:
        position = tl.load(POS + b * stride_pos_b + t * stride_pos_t).to(tl.int64)
    else:
        position = t
    # A position outside the table is never read out of bounds: it reads row 0 and turns
    # the token's outputs to NaN, so the mistake shows.
    valid = (position >= 0) & (position < max_len)
    row = tl.where(valid, position, 0) * stride_table
    pairs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + row + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    sin = tl.load(SIN + row + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    cos = tl.where(valid, cos, float("nan"))
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, Q_OUT, b * stride_qb + t * stride_qt, b * stride_qob + t * stride_qot, stride_qh, stride_qoh,
                  H, cos, sin, half, BLOCK_H, BLOCK_HALF, INTERLEAVED)
    _rotate_heads(K, K_OUT, b * stride_kb + t * stride_kt, b * stride_kob + t * stride_kot, stride_kh, stride_koh,
                  H_KV, cos, sin, half, BLOCK_H, BLOCK_HALF, INTERLEAVED)


# --------------------------------------------------------------------------- launchers


def block_config(head_dim: int, heads: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_HALF, num_warps)`` for ``heads`` (the larger of q's and k's head
    counts) of ``head_dim`` features: a tile of at most MAX_TILE (head, pair) elements,
    16 pairs per thread (two 128-bit loads of each half in 16-bit dtypes), so the per-head
    address and mask arithmetic of an iteration is shared by 32 features; at least 2 warps."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(heads), max(1, MAX_TILE // block_half))
    num_warps = min(max(block_h * block_half // 512, 2), 8)
    return block_h, block_half, num_warps


def rotary_forward(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor], interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, H_kv, D), any strides but a unit last one, by the
    rows of cos/sin (max_len, D/2) at ``positions`` ((T,) or (B, T) ints; None = 0..T-1);
    ``inverse`` rotates backwards (the gradient). Returns contiguous (B, T, H(_kv), D)
    tensors in q's and k's dtypes."""
    b, t, h, d = q.shape
    h_kv = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if b * t == 0:
        return q_out, k_out
    if positions is None:
        pos_strides = (0, 0)
    else:
        pos_strides = (0, positions.stride(0)) if positions.dim() == 1 else tuple(positions.stride())
    block_h, block_half, num_warps = block_config(d, max(h, h_kv))
    _rotary_kernel[(b * t,)](
        q, k, q_out, k_out, cos, sin, positions if positions is not None else cos,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        cos.stride(0), *pos_strides,
        t, h, h_kv, d // 2, cos.shape[0],
        BLOCK_H=block_h, BLOCK_HALF=block_half, INTERLEAVED=interleaved, INVERSE=inverse,
        HAS_POSITIONS=positions is not None,
        num_warps=num_warps,
    )
    return q_out, k_out


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::rotary", mutates_args=())
def _rotary_op(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor], interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    return rotary_forward(q, k, cos, sin, positions, interleaved, inverse)


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, interleaved, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


# --------------------------------------------------------------------------- autograd


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, interleaved):
        q_out, k_out = torch.ops.fusedgpt.rotary(q, k, cos, sin, positions, interleaved, False)
        ctx.save_for_backward(cos, sin, positions)
        ctx.params = interleaved
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, positions = ctx.saved_tensors
        dq, dk = torch.ops.fusedgpt.rotary(with_unit_last_stride(dq_out), with_unit_last_stride(dk_out),
                                           cos, sin, positions, ctx.params, True)
        return dq, dk, None, None, None, None


# --------------------------------------------------------------------------- public

_OP = "apply_rotary"


def _check(q, k, cos, sin, positions, interleaved) -> bool:
    """Raises on bad input; returns ``interleaved`` as a bool."""
    for name, t in (("q", q), ("k", k)):
        check_float(_OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must have 4 dimensions (B, T, H, D), got shape {tuple(t.shape)}")
    b, t, _, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, d):
        raise ValueError(
            f"{_OP}: k must have shape (B, T, H_kv, D) = ({b}, {t}, H_kv, {d}) to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if d == 0 or d % 2:
        raise ValueError(f"{_OP}: the head dim D must be even and >= 2, got {d}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_float(_OP, name, table)
        if table.dim() != 2 or table.shape[1] != d // 2 or table.shape[0] == 0:
            raise ValueError(
                f"{_OP}: {name} must have shape (max_len, D/2) = (max_len >= 1, {d // 2}), got {tuple(table.shape)}"
            )
    if sin.shape != cos.shape:
        raise ValueError(f"{_OP}: sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if positions is not None:
        check_tensor(_OP, "positions", positions)
        if positions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_OP}: positions must be int32 or int64, got {positions.dtype}")
        if positions.shape not in ((t,), (b, t)):
            raise ValueError(f"{_OP}: positions must have shape (T,) = ({t},) or (B, T) = ({b}, {t}), "
                             f"got {tuple(positions.shape)}")
    check_same_device(_OP, q=q, k=k, cos=cos, sin=sin, positions=positions)
    return check_bool(_OP, "interleaved", interleaved)


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Rotate queries and keys by their positions (RoPE).

    Args:
        q: (B, T, H, D) float32, float16 or bfloat16 (float64 on the reference path); any
            strides (e.g. a view of a packed (B, T, H + 2 H_kv, D) projection, read in place);
            a strided last dim is copied.
        k: (B, T, H_kv, D), same B, T, D; its dtype may differ from q's.
        cos, sin: (max_len, D/2) tables from :func:`rotary_cache` (no gradient flows to them).
        positions: None (token t is at position t), or (T,) / (B, T) int32/int64 positions,
            e.g. ``cache_length + arange(T)`` when decoding with a KV cache. A position
            outside [0, max_len) is never read out of bounds: its token's outputs are NaN
            (no host synchronisation is spent on checking).
        interleaved: pairs are (x[2i], x[2i+1]) instead of (x[i], x[i + D/2]).
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        ``(q_rotated, k_rotated)``, contiguous (B, T, H, D) and (B, T, H_kv, D) in q's and
        k's dtypes; the angles are applied in fp32.
    """
    interleaved = _check(q, k, cos, sin, positions, interleaved)
    tensors = (q, k, cos, sin)
    path = _backend.choose(_OP, backend, (*tensors, positions), unsupported=float64_unsupported(*tensors))
    if path == "triton":
        return _RotaryFunction.apply(with_unit_last_stride(q), with_unit_last_stride(k), cos.contiguous(),
                                     sin.contiguous(), positions, interleaved)
    return reference.apply_rotary(q, k, cos, sin, positions, interleaved)


def _llama3_frequencies(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1's rescaling: wavelengths longer than ``original / low_freq_factor`` are
    stretched by ``factor``, those shorter than ``original / high_freq_factor`` are kept,
    and the band between is interpolated linearly in ``original / wavelength``."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    periods_in_context = original * inv_freq / (2 * math.pi)  # = original / wavelength
    kept = ((periods_in_context - low) / (high - low)).clamp(0.0, 1.0)  # 1: high, 0: low frequency
    return inv_freq * (kept + (1.0 - kept) / factor)


_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rotary_cache(
    head_dim: int,
    max_len: int,
    theta: float = 10000.0,
    scaling: Optional[dict] = None,
    *,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor]:
    """The cos and sin tables of RoPE for positions 0..max_len-1.

    Args:
        head_dim: D, even.
        max_len: number of positions (>= 1).
        theta: the frequency base (10000 for Llama 2 and GPT-NeoX, 500000 for Llama 3).
        scaling: None (or ``{"rope_type": "default"}``), or Hugging Face's ``rope_scaling``
            for Llama 3.1+: ``{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}``.
        device: where the tables live.

    Returns:
        ``(cos, sin)``, each (max_len, D/2) float32; angles are computed in float64, so long
        positions keep their precision.
    """
    op = "rotary_cache"
    head_dim = check_number(op, "head_dim", head_dim, integer=True, at_least=2)
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even, got {head_dim}")
    max_len = check_number(op, "max_len", max_len, integer=True, at_least=1)
    theta = check_number(op, "theta", theta, above=1.0)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type == "llama3":
        missing = [key for key in _SCALING_KEYS["llama3"] if key not in scaling]
        if missing:
            raise ValueError(f"{op}: scaling of rope_type 'llama3' needs {missing}")
        for key in _SCALING_KEYS["llama3"]:
            check_number(op, f"scaling[{key!r}]", scaling[key], above=0.0)
        if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
            raise ValueError(f"{op}: scaling needs low_freq_factor < high_freq_factor, got {scaling}")
        inv_freq = _llama3_frequencies(inv_freq, scaling)
    elif rope_type != "default":
        raise ValueError(f"{op}: scaling's rope_type must be 'default' or 'llama3', got {rope_type!r}")
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


# --------------------------------------------------------------------------- compile report


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """The rotation of ``workload``'s (default gpt2) q and k as training runs it, recorded
    from the launcher on meta tensors: q (B, T, H, D) and k (B, T, H_kv, D) views of one
    packed (B, T, (H + 2 H_kv) D) projection (H_kv = H but for grouped-query workloads),
    positions 0..T-1; forward, and the backward's inverse rotation of the contiguous output
    gradients."""
    import sys

    from fusedgpt.kernels import compile_report as cr

    workload = workload or cr.WORKLOADS["gpt2"]
    b, t, h, d = workload.batch, workload.seq, workload.heads, workload.head_dim
    h_kv = workload.key_value_heads
    item = torch.empty((), dtype=dtype).element_size()
    qkv = cr.meta_tensor(b, t, h + 2 * h_kv, d, dtype=dtype)
    q, k = qkv[:, :, :h], qkv[:, :, h:h + h_kv]
    dq, dk = cr.meta_tensor(b, t, h, d, dtype=dtype), cr.meta_tensor(b, t, h_kv, d, dtype=dtype)
    cos, sin = cr.meta_tensor(t, d // 2, dtype=torch.float32), cr.meta_tensor(t, d // 2, dtype=torch.float32)
    module = sys.modules[__name__]
    with cr.launches(module, "_rotary_kernel") as forward:
        rotary_forward(q, k, cos, sin, None, False, False)
    with cr.launches(module, "_rotary_kernel") as backward:
        rotary_forward(dq, dk, cos, sin, None, False, True)
    # Per element of q or k: read once, written once. Each iteration of a head loop turns
    # up to BLOCK_H heads of D features (masked past the last head); q's and k's heads go
    # through one loop each.
    return [
        cr.jit_variant("rotary", pass_, launch, workload=workload, show=("BLOCK_H", "BLOCK_HALF", "INVERSE"),
                       work=cr.Work("element", min(launch.args["BLOCK_H"], h) * d, 2 * item))
        for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0]))
    ]
