"""The one place that decides, for each call, whether an op runs its Triton kernel or the
plain-PyTorch reference.

Choices (the ``backend=`` argument of every public op, or the ``FUSEDGPT_BACKEND``
environment variable when the argument is ``None``):

- ``"auto"`` (default): Triton for CUDA tensors, and for CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET`` set to 1, true, on or yes before Triton was
  imported); the reference for anything else and for whatever the kernel says it does not
  support.
- ``"triton"``: the kernel, or a :class:`BackendUnavailableError` that says why it cannot
  run (Triton not installed, CPU tensors without the interpreter, ...). It never falls
  back silently.
- ``"torch"``: the reference.
"""

from __future__ import annotations

import os
from typing import Iterable, Literal, Optional

import torch

from fusedgpt.kernels.triton_compat import TRITON_IMPORT_ERROR

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "FUSEDGPT_BACKEND"


def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` now turns Triton's interpreter on, read by Triton's own
    knob (so every spelling Triton takes counts: 1, true, on, yes, in any case); False
    when Triton does not import (``TRITON_IMPORT_ERROR`` says why)."""
    if TRITON_IMPORT_ERROR:
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)


# Triton decides at decoration time whether @triton.jit builds an interpreted function, so
# what counts is the variable as it was when the kernels were imported, not as it is now.
INTERPRETER_ON: bool = interpreter_on()


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for where the kernel cannot run."""


def default_backend() -> str:
    """The backend used when an op gets ``backend=None``: ``$FUSEDGPT_BACKEND`` or ``auto``."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {BACKENDS}")
    return name


def why_triton_cannot_run(tensors: Iterable[Optional[torch.Tensor]]) -> Optional[str]:
    """The reason the Triton path cannot run on these tensors, or ``None`` when it can."""
    present = [t for t in tensors if t is not None]
    if TRITON_IMPORT_ERROR:
        return TRITON_IMPORT_ERROR
    device_types = {t.device.type for t in present}
    if device_types == {"cuda"}:
        return None
    if device_types == {"cpu"}:
        if not INTERPRETER_ON:
            return (
                "tensors are on the CPU and the Triton interpreter is off "
                "(set TRITON_INTERPRET=1 before importing fusedgpt to run the kernels on CPU)"
            )
        if any(t.dtype == torch.bfloat16 for t in present):
            return "the Triton interpreter does not support bfloat16"
        return None
    return f"Triton kernels run on CUDA tensors (or CPU under the interpreter), got {sorted(device_types)}"


def choose(
    op: str,
    backend: Optional[str],
    tensors: Iterable[Optional[torch.Tensor]],
    unsupported: Optional[str] = None,
) -> Literal["triton", "torch"]:
    """Pick the path for one call of ``op``.

    ``unsupported`` is the op's own reason the kernel cannot take this call (a head dim it
    has no config for, say), or ``None``.
    """
    name = default_backend() if backend is None else str(backend).lower()
    if name not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if name == "torch":
        return "torch"
    reason = why_triton_cannot_run(tensors) or unsupported
    if name == "triton":
        if reason:
            raise BackendUnavailableError(f"{op}: backend='triton' cannot run: {reason}")
        return "triton"
    return "torch" if reason else "triton"


def num_programs_for_reduction(device: torch.device, rows: int) -> int:
    """How many persistent programs a two-stage reduction over ``rows`` should use."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    # Under the interpreter each program is a Python loop iteration; a few suffice.
    return max(1, min(rows, 8))
