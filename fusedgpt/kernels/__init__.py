"""Fused Triton kernels with plain-PyTorch references, chosen per call by ``backend.py``.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU
tensors through Triton's interpreter. Without Triton installed the package still imports,
and every op runs its reference (``triton_compat.py``).

How an op file reads
====================

Every op ``X`` lives in ``fusedgpt/kernels/X.py`` and is written in one dialect, so that a
new op (and its reviewer) can copy the shape of an existing one — ``swiglu.py`` is the
smallest whole example. Top to bottom:

1. **Docstring: the math.** Forward and backward formulas, what the forward saves for the
   backward, and the bytes moved (the IO cost the kernel should reach).
2. **Imports.** ``torch``; then ``backend as _backend`` and ``reference`` from
   ``fusedgpt.kernels`` (at the top: ``reference.py`` imports nothing of ours); the input
   checks from ``checks.py``; and ``from fusedgpt.kernels.triton_compat import tl, triton``
   — never ``import triton`` itself, so the package imports where Triton is not installed.
3. **``@triton.jit`` kernels**, small ``@triton.jit`` helpers first. Statistics in fp32,
   offsets that can pass 2**31 in int64, ragged tails masked; specialisations
   (``HAS_BIAS``, ``CAUSAL``, ...) are ``tl.constexpr`` flags, not copies of a kernel.
4. **Launchers** — ``X_forward(...)``, ``X_backward(...)``: plain functions that allocate the
   outputs, pick blocks and warps, and launch. No autograd and no validation (their callers
   validate), so benchmarks and other ops reuse them.
5. **``torch.library`` ops** — ``fusedgpt::X_fwd`` / ``fusedgpt::X_bwd`` wrapping the
   launchers, each with a ``register_fake`` that gives output shapes and dtypes, so
   ``torch.compile(fullgraph=True)`` traces the op and the memory audit runs it on fake
   tensors.
6. **``class _XFunction(torch.autograd.Function)``.** ``forward`` calls the library ops,
   saves tensors with ``ctx.save_for_backward`` and every non-tensor value the backward
   needs as one tuple, ``ctx.params = (...)``; ``backward`` unpacks ``ctx.params`` on its
   first line and returns one gradient (or ``None``) per ``forward`` argument.
7. **Checks** — ``_check(...)`` (or one ``_check_*`` per group of arguments): every argument
   through the helpers of ``checks.py`` — ``check_tensor`` / ``check_float`` for tensors,
   ``check_same_device`` / ``check_same_dtype`` across them, ``check_number`` /
   ``check_bool`` / ``check_out_dtype`` for scalars (they return the value normalised) —
   and shapes compared by hand with a ``ValueError`` that names the op, the argument and
   the expected shape. Nothing launches before the checks pass.
8. **The public function** ``X(..., *, backend=None)``: a docstring with shapes and dtypes;
   ``_check``; then ``path = _backend.choose(op, backend, tensors, unsupported=...)``, where
   ``unsupported`` is the op's own reason the kernel cannot take this call
   (``float64_unsupported(...)``, a head dim without a config) or ``None``; then
   ``_XFunction.apply(...)`` on ``"triton"`` and ``reference.X(...)`` otherwise.
9. **``aot_variants(dtype, workload)``** at the bottom: the launches the compile report
   builds for sm_80 / sm_90 (see ``compile_report.py``).

Around the file: ``reference.X`` in ``reference.py`` (differentiable PyTorch written for
clarity: the fallback and the tests' oracle); ``tests/kernels/test_X.py`` built on the
parity harness ``tests/kernels/parity.py`` (forward and every gradient against float64,
on awkward shapes), with bad-input tests for every check; the export below; and a section
in ``docs/ops.md``.
"""

from fusedgpt.kernels.attention import flash_attention, flash_attention_qkvpacked
from fusedgpt.kernels.backend import BackendUnavailableError
from fusedgpt.kernels.cross_entropy import cross_entropy
from fusedgpt.kernels.layernorm import add_layer_norm, layer_norm
from fusedgpt.kernels.linear_cross_entropy import linear_cross_entropy
from fusedgpt.kernels.rms_norm import add_rms_norm, rms_norm
from fusedgpt.kernels.rotary import apply_rotary, rotary_cache
from fusedgpt.kernels.swiglu import swiglu

__all__ = [
    "BackendUnavailableError", "add_layer_norm", "cross_entropy", "flash_attention", "flash_attention_qkvpacked", "layer_norm",
    "linear_cross_entropy", "add_rms_norm", "rms_norm", "apply_rotary", "rotary_cache",
    "swiglu",
]
