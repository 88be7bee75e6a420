"""bench.kernels checks each provider with the tests' parity measure before timing it."""

import os

import pytest
import torch
import torch.nn.functional as F

from bench import kernels
from tests.kernels.launches import record_launches


def _inputs():
    torch.manual_seed(0)
    return kernels._leaves(kernels.LAYERNORM.make((7, 129), torch.float32, torch.device("cpu")))


def _layernorm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias)


def _wrong_gradient(x, weight, bias):
    # The right output, but the gradient of x doubled.
    out = _layernorm(x, weight, bias)
    return out + (out - out.detach())


def test_a_correct_provider_passes_with_its_error_as_a_fraction_of_the_bound():
    ratio = kernels.check_against_reference(kernels.LAYERNORM, _layernorm, _inputs(), "fwd+bwd")
    assert 0.0 <= ratio <= 1.0


def test_a_wrong_output_fails():
    with pytest.raises(AssertionError, match="output 0: max error"):
        kernels.check_against_reference(kernels.LAYERNORM, lambda **kw: _layernorm(**kw) * 1.001, _inputs(), "fwd")


def test_gradients_are_checked_unless_the_mode_is_forward_only():
    assert kernels.check_against_reference(kernels.LAYERNORM, _wrong_gradient, _inputs(), "fwd") <= 1.0
    with pytest.raises(AssertionError, match="grad of x"):
        kernels.check_against_reference(kernels.LAYERNORM, _wrong_gradient, _inputs(), "fwd+bwd")


def test_attention_providers_time_each_backward_and_leave_the_environment_as_it_was(monkeypatch):
    from fusedgpt.kernels import attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(attention.BACKWARD_ENV, raising=False)
    launched = record_launches(monkeypatch, attention, ("_attn_bwd_fused", "_attn_bwd_dq"))
    providers = {p: kernels.ATTENTION.providers[p] for p in ("fusedgpt", "fusedgpt-recompute-bwd")}
    op = kernels.OpBench(shapes={"one": [(1, 2, 17, 16)]}, make=kernels.ATTENTION.make, providers=providers,
                         reference=kernels.ATTENTION.reference, work=kernels.ATTENTION.work)
    rows = kernels.run_op("attention", op, "one", torch.float32, "bwd", torch.device("cpu"), smoke=True)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert set(launched) == {"_attn_bwd_fused", "_attn_bwd_dq"}
    assert attention.BACKWARD_ENV not in os.environ
