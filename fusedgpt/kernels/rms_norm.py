r"""RMSNorm (Llama, Qwen, Gemma), alone or after the residual add of a pre-norm block.

Forward, per row of N features (any leading shape is flattened to M rows):

    s     = x + r                      (add_rms_norm only; stored in r's dtype)
    rstd  = 1 / sqrt(sum(s^2) / N + eps)
    y     = s * rstd * (w + offset)    (offset = 1 for Gemma, which stores w as 1 + w')

Backward, with ``xhat = s * rstd`` and ``g = (w + offset) * dy``:

    ds = rstd * (g - xhat * mean(g * xhat))   (+ d summed, the gradient from the stream)
    dw = sum over rows of dy * xhat

Saved for backward: the normalised input and the fp32 ``rstd`` (M floats). IO: as
LayerNorm's (see ``layernorm.py``), less the mean and the bias.

RMSNorm is LayerNorm without the mean-centering and the bias, so it runs the same
kernels, launchers and autograd Function as ``layernorm.py``, with ``CENTERED=False``;
this file holds its public functions and its compile-report entries. Per-head q/k
normalisation (Qwen3) is ``rms_norm`` over the head dim of a (B, T, H, D) tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedgpt.kernels.layernorm import normalize

Tensor = torch.Tensor


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * (weight + offset)``.

    Args:
        x: (..., N) float32, float16 or bfloat16 (float64 on the reference path); any strides
            (rows are read through their stride when the last dimension is contiguous).
        weight: (N,) float on x's device; its dtype may differ from x's.
        eps: added to the mean square; > 0.
        offset: added to the weight (1.0 for Gemma's ``1 + weight``); a finite number.
        out_dtype: the output's dtype (default x's).
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        (..., N) in ``out_dtype``; the statistics are computed in fp32.
    """
    y, _ = normalize("rms_norm", x, None, weight, None, eps, centered=False, weight_offset=offset,
                     out_dtype=out_dtype, backend=backend)
    return y


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``summed = x + residual`` and ``rms_norm(summed)`` in one pass.

    Args:
        x: (..., N) the branch output, float32, float16 or bfloat16.
        residual: (..., N) the residual stream; its dtype may differ from x's (under
            autocast: x bf16, residual fp32); the sum is computed in fp32.
        weight, eps, offset, backend: as in :func:`rms_norm`.
        out_dtype: the dtype of ``normed`` (default x's dtype).

    Returns:
        ``(normed, summed)``, both (..., N): ``normed`` in ``out_dtype``, ``summed`` in the
        residual's dtype. Gradients reach ``x`` and ``residual`` through both outputs.
    """
    return normalize("add_rms_norm", x, residual, weight, None, eps, centered=False, weight_offset=offset,
                     out_dtype=out_dtype, backend=backend)


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """The add + RMSNorm of a pre-norm block at ``workload``'s width (default gpt2), forward
    and backward, on the LayerNorm kernels with ``CENTERED=False`` (see
    :func:`fusedgpt.kernels.layernorm.norm_variants`)."""
    from fusedgpt.kernels import compile_report as cr
    from fusedgpt.kernels.layernorm import norm_variants

    return norm_variants("rms_norm", dtype, workload or cr.WORKLOADS["gpt2"], centered=False)
