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


def test_explicit_triton_never_falls_back(device):
    # On the test device the kernels run (CUDA, or the CPU under the interpreter), so the
    # op's own reason is what stops them.
    x = torch.randn(2, device=device)
    assert choose("op", "triton", [x]) == "triton"
    with pytest.raises(BackendUnavailableError, match="op: backend='triton' cannot run: head dim 256"):
        choose("op", "triton", [x], unsupported="head dim 256")


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("ON", True), ("Yes", True),
    ("0", False), ("false", False), ("off", False), ("", False),
])
def test_interpreter_switch_reads_every_spelling_triton_takes(value, expected, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend.interpreter_on() is expected


def test_interpreter_switch_off_when_unset(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend.interpreter_on() is False


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
