import pytest
import torch

from fusedgpt.kernels import backend
from fusedgpt.kernels.backend import BackendUnavailableError, choose


def test_torch_is_always_honoured():
    assert choose("op", "torch", [torch.randn(2)]) == "torch"
    assert choose("op", "TORCH", [torch.randn(2)], unsupported="anything") == "torch"


def test_auto_takes_the_reference_for_what_the_kernel_does_not_support():
    x = torch.randn(2)
    expected = "triton" if backend.INTERPRETER_ON else "torch"
    assert choose("op", "auto", [x]) == expected
    assert choose("op", "auto", [x], unsupported="head dim 256") == "torch"


def test_explicit_triton_never_falls_back():
    with pytest.raises(BackendUnavailableError, match="op: backend='triton' cannot run: head dim 256"):
        choose("op", "triton", [torch.randn(2)] if backend.INTERPRETER_ON else [], unsupported="head dim 256")


def test_mixed_or_unsupported_devices_are_not_run_by_triton():
    reason = backend.why_triton_cannot_run([torch.randn(2), torch.randn(2, device="meta")])
    assert reason is not None and "meta" in reason
    assert choose("op", "auto", [torch.randn(2, device="meta")]) == "torch"


def test_absent_optional_tensors_are_ignored():
    assert backend.why_triton_cannot_run([torch.randn(2), None]) == backend.why_triton_cannot_run([torch.randn(2)])


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        choose("op", "cuda", [])


def test_reduction_programs_on_cpu():
    assert backend.num_programs_for_reduction(torch.device("cpu"), 3) == 3
    assert backend.num_programs_for_reduction(torch.device("cpu"), 1000) == 8
    assert backend.num_programs_for_reduction(torch.device("cpu"), 0) == 1
