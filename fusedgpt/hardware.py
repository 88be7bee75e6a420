"""The machine the model runs on: which device a ``--device`` choice means, the backend
(fused Triton kernels or reference ops) and autocast that suit it, the ``--device`` and
``--backend`` options every command that runs a model takes, and the peak throughput of the GPUs that MFU and %-of-peak figures are
measured against."""

from __future__ import annotations

import argparse
import contextlib
from typing import ContextManager, NamedTuple, Optional

import torch

from fusedgpt.kernels.backend import BACKENDS

DEVICE_NAMES = "auto|cpu|cuda|cuda:N"


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means: ``"auto"`` is CUDA when available, else the CPU; anything
    else is a torch device name, and a CUDA one must be usable here.

    Raises:
        ValueError: not a device name, or a CUDA device this machine does not have.
    """
    if not isinstance(name, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {type(name).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be {DEVICE_NAMES}, got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def device_name(text: str) -> str:
    """``--device``'s argparse type: ``text`` when it names a device (whether this machine
    has it is checked when the command runs, by :func:`resolve_device`)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"expected {DEVICE_NAMES}, got {text!r}") from None
    return text


def add_device_arguments(parser: argparse.ArgumentParser, *, keep_unset: bool = False) -> None:
    """Add ``--device`` (default ``"auto"``) and ``--backend`` (default None: see
    :func:`choose_backend`) to a command's parser.

    Args:
        keep_unset: leave an option that was not typed out of the namespace
            (``argparse.SUPPRESS``), for a command whose defaults come from elsewhere too
            (``fusedgpt train``: its configuration file and the run it resumes).
    """
    group = parser.add_argument_group("device")
    group.add_argument("--device", type=device_name, default=argparse.SUPPRESS if keep_unset else "auto",
                       help=f"{DEVICE_NAMES} (default: auto, which is CUDA when available)")
    group.add_argument("--backend", choices=BACKENDS, default=argparse.SUPPRESS if keep_unset else None,
                       help="auto|triton|torch (default: auto on CUDA, torch on CPU)")


def choose_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """``requested`` when given; else the fused Triton kernels (``"auto"``) on CUDA and the
    reference ops (``"torch"``) elsewhere: the Triton interpreter is for verification and
    far too slow to train or generate with."""
    if requested is not None:
        return requested
    return "auto" if device.type == "cuda" else "torch"


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast over fp32 weights on CUDA; nothing elsewhere (the CPU path trains in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class Peaks(NamedTuple):
    bf16_tflops: float  # dense bf16 tensor-core TFLOP/s (no sparsity)
    memory_gbps: float  # HBM / GDDR bandwidth, GB/s


# Vendors' data sheets. Matched as substrings of torch.cuda.get_device_name, in this order,
# so the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
GPU_PEAKS: tuple[tuple[str, Peaks], ...] = (
    ("H200", Peaks(989.4, 4800.0)),
    ("H100 PCIe", Peaks(756.0, 2039.0)),
    ("H100 NVL", Peaks(835.0, 3938.0)),
    ("H100", Peaks(989.4, 3352.0)),  # SXM5
    ("A100-SXM4-80GB", Peaks(312.0, 2039.0)),
    ("A100 80GB PCIe", Peaks(312.0, 1935.0)),
    ("A100", Peaks(312.0, 1555.0)),  # 40 GB, SXM4 and PCIe
    ("L40S", Peaks(362.05, 864.0)),
    ("L4", Peaks(121.0, 300.0)),
    ("A10G", Peaks(70.0, 600.0)),
    ("RTX 4090", Peaks(165.2, 1008.0)),  # bf16 with fp32 accumulation
)


def gpu_peaks(device: torch.device) -> Optional[Peaks]:
    """The peaks of a CUDA device, or None for an unknown GPU or a non-CUDA device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in GPU_PEAKS if key in name), None)


def bf16_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None for an unknown GPU or a non-CUDA
    device (then no MFU is reported)."""
    peaks = gpu_peaks(device)
    return peaks.bf16_tflops * 1e12 if peaks else None
