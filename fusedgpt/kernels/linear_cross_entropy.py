r"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without ever
holding the (N, V) logits.

The N tokens are processed in chunks of C rows, C chosen so that a chunk's logits take at
most ``CHUNK_BYTES``, in whole waves of the kernel's resident programs (one row each) on a
GPU (overridable with ``chunk_size``). A chunk's logits rows are ``logits_row_stride(V)``
apart (V rounded up to 64: 50304 for GPT-2), so that every row starts 16-byte aligned; the
padding columns are never written or read. Per chunk, for "mean" and "sum":

    logits = h_c @ W.T + b                          (C, V), torch/cuBLAS
    loss_c, and logits <- dloss/dlogits in place     one cross-entropy kernel launch
    grad_h[c] = dlogits @ W                          (C, H)
    grad_W   += dlogits.T @ h_c                      (V, H), fp32 accumulator
    grad_b   += sum over rows of dlogits             (V,),   fp32 accumulator

so the forward ends holding the gradients of the summed loss, and the backward only
multiplies them by the incoming scalar gradient (over n_kept for "mean"), in fp32, each
product rounded once as it is written in its input's dtype. The forward cannot fold that
scale in: with fp16 inputs a "mean" over thousands of tokens would push the stored
gradients under fp16's normal range before a loss scaler's large incoming gradient
(GradScaler's 65536) could lift them back. The weight and bias gradients stay in their
fp32 accumulators until then (a sum over N tokens may outgrow fp16, too), so beyond the
gradients themselves (the fp32 V x H weight accumulator, N x H for hidden: what eager
PyTorch's backward allocates too) the extra memory is one chunk of logits, never the
(N, V) logits. One chunk buffer serves every chunk and becomes its gradient in place.

"none" cannot be done that way: each row's loss gets its own incoming gradient, unknown
during the forward. The forward then computes only the losses and saves the per-row
logsumexp (as ``nll = lse - x_target``, 4 bytes per token), and the backward recomputes
each chunk's logits, runs the gradient pass of the kernel with the row gradients, then the
same matmuls: correct for any ``grad_output``, at the price of a second logits matmul.

The ``torch`` backend runs the same chunk loop with the per-chunk loss written in plain
PyTorch, in place (half-precision chunks are computed in an fp32 copy, and its chunks are
sized so that both fit the same budget), so it is just as lean. The naive ``F.linear`` +
``cross_entropy`` in ``reference.py`` is the tests' oracle, not a fallback.

A ``weight`` that is also the token embedding (a tied GPT-2 head) needs nothing special:
the gradient returned for it adds to the embedding's in autograd.

Mixed precision: under autocast the head's weight (and bias) is the fp32 master copy while
``hidden`` is fp16/bf16. The weight may then stay fp32: the Function casts it (and the bias)
to hidden's dtype once per call, before the chunk loop, for the matmuls, and returns its
gradient in fp32 straight from the fp32 accumulator. A cast by the caller would instead
come back through autograd as the accumulator rounded to half precision, then cast up to
fp32 again: two more passes over the V x H gradient, and its precision lost. (The
accumulator sums one half-precision product per chunk, cuBLAS's fp32 sum rounded once.)
Allowed dtypes:

    hidden            weight, bias (bias: weight's dtype)
    float32           float32
    float16           float16 or float32
    bfloat16          bfloat16 or float32
    float64           float64 (torch path only)

With ``reduction="none"`` the backward recomputes the logits and casts the fp32 weight once
more (6 bytes per weight element) rather than keep the half copy from the forward alive.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels.checks import (
    check_float, check_number, check_same_device, check_same_dtype, float64_unsupported,
)
from fusedgpt.kernels.cross_entropy import (
    check_loss_args,
    checked_target,
    cross_entropy_backward,
    cross_entropy_forward,
    cross_entropy_forward_backward_,
    reduce_loss,
    row_grad_scale,
    rows_per_wave,
)

Tensor = torch.Tensor

# Default budget for one chunk of logits (and, on the torch path with half-precision
# inputs, its fp32 working copy). 32 MiB keeps chunks of a GPT-2 vocabulary at a few
# hundred tokens: matmuls large enough for the tensor cores, 4% of an 8k-token batch's logits.
CHUNK_BYTES = 32 * 2**20

# Rows of a chunk's logits start a multiple of this many elements apart (GPT-2: 50304 for
# 50257 classes; the model's pad_vocab_multiple convention): 16-byte aligned rows, which
# the kernel loads and stores 128 bits at a time, and aligned leading dimensions for cuBLAS.
# The padding columns are never written or read.
ROW_ALIGN = 64


def logits_row_stride(vocab_size: int) -> int:
    """Elements between the starts of two rows of a chunk's logits: ``vocab_size`` rounded
    up to a multiple of ``ROW_ALIGN``."""
    return -(-vocab_size // ROW_ALIGN) * ROW_ALIGN


def default_chunk_size(num_tokens: int, vocab_size: int, dtype: torch.dtype, use_triton: bool,
                       wave: int = 1) -> int:
    """Tokens per chunk: as many as fit ``CHUNK_BYTES`` with one chunk's logits (rows
    ``logits_row_stride`` apart, plus the torch path's fp32 copy of half logits), moved to
    the nearest whole number of waves of ``wave`` rows (the rows the kernel runs at once on
    the whole GPU; so up to half a wave past the budget) unless that is none; at least 1,
    at most ``num_tokens``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_logit = itemsize + (4 if not use_triton and itemsize < 4 else 0)
    fits = CHUNK_BYTES // (logits_row_stride(vocab_size) * per_logit)
    waves = (2 * fits + wave - 1) // (2 * wave)  # fits / wave, rounded half down
    return max(1, min(num_tokens, waves * wave if waves else fits))


# ------------------------------------------------------------ the per-chunk loss


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and half inputs; fp64 stays fp64 (the torch path's oracle-grade mode)."""
    return torch.promote_types(dtype, torch.float32)


def _torch_chunk_loss(logits: Tensor, target: Tensor, nll: Optional[Tensor], grad_scale: Optional[Tensor],
                      ignore_index: int, label_smoothing: float, z_loss: float) -> tuple[Optional[Tensor], Tensor]:
    """The kernel's contract in plain PyTorch, without a second (C, V) temporary.

    ``nll`` None: compute the per-row loss and the saved ``r = lse - c`` (``c`` the target's
    logit, or 0 where it is -inf); otherwise reuse it. ``grad_scale`` given: overwrite
    ``logits`` with the gradient of ``sum_i grad_scale_i * loss_i``. The work is in fp32:
    in place for fp32 logits, in one fp32 copy otherwise. Rows whose target is no usable
    class are zeroed first (never computed with), and non-finite logits behave as in
    :func:`fusedgpt.kernels.cross_entropy`."""
    x = logits.to(_at_least_fp32(logits.dtype))
    v = x.shape[1]
    kept = target != ignore_index
    usable = kept & (target >= 0) & (target < v)
    x.masked_fill_(~usable[:, None], 0.0)
    safe_target = torch.where(usable, target, torch.zeros_like(target))[:, None]
    x_target = x.gather(1, safe_target).squeeze(1)
    target_infinite = x_target == float("-inf")
    ref = torch.where(target_infinite, 0.0, x_target)
    loss = None
    if nll is None:
        x_mean = x.mean(1) if label_smoothing else 0.0
        shift = x.amax(1)
        shift = shift.masked_fill(shift == float("-inf"), 0.0)  # an all -inf row: lse -inf, not nan
        x.sub_(shift[:, None]).exp_()  # x now holds exp(logits - shift)
        u = x_target - shift
        rest = x.scatter_(1, safe_target, 0.0).sum(1)  # over the other classes
        # As in the kernel: log1p keeps the digits of a confident row's small nll.
        nll = torch.where(target_infinite, shift, -u) + torch.log1p(torch.expm1(u) + rest)
        lse = ref + nll
        nll = torch.where(lse.isfinite(), nll, float("nan"))
        row_nll = torch.where(target_infinite, float("inf"), nll)
        loss = (1.0 - label_smoothing) * row_nll + label_smoothing * (lse - x_mean) + z_loss * lse.square()
        loss = torch.where(lse.isfinite(), loss, float("nan"))
        loss = torch.where(usable, loss, torch.where(kept, float("nan"), 0.0))
        to_probs = 1.0 / (u.exp() + rest)
    else:
        x.sub_(ref[:, None]).sub_(nll[:, None]).exp_()  # x now holds the probabilities
        lse = ref + nll
        to_probs = torch.ones_like(lse)
    if grad_scale is not None:
        scale = torch.where(usable & lse.isfinite(), grad_scale, torch.where(kept, float("nan"), 0.0))
        prob_factor = 1.0 + 2.0 * z_loss * lse
        x.mul_((to_probs * prob_factor * scale)[:, None]).sub_((label_smoothing / v * scale)[:, None])
        # The true class from p_t - 1 = expm1(-nll), as in the kernel; the scale makes it 0
        # (or nan) where the target is no class.
        row_nll = torch.where(target_infinite, float("inf"), nll)
        true_grad = torch.expm1(-row_nll) * prob_factor + 2.0 * z_loss * lse + label_smoothing * (1.0 - 1.0 / v)
        x.scatter_(1, safe_target, (true_grad * scale)[:, None])
        if x is not logits:
            logits.copy_(x)
    return loss, nll


def _triton_chunk_loss(logits: Tensor, target: Tensor, nll: Optional[Tensor], grad_scale: Optional[Tensor],
                       ignore_index: int, label_smoothing: float, z_loss: float) -> tuple[Optional[Tensor], Tensor]:
    """The same contract as :func:`_torch_chunk_loss`, one kernel launch."""
    args = (ignore_index, label_smoothing, z_loss)
    if nll is None and grad_scale is None:
        return cross_entropy_forward(logits, target, *args)
    if nll is None:
        return cross_entropy_forward_backward_(logits, target, grad_scale, *args)
    cross_entropy_backward(logits, target, nll, grad_scale, *args, out=logits)
    return None, nll


def _chunked(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], nll: Optional[Tensor],
    grad_scale: Optional[Tensor], needs_grad: list[bool], ignore_index: int, label_smoothing: float,
    z_loss: float, chunk_size: int, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass over the tokens, chunk by chunk.

    ``nll`` None: compute the per-row loss and nll; otherwise reuse them (the "none"
    backward). ``grad_scale`` (fp32, 0-dim or (N,)) given: also the gradients of
    ``sum_i grad_scale_i * loss_i`` for the inputs flagged in ``needs_grad`` (hidden,
    weight, bias). Returns ``(loss, nll, grad_hidden, grad_weight, grad_bias)``, each
    empty where not computed; ``grad_hidden`` in hidden's dtype, the other two in their
    fp32 (fp64 for fp64 inputs) accumulators.
    """
    chunk_loss: Callable = _triton_chunk_loss if use_triton else _torch_chunk_loss
    n, v = hidden.shape[0], weight.shape[0]
    device = hidden.device
    computes_loss = nll is None
    acc_dtype = _at_least_fp32(hidden.dtype)
    loss = torch.empty(n if computes_loss else 0, dtype=acc_dtype, device=device)
    if computes_loss:
        nll = torch.empty(n, dtype=acc_dtype, device=device)
    wants = [grad_scale is not None and flag for flag in needs_grad]
    grad_hidden = hidden.new_empty(hidden.shape if wants[0] else 0)  # contiguous, for mm(out=)
    weight_acc = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if wants[1] else None
    bias_acc = torch.zeros(v, dtype=acc_dtype, device=device) if wants[2] else None
    # One buffer for every chunk's logits: a fresh one per chunk would briefly hold two.
    # Its padding columns are zeroed, though no kernel or matmul should read them: with
    # uninitialised padding, the CPU bf16 matmul of the padded rows (oneDNN, torch 2.13)
    # returned non-finite values in about one call in four (the bf16 test below).
    padded = hidden.new_empty(min(n, chunk_size), logits_row_stride(v))
    padded[:, v:].zero_()
    buffer = padded[:, :v]
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        h = hidden[rows]
        logits = buffer[: rows.stop - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        scale = None if grad_scale is None else (grad_scale if grad_scale.dim() == 0 else grad_scale[rows])
        chunk_loss_, chunk_nll = chunk_loss(logits, target[rows], None if computes_loss else nll[rows], scale,
                                            ignore_index, label_smoothing, z_loss)
        if computes_loss:
            loss[rows], nll[rows] = chunk_loss_, chunk_nll
        # From here on ``logits`` holds the gradient of the chunk's logits.
        if wants[0]:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if wants[1]:
            if weight_acc.dtype == logits.dtype:
                weight_acc.addmm_(logits.t(), h)
            else:  # cuBLAS accumulates each chunk in fp32; chunks add up in fp32
                weight_acc += torch.mm(logits.t(), h)
        if wants[2]:
            bias_acc += logits.sum(0, dtype=acc_dtype)
    grad_weight = weight_acc if wants[1] else weight.new_empty(0)
    grad_bias = bias_acc if wants[2] else weight.new_empty(0)
    return loss, nll, grad_hidden, grad_weight, grad_bias


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], grad_scale: Optional[Tensor],
    needs_grad: list[bool], ignore_index: int, label_smoothing: float, z_loss: float, chunk_size: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _chunked(hidden, weight, target, bias, None, grad_scale, needs_grad, ignore_index, label_smoothing,
                    z_loss, chunk_size, use_triton)


def _fake_grads(hidden, weight, bias, wants, sums_dtype):
    return (
        torch.empty_like(hidden) if wants[0] else hidden.new_empty(0),
        torch.empty_like(weight, dtype=sums_dtype) if wants[1] else weight.new_empty(0),
        torch.empty_like(bias, dtype=sums_dtype) if wants[2] else weight.new_empty(0),
    )


@_linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, target, bias, grad_scale, needs_grad, ignore_index, label_smoothing, z_loss, chunk_size,
      use_triton):
    rows = hidden.new_empty(hidden.shape[0], dtype=_at_least_fp32(hidden.dtype))
    wants = [grad_scale is not None and flag for flag in needs_grad]
    return (rows, torch.empty_like(rows), *_fake_grads(hidden, weight, bias, wants, rows.dtype))


@torch.library.custom_op("fusedgpt::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], nll: Tensor, grad_rows: Tensor,
    needs_grad: list[bool], ignore_index: int, label_smoothing: float, z_loss: float, chunk_size: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # The weight's and bias's gradients stay in their fp32 (fp64) accumulators, as the
    # forward op's do: the Function writes them in the parameters' own dtype.
    _, _, grad_hidden, grad_weight, grad_bias = _chunked(
        hidden, weight, target, bias, nll, grad_rows, needs_grad, ignore_index, label_smoothing, z_loss,
        chunk_size, use_triton,
    )
    return grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy_bwd_op.register_fake
def _(hidden, weight, target, bias, nll, grad_rows, needs_grad, ignore_index, label_smoothing, z_loss, chunk_size,
      use_triton):
    return _fake_grads(hidden, weight, bias, needs_grad, _at_least_fp32(hidden.dtype))


# --------------------------------------------------------------------------- autograd


def _in_dtype_of(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """weight and bias in hidden's dtype, the dtype of the matmuls (no copy when they are)."""
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size,
                use_triton, grad_enabled):
        rows = hidden.reshape(-1, hidden.shape[-1])
        flat_target = target.reshape(-1).contiguous()
        # An fp32 master weight is cast once for the whole chunk loop (a no-op when it is
        # already in hidden's dtype); outside autograd, so its gradient skips the cast.
        matmul_weight, matmul_bias = _in_dtype_of(hidden, weight, bias)
        # needs_input_grad says what requires grad even under no_grad, where no backward comes.
        needs = ctx.needs_input_grad
        needs_grad = [grad_enabled and needs[0], grad_enabled and needs[1], grad_enabled and needs[3]]
        args = (ignore_index, label_smoothing, z_loss, chunk_size, use_triton)
        # "mean"/"sum": gradients of the summed loss now, scaled in the backward; "none":
        # after, from the saved nll.
        grad_scale = None
        if reduction != "none" and any(needs_grad):
            grad_scale = torch.ones((), dtype=_at_least_fp32(hidden.dtype), device=hidden.device)
        loss, nll, grad_hidden, grad_weight, grad_bias = torch.ops.fusedgpt.linear_cross_entropy_fwd(
            rows, matmul_weight, flat_target, matmul_bias, grad_scale, needs_grad, *args
        )
        if reduction == "none":
            ctx.save_for_backward(rows, weight, flat_target, bias, nll)
        else:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, flat_target)
        ctx.params = (reduction, needs_grad, args, hidden.shape, (hidden.dtype, weight.dtype, weight.dtype))
        return reduce_loss(loss, flat_target, ignore_index, reduction, target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        reduction, needs_grad, args, hidden_shape, dtypes = ctx.params
        if reduction == "none":
            rows, weight, flat_target, bias, nll = ctx.saved_tensors
            matmul_weight, matmul_bias = _in_dtype_of(rows, weight, bias)
            sums = torch.ops.fusedgpt.linear_cross_entropy_bwd(
                rows, matmul_weight, flat_target, matmul_bias, nll,
                row_grad_scale(grad_output, flat_target, args[0], "none"), needs_grad, *args,
            )
            # grad_hidden comes in hidden's dtype; the other two from their accumulators.
            grads = [g.to(dtype) for g, dtype in zip(sums, dtypes)]
        else:
            *sums, flat_target = ctx.saved_tensors
            scale = row_grad_scale(grad_output, flat_target, args[0], reduction).reshape(1)
            # A 1-element (not 0-dim) fp32 scale takes part in type promotion: an fp16
            # gradient is multiplied in fp32, not by the scale rounded to fp16; the product
            # is rounded once as it is written in the input's dtype (out=), not written in
            # fp32 and cast after.
            grads = [torch.mul(g, scale, out=g.new_empty(g.shape, dtype=dtype)) for g, dtype in zip(sums, dtypes)]
        grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, needs_grad))
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(hidden_shape)
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- checks

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_dtypes(op: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """weight in hidden's dtype, or float32 with half-precision hidden (an fp32 master
    weight under autocast); bias in weight's dtype. A TypeError otherwise."""
    if weight.dtype != hidden.dtype and not (weight.dtype == torch.float32 and hidden.dtype in HALF_DTYPES):
        allowed = f"hidden's dtype {hidden.dtype}" + (" or torch.float32" if hidden.dtype in HALF_DTYPES else "")
        raise TypeError(f"{op}: weight must have {allowed}, got {weight.dtype}")
    check_same_dtype(op, "weight", weight, bias=bias)


# --------------------------------------------------------------------------- public


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits.

    Args:
        hidden: (..., H) float32, float16 or bfloat16 (float64 on the torch path); any strides.
        weight: (V, H) on hidden's device, in hidden's dtype or, for fp16/bf16 hidden,
            float32 (an fp32 master weight under autocast: cast once per call for the
            matmuls, its gradient returned in fp32 from the fp32 accumulator). May be the
            token embedding (tied head).
        target: (...) int64 class indices in [0, V), or ``ignore_index``.
        bias: (V,) in weight's dtype, or None.
        ignore_index, reduction, label_smoothing, z_loss, validate: as in
            :func:`fusedgpt.kernels.cross_entropy` ("mean" of no kept row is 0).
        chunk_size: tokens per chunk; None sizes chunks so one chunk's logits take at most
            ``CHUNK_BYTES`` (32 MiB), in whole waves of the kernel's rows on a GPU.
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"`` or
            ``"torch"``: which per-chunk loss runs (the chunking is the same).

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or (...) for "none". For "mean"/"sum"
        the gradients of the summed loss are computed during the forward (the backward
        scales them by ``grad_output``, over n_kept for "mean", in fp32); for "none" the
        backward recomputes the logits chunk by chunk, so any ``grad_output`` is handled
        exactly.
    """
    op = "linear_cross_entropy"
    check_float(op, "hidden", hidden)
    check_float(op, "weight", weight)
    if bias is not None:
        check_float(op, "bias", bias)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{op}: hidden must have shape (..., H) with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (V, {hidden.shape[-1]}) with V >= 1 to match hidden's "
                         f"last dimension, got {tuple(weight.shape)}")
    _check_dtypes(op, hidden, weight, bias)
    vocab_size = weight.shape[0]
    if bias is not None and bias.shape != (vocab_size,):
        raise ValueError(f"{op}: bias must have shape ({vocab_size},) to match weight, got {tuple(bias.shape)}")
    ignore_index, label_smoothing, z_loss, validate = check_loss_args(
        op, target, hidden.shape[:-1], ignore_index, reduction, label_smoothing, z_loss, validate
    )
    if chunk_size is not None:
        chunk_size = check_number(op, "chunk_size", chunk_size, integer=True, at_least=1)
    check_same_device(op, hidden=hidden, weight=weight, target=target, bias=bias)
    use_triton = _backend.choose(op, backend, (hidden, weight, bias),
                                 unsupported=float64_unsupported(hidden)) == "triton"
    if validate:
        target = checked_target(op, target, vocab_size, ignore_index)
    num_tokens = target.numel()
    if chunk_size is None:
        wave = rows_per_wave(hidden.device, vocab_size, hidden.dtype, label_smoothing) if use_triton else 1
        chunk_size = default_chunk_size(num_tokens, vocab_size, hidden.dtype, use_triton, wave)
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size, use_triton,
        torch.is_grad_enabled(),
    )
