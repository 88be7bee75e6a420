"""Input checks shared by the public ops (each raises before any kernel launches, with a
message that names the op and the argument), and the layouts the kernels take."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Union

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the reference path only: it is how the tests build their oracle.
REFERENCE_ONLY_DTYPES = (torch.float64,)


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    check_tensor(op, name, tensor)
    if tensor.dtype not in FLOAT_DTYPES + REFERENCE_ONLY_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float16 or bfloat16 (float64 on the reference path), "
            f"got {tensor.dtype}"
        )


def check_out_dtype(op: str, out_dtype: object, default: torch.dtype) -> torch.dtype:
    """``out_dtype``, or ``default`` for None, after checking it is a float dtype."""
    if out_dtype is None:
        return default
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES + REFERENCE_ONLY_DTYPES:
        raise TypeError(
            f"{op}: out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16 "
            f"(torch.float64 on the reference path), got {out_dtype!r}"
        )
    return out_dtype


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_same_dtype(op: str, like_name: str, like: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """A TypeError unless every tensor given (None skipped) has ``like``'s dtype: the
    kernels read these inputs as one dtype."""
    for name, t in tensors.items():
        if t is not None and t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")


_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _show_bound(bound: float) -> str:
    # The int64 limits read better as powers of two than as 19 digits.
    if isinstance(bound, int) and abs(bound) >= 2**31 and abs(bound) & (abs(bound) - 1) == 0:
        return f"{'-' if bound < 0 else ''}2**{abs(bound).bit_length() - 1}"
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def check_number(
    op: str,
    name: str,
    value: object,
    *,
    integer: bool = False,
    above: Optional[float] = None,
    at_least: Optional[float] = None,
    below: Optional[float] = None,
    at_most: Optional[float] = None,
) -> Union[int, float]:
    """``value`` as a Python ``float`` (``int`` when ``integer``), after checking it.

    Accepted: Python and numpy real scalars (numpy integers where ``integer``). A TypeError
    for anything else: bools (a flag where a number belongs is a mistake), strings, and
    tensors, even 0-dim ones (reading a CUDA tensor is a host synchronisation; pass
    ``.item()`` on purpose). A ValueError for nan, an infinity, or a value outside the
    bounds given: ``above`` / ``at_least`` (``>`` / ``>=``), ``below`` / ``at_most``
    (``<`` / ``<=``).
    """
    bounds = [(sign, bound) for sign, bound in ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
              if bound is not None]
    conditions = " and ".join(f"{sign} {_show_bound(bound)}" for sign, bound in bounds)
    wanted = ("an int" if integer else "a finite real number") + (f" {conditions}" if conditions else "")
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be {wanted}, got {value!r} ({type(value).__name__})")
    try:
        number = int(value) if integer else float(value)
        acceptable = math.isfinite(number) and all(_COMPARE[sign](number, bound) for sign, bound in bounds)
    except OverflowError:  # an int beyond a float's range
        acceptable = False
    if not acceptable:
        raise ValueError(f"{op}: {name} must be {wanted}, got {value!r}")
    return number


def check_bool(op: str, name: str, value: object) -> bool:
    """``value`` as a Python ``bool``; a TypeError unless it is one (or a numpy bool): a
    string such as ``"no"`` or a number would otherwise be read by its truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def float64_unsupported(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """The reason a kernel cannot take these tensors because one is float64, else None."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "float64 runs on the reference path only"
    return None


def with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it when its last dimension is strided: every kernel
    indexes that dimension with unit stride, and reads the others through their strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride, copying only when the layout needs it
    (the layout every row-wise kernel takes)."""
    return with_unit_last_stride(t.reshape(-1, t.shape[-1]))
