"""Triton, or a stand-in where Triton is not installed, for the kernel modules to import.

Triton ships for Linux only; on macOS, Windows or a CPU-only install without it, fusedgpt
still imports and runs every op on its plain-PyTorch reference. Kernel modules therefore
take Triton from here::

    from fusedgpt.kernels.triton_compat import tl, triton

With Triton installed these are the real ``triton`` and ``triton.language``. Without it
they are stand-ins that let the module-level code of a kernel file run — ``@triton.jit``,
``triton.autotune(...)``, ``triton.Config(...)``, ``triton.cdiv``, ``tl.constexpr(...)`` —
while any kernel launch raises :class:`~fusedgpt.kernels.backend.BackendUnavailableError`.
No launch is reached through the public ops: ``backend.py`` reads
:data:`TRITON_IMPORT_ERROR` and sends ``auto`` to the reference and refuses ``triton``.
Only what kernel files use at module level is stood in for; anything else fails at import,
which ``tests/kernels/test_without_triton.py`` would catch.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional


def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"Triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


# ``None`` when Triton imports, otherwise the reason it does not (checked once).
TRITON_IMPORT_ERROR: Optional[str] = _import_error()


class _KernelWithoutTriton:
    """What ``@triton.jit`` and ``triton.autotune`` make of a kernel when Triton is missing."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def _refuse(self, *args: Any, **kwargs: Any):
        from fusedgpt.kernels.backend import BackendUnavailableError  # backend imports this module

        raise BackendUnavailableError(f"cannot launch {self.fn.__name__}: {TRITON_IMPORT_ERROR}")

    __call__ = _refuse

    def __getitem__(self, grid: Any) -> Callable:
        return self._refuse


def _decorator(fn: Optional[Callable] = None, **options: Any):
    """``@decorator`` and ``@decorator(**options)`` alike."""
    if fn is not None:
        return _KernelWithoutTriton(fn)
    return _KernelWithoutTriton


class _Config:
    """A launch configuration, kept only to be read (``kwargs``, ``num_warps``, ...)."""

    def __init__(self, kwargs: dict, num_warps: int = 4, num_stages: int = 3, **options: Any) -> None:
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages
        self.__dict__.update(options)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


if TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl
else:
    triton = types.SimpleNamespace(
        jit=_decorator,
        autotune=lambda *args, **kwargs: _decorator,
        heuristics=lambda *args, **kwargs: _decorator,
        Config=_Config,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=_next_power_of_2,
    )
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)
