import pytest
import torch

from fusedgpt import hardware


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 3352.0),
        ("NVIDIA H100 PCIe", 2039.0),
        ("NVIDIA H200", 4800.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("NVIDIA A100-SXM4-40GB", 1555.0),
        ("NVIDIA L40S", 864.0),
        ("NVIDIA L4", 300.0),
        ("NVIDIA GeForce RTX 4090", 1008.0),
    ],
)
def test_gpu_names_match_the_most_specific_entry(name, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert hardware.gpu_peaks(torch.device("cuda")).memory_gbps == expected


def test_unknown_gpu_and_cpu_have_no_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert hardware.gpu_peaks(torch.device("cuda")) is None
    assert hardware.gpu_peaks(torch.device("cpu")) is None
