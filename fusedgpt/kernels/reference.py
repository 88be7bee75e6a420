"""Plain, differentiable PyTorch versions of every fused op.

Each is both the fallback the dispatcher takes where a kernel cannot run and the oracle the
tests compare the kernels against (called on float64 copies of the inputs). They are
written to be read: no fusion, no chunking, no tricks beyond computing half-precision
inputs in float32, which is what the kernels do too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs are computed in fp32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _residual_sum(x: Tensor, residual: Tensor) -> Tensor:
    """``x + residual`` computed in fp32 (fp64 for fp64 inputs) and stored in the
    residual's dtype: the stream keeps its precision whatever the branch's dtype."""
    dtype = _compute_dtype(x, residual)
    return (x.to(dtype) + residual.to(dtype)).to(residual.dtype)


def layer_norm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim; output in
    ``out_dtype`` (default x's dtype)."""
    dtype = _compute_dtype(x, weight, bias)
    y = F.layer_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), _cast(bias, dtype), eps)
    return y.to(out_dtype or x.dtype)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """``summed = x + residual`` (in the residual's dtype); returns ``(layer_norm(summed),
    summed)``, the first in ``out_dtype`` (default x's dtype)."""
    summed = _residual_sum(x, residual)
    return layer_norm(summed, weight, bias, eps, out_dtype=out_dtype or x.dtype), summed


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, offset: float = 0.0, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * (weight + offset)`` over the last dim; output in
    ``out_dtype`` (default x's dtype)."""
    dtype = _compute_dtype(x, weight)
    xf = x.to(dtype)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * (weight.to(dtype) + offset)
    return y.to(out_dtype or x.dtype)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """``summed = x + residual`` (in the residual's dtype); returns ``(rms_norm(summed),
    summed)``, the first in ``out_dtype`` (default x's dtype)."""
    summed = _residual_sum(x, residual)
    return rms_norm(summed, weight, eps, offset, out_dtype=out_dtype or x.dtype), summed


def apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    """RoPE: q (B, T, H, D) and k (B, T, H_kv, D) rotated pairwise by the rows of cos/sin
    (max_len, D/2) at ``positions`` ((T,) or (B, T); None = 0..T-1). Pairs are
    (x[i], x[i + D/2]), or (x[2i], x[2i+1]) when ``interleaved``. A position outside the
    table gives NaN outputs, as the kernel does."""
    t = q.shape[1]
    if positions is None:
        positions = torch.arange(t, device=q.device)
    valid = (positions >= 0) & (positions < cos.shape[0])
    rows = torch.where(valid, positions, torch.zeros_like(positions))
    nan_if_invalid = torch.where(valid, 0.0, float("nan")).unsqueeze(-1)

    def rotate(x: Tensor) -> Tensor:
        dtype = _compute_dtype(x, cos, sin)
        c = (cos.to(dtype)[rows] + nan_if_invalid).unsqueeze(-2)  # (T or B, T) -> (..., 1, D/2)
        s = sin.to(dtype)[rows].unsqueeze(-2)
        xf = x.to(dtype)
        a, b = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
        turned_a, turned_b = a * c - b * s, b * c + a * s
        if interleaved:
            return torch.stack((turned_a, turned_b), dim=-1).flatten(-2).to(x.dtype)
        return torch.cat((turned_a, turned_b), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, computed in fp32 (fp64 for fp64 inputs), in gate's dtype."""
    dtype = _compute_dtype(gate, up)
    return (F.silu(gate.to(dtype)) * up.to(dtype)).to(gate.dtype)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy over the last dim of ``logits`` (..., V) for int64 ``target`` (...).

    Per token: ``(1 - s) * (lse - logit[target]) + s * (lse - mean(logits)) + z * lse**2``
    with ``lse = logsumexp(logits)``, ``s`` the label smoothing and ``z`` the z-loss weight;
    0 where ``target == ignore_index``. ``mean`` divides by the number of tokens not ignored,
    and gives 0 (not nan) when every token is ignored. The loss is returned in fp32 (fp64 for
    fp64 logits). A target that is neither ``ignore_index`` nor a class in [0, V) (which
    the public ops let through with ``validate=False``) gives its token a NaN loss and a NaN
    gradient, as the kernel does, rather than an indexing error.

    Non-finite logits, as ``F.cross_entropy`` treats them: a token whose logsumexp is not
    finite (a NaN or a +inf logit, or every logit -inf) has a NaN loss and an all-NaN
    gradient; -inf logits are classes of probability 0 (a -inf target logit: an infinite
    loss with the finite gradient softmax - onehot). Ignored tokens are never read: whatever
    their logits hold, they add 0.
    """
    dtype = _compute_dtype(logits)
    flat = logits.reshape(-1, logits.shape[-1]).to(dtype)
    flat_target = target.reshape(-1)
    keep = flat_target != ignore_index
    bad = keep & ((flat_target < 0) | (flat_target >= flat.shape[-1]))
    safe_target = torch.where(keep & ~bad, flat_target, torch.zeros_like(flat_target))
    flat = torch.where(keep[:, None], flat, torch.zeros_like(flat))
    lse = torch.logsumexp(flat, dim=-1)
    target_logit = flat.gather(-1, safe_target[:, None]).squeeze(-1)
    loss = (1.0 - label_smoothing) * (lse - target_logit)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - flat.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    nan_rows = bad | ~torch.isfinite(lse.detach())
    loss = loss * torch.where(nan_rows, float("nan"), 1.0)  # a factor, so the gradient is NaN too
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp(min=1).to(dtype)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """The naive oracle: full logits ``hidden @ weight.T + bias``, then :func:`cross_entropy`.

    As the fused op: a weight and bias in another dtype than hidden's (fp32 master weights
    with half hidden) are cast to hidden's dtype for the matmul; their gradients come back
    through that cast in their own dtype."""
    logits = F.linear(hidden, weight.to(hidden.dtype), _cast(bias, hidden.dtype))
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing, z_loss)


def attention_mask(
    tq: int,
    tk: int,
    causal: bool = True,
    window: Optional[int] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """(tq, tk) bool, True where query i may see key j.

    Positions are aligned to the bottom right: query i sits at ``i' = i + tk - tq`` among
    the keys (so the last query sees every key, as decoding with a KV cache needs). Causal:
    ``j <= i'``; a window w also needs ``j > i' - w``. With ``cu_seqlens_q``/``cu_seqlens_k``
    ((N + 1,) offsets of N packed sequences) a query sees only keys of its own sequence,
    and i, j, tq, tk are taken within that sequence.
    """
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.tensor([0, tq], device=device)
        cu_seqlens_k = torch.tensor([0, tk], device=device)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    q_pos, k_pos = torch.arange(tq, device=cu_seqlens_q.device), torch.arange(tk, device=cu_seqlens_q.device)
    q_seq = torch.searchsorted(cu_seqlens_q, q_pos, right=True) - 1  # the sequence of each token
    k_seq = torch.searchsorted(cu_seqlens_k, k_pos, right=True) - 1
    q_len = cu_seqlens_q[q_seq + 1] - cu_seqlens_q[q_seq]
    k_len = cu_seqlens_k[q_seq + 1] - cu_seqlens_k[q_seq]  # of the query's sequence
    aligned = (q_pos - cu_seqlens_q[q_seq] + k_len - q_len)[:, None]  # i' of each query
    j = (k_pos - cu_seqlens_k[k_seq])[None, :]
    visible = q_seq[:, None] == k_seq[None, :]
    if causal:
        visible = visible & (j <= aligned)
    if window is not None:
        visible = visible & (j > aligned - window)
    return visible


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    *,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
) -> Tensor:
    """``softmax(mask(cap(q @ k.T * scale))) @ v`` for q (B, H, Tq, D), k and v (B, H_kv, Tk, D).

    Query head h reads key/value head ``h // (H // H_kv)`` (grouped-query attention; here
    by an explicit repeat). ``cap(s) = softcap * tanh(s / softcap)`` when ``softcap`` is
    given. The mask is :func:`attention_mask` (causal, window, packed sequences).
    ``dropout_mask`` (B, H, Tq, Tk) bool, True = keep, reproduces a given dropout draw
    (kept probabilities are scaled by ``1 / (1 - dropout_p)``); without it, ``dropout_p``
    draws from torch's generator. Rows that the mask leaves without any key output 0;
    every other row follows the data, so a NaN in a query row gives a NaN row. The
    (Tq, Tk) scores are materialised: this is the oracle and a fallback, not a fast path.
    """
    dtype = _compute_dtype(q, k, v)
    group = q.shape[1] // k.shape[1]
    qf = q.to(dtype)
    kf, vf = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    visible = attention_mask(q.shape[-2], k.shape[-2], causal, window, cu_seqlens_q, cu_seqlens_k, q.device)
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    # A row with no visible key is all nan after the softmax: 0 there, by the mask alone.
    probs = torch.where(visible, probs, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(dtype) / (1.0 - dropout_p)
    elif dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, vf).to(q.dtype)
