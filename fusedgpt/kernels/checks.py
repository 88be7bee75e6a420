"""Input checks shared by the public ops (each raises before any kernel launches, with a
message that names the op and the argument), and the row layout the row-wise kernels take."""

from __future__ import annotations

from typing import Optional

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


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def float64_unsupported(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """The reason a kernel cannot take these tensors because one is float64, else None."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "float64 runs on the reference path only"
    return None


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride, copying only when the layout needs it
    (the layout every row-wise kernel takes)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
