"""Peak throughput of the GPUs that MFU and %-of-peak figures are measured against."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


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
