r"""SwiGLU, the gated MLP activation of Llama, Qwen and Mistral: ``silu(gate) * up``.

Forward, elementwise over (..., F):

    y = silu(g) * u = g * sigmoid(g) * u

Backward, with ``s = sigmoid(g)``:

    du = dy * g * s
    dg = dy * u * s * (1 + g * (1 - s))

computed in fp32 whatever the input dtype. Saved for backward: ``gate`` and ``up``
themselves (the projection output the caller already holds); ``y`` and ``sigmoid`` are
recomputed, never stored.

IO per element: forward reads g and u and writes y (3 x dtype bytes); backward reads dy,
g, u and writes dg, du (5 x dtype bytes), against 7 and 8 for eager silu-then-multiply.

``gate`` and ``up`` are read through their row strides, so the two halves of one packed
(..., 2F) projection (one matmul for both) are read in place. Passed as one tensor
(``swiglu(packed)``), the backward also writes both gradients into one (..., 2F) buffer,
which is exactly the packed projection's gradient: no copy either way.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedgpt.kernels import backend as _backend
from fusedgpt.kernels import reference
from fusedgpt.kernels.checks import as_rows, check_float, check_same_device, check_same_dtype, float64_unsupported
from fusedgpt.kernels.triton_compat import tl, triton

Tensor = torch.Tensor

MAX_BLOCK = 1024


# --------------------------------------------------------------------------- kernels


@triton.jit
def _sigmoid(x):
    """``1 / (1 + e^-x)`` from exp2 of a pre-scaled argument (one MUFU.EX2, without the
    range fix-up that ``tl.exp`` and ``tl.sigmoid`` wrap around it) and an approximate
    division (MUFU.RCP and a multiply; within 2 ulp): e^-x overflowing to inf gives 0."""
    return tl.fdiv(1.0, 1.0 + tl.exp2(x * -1.4426950408889634), ieee_rounding=False)


@triton.jit
def _load_pair(G, U, row, stride_g, stride_u, cols, mask):
    gate = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    return gate, up, _sigmoid(gate)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate, up, sig = _load_pair(G, U, row, stride_g, stride_u, cols, mask)
    tl.store(Y + row * stride_y + cols, (gate * sig * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, F, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate, up, sig = _load_pair(G, U, row, stride_g, stride_u, cols, mask)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    silu = gate * sig
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    dgate = dy * up * (sig + silu * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dgate.to(DG.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def block_config(f: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``f`` features: up to 1024 columns per program,
    8 per thread at most, so fp16 loads can be 128 bits wide."""
    block = min(max(triton.next_power_of_2(f), 128), MAX_BLOCK)
    return block, max(block // 256, 1)


def _grid(m: int, f: int, block: int) -> tuple[int, int]:
    return m, triton.cdiv(f, block)


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """Launch the forward on rows ``gate`` and ``up`` (M, F), each with unit column stride
    (row strides may differ); returns contiguous (M, F) in gate's dtype."""
    m, f = gate.shape
    y = torch.empty(m, f, dtype=gate.dtype, device=gate.device)
    if m * f == 0:
        return y
    block, num_warps = block_config(f)
    _swiglu_fwd_kernel[_grid(m, f, block)](
        gate, up, y, gate.stride(0), up.stride(0), y.stride(0), f, BLOCK=block, num_warps=num_warps
    )
    return y


def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> Tensor:
    """Launch the backward for rows (M, F); returns one (M, 2F) tensor, ``[dgate | dup]``,
    laid out as the gradient of a packed ``[gate | up]`` projection."""
    m, f = gate.shape
    dgate_up = torch.empty(m, 2 * f, dtype=gate.dtype, device=gate.device)
    if m * f == 0:
        return dgate_up
    dgate, dup = dgate_up[:, :f], dgate_up[:, f:]
    block, num_warps = block_config(f)
    _swiglu_bwd_kernel[_grid(m, f, block)](
        dy, gate, up, dgate, dup, dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), f,
        BLOCK=block, num_warps=num_warps,
    )
    return dgate_up


# ------------------------------------------------- torch.library ops (for torch.compile)


@torch.library.custom_op("fusedgpt::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_forward(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fusedgpt::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_backward(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape[0], 2 * gate.shape[1])


# --------------------------------------------------------------------------- autograd


class _SwigluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        """``up`` None: ``gate`` is the packed (..., 2F) ``[gate | up]`` projection."""
        if up is None:
            rows = as_rows(gate)
            f = rows.shape[1] // 2
            gate_rows, up_rows = rows[:, :f], rows[:, f:]
            shape = (*gate.shape[:-1], f)
        else:
            gate_rows, up_rows = as_rows(gate), as_rows(up)
            shape = gate.shape
        y = torch.ops.fusedgpt.swiglu_fwd(gate_rows, up_rows)
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.params = (gate.shape, up is None)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        gate_rows, up_rows = ctx.saved_tensors
        gate_shape, packed = ctx.params
        dgate_up = torch.ops.fusedgpt.swiglu_bwd(as_rows(dy), gate_rows, up_rows)
        if packed:
            return dgate_up.view(gate_shape), None
        f = gate_rows.shape[1]
        return dgate_up[:, :f].view(gate_shape), dgate_up[:, f:].view(gate_shape)


# --------------------------------------------------------------------------- public

_OP = "swiglu"


def _check(gate, up) -> None:
    check_float(_OP, "gate", gate)
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(f"{_OP}: gate must have shape (..., F) with F >= 1, got {tuple(gate.shape)}")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(
                f"{_OP}: without up, gate is the packed [gate | up] projection (..., 2F) and its last "
                f"dimension must be even, got {tuple(gate.shape)}"
            )
        return
    check_float(_OP, "up", up)
    if up.shape != gate.shape:
        raise ValueError(f"{_OP}: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_dtype(_OP, "gate", gate, up=up)
    check_same_device(_OP, gate=gate, up=up)


def swiglu(gate: Tensor, up: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``silu(gate) * up``, fused forward and backward.

    Args:
        gate: (..., F) float32, float16 or bfloat16 (float64 on the reference path); any
            strides (rows are read through their stride; a strided last dim is copied).
            Or, with ``up`` None, the packed (..., 2F) projection ``[gate | up]``.
        up: (..., F), gate's shape and dtype; or None (see ``gate``).
        backend: None (``$FUSEDGPT_BACKEND`` or ``auto``), ``"auto"``, ``"triton"``, ``"torch"``.

    Returns:
        (..., F) in gate's dtype, computed in fp32. With a packed input the gradient is
        written straight into one (..., 2F) tensor.
    """
    _check(gate, up)
    path = _backend.choose(_OP, backend, (gate, up), unsupported=float64_unsupported(gate, up))
    if path == "triton":
        return _SwigluFunction.apply(gate, up)
    return reference.swiglu(*gate.chunk(2, dim=-1)) if up is None else reference.swiglu(gate, up)


# --------------------------------------------------------------------------- compile report


def aot_variants(dtype: torch.dtype, workload=None) -> list:
    """The SwiGLU of ``workload``'s (default gpt2) MLP, 4C wide, on the halves of one packed
    (tokens, 8C) projection as a gated MLP computes it, recorded from the launchers on meta
    tensors: forward and backward."""
    import sys

    from fusedgpt.kernels import compile_report as cr

    workload = workload or cr.WORKLOADS["gpt2"]
    m, f = workload.tokens, 4 * workload.channels
    item = torch.empty((), dtype=dtype).element_size()
    packed = cr.meta_tensor(m, 2 * f, dtype=dtype)
    gate, up = packed[:, :f], packed[:, f:]
    module = sys.modules[__name__]
    with cr.launches(module, "_swiglu_fwd_kernel") as forward:
        swiglu_forward(gate, up)
    with cr.launches(module, "_swiglu_bwd_kernel") as backward:
        swiglu_backward(cr.meta_tensor(m, f, dtype=dtype), gate, up)
    # Per output element: forward reads gate and up, writes y; backward reads dy, gate and
    # up, writes both gradients. One program does BLOCK elements, without a loop.
    min_bytes = {"fwd": 3 * item, "bwd": 5 * item}
    return [
        cr.jit_variant("swiglu", pass_, launch, workload=workload, show=("BLOCK",),
                       work=cr.Work("element", launch.args["BLOCK"], min_bytes[pass_]))
        for pass_, launch in (("fwd", forward[0]), ("bwd", backward[0]))
    ]
