"""The scalar checks every public op runs on its numeric arguments and flags."""

import math

import numpy as np
import pytest
import torch

from fusedgpt.kernels import add_layer_norm, cross_entropy, flash_attention, layer_norm, linear_cross_entropy
from fusedgpt.kernels.checks import check_bool, check_number, check_out_dtype, check_same_dtype


@pytest.mark.parametrize("value", [0.25, 1, np.float32(0.25), np.float64(0.25), np.float16(0.25), np.int64(1)])
def test_number_accepts_python_and_numpy_scalars(value):
    checked = check_number("op", "x", value, at_least=0.0, at_most=1.0)
    assert type(checked) is float and checked == float(value)


def test_integer_accepts_numpy_integers_and_returns_int():
    checked = check_number("op", "n", np.int32(7), integer=True, at_least=1)
    assert type(checked) is int and checked == 7


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, np.float32("inf"), np.float64("nan"), 10**400])
def test_number_rejects_non_finite_values(value):
    with pytest.raises(ValueError, match="op: x must be a finite real number"):
        check_number("op", "x", value)


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.1", None, torch.tensor(0.1), [0.1], 1 + 2j])
def test_number_rejects_what_is_not_a_real_scalar(value):
    with pytest.raises(TypeError, match="op: x must be a finite real number"):
        check_number("op", "x", value)


@pytest.mark.parametrize("value", [2.0, np.float64(2.0), True])
def test_integer_rejects_floats_and_bools(value):
    with pytest.raises(TypeError, match="op: n must be an int >= 1"):
        check_number("op", "n", value, integer=True, at_least=1)


@pytest.mark.parametrize("bounds, inside, outside", [
    (dict(above=0.0), 1e-30, 0.0),
    (dict(at_least=0.0), 0.0, -1e-30),
    (dict(below=1.0), 0.5, 1.0),
    (dict(at_most=1.0), 1.0, 1.5),
])
def test_number_bounds(bounds, inside, outside):
    assert check_number("op", "x", inside, **bounds) == inside
    with pytest.raises(ValueError, match=f"got {outside}"):
        check_number("op", "x", outside, **bounds)


def test_integer_bounds_past_int64_are_named_as_powers_of_two():
    with pytest.raises(ValueError, match=r"^op: i must be an int >= -2\*\*63 and < 2\*\*63, got 9223372036854775808$"):
        check_number("op", "i", 2**63, integer=True, at_least=-(2**63), below=2**63)


def test_bool_accepts_python_and_numpy_bools():
    assert check_bool("op", "flag", np.bool_(True)) is True
    assert check_bool("op", "flag", False) is False


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)])
def test_bool_rejects_everything_else(value):
    with pytest.raises(TypeError, match="op: flag must be a bool"):
        check_bool("op", "flag", value)


def _same_result(call, numpy_options, python_options):
    torch.testing.assert_close(call(**numpy_options), call(**python_options), rtol=0, atol=0)


def test_every_public_op_takes_numpy_scalars(device):
    """Each op, on the kernel path, gives with numpy scalars exactly what it gives with the
    equal Python ones (the kernels and torch.library ops get Python numbers either way)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=generator).to(device)
    w = torch.randn(8, generator=generator).to(device)
    _same_result(lambda eps: layer_norm(x, w, eps=eps, backend="triton"),
                 dict(eps=np.float32(1e-3)), dict(eps=float(np.float32(1e-3))))
    _same_result(lambda eps: add_layer_norm(x, x, w, eps=eps, backend="triton")[0],
                 dict(eps=np.float64(1e-3)), dict(eps=1e-3))

    target = torch.tensor([0, 5, 7], device=device)
    loss_numpy = dict(ignore_index=np.int64(5), label_smoothing=np.float64(0.1), z_loss=np.float32(0.5),
                      validate=np.bool_(True))
    loss_python = dict(ignore_index=5, label_smoothing=0.1, z_loss=0.5, validate=True)
    _same_result(lambda **kw: cross_entropy(x, target, **kw, backend="triton"), loss_numpy, loss_python)
    head_weight = torch.randn(9, 8, generator=generator).to(device)
    _same_result(lambda **kw: linear_cross_entropy(x, head_weight, target, **kw, backend="triton"),
                 {**loss_numpy, "chunk_size": np.int64(2)}, {**loss_python, "chunk_size": 2})

    q, k, v = (torch.randn(1, 2, 5, 16, generator=generator).to(device) for _ in range(3))
    _same_result(lambda **kw: flash_attention(q, k, v, **kw, backend="triton"),
                 dict(causal=np.bool_(False), softmax_scale=np.float32(0.5), dropout_p=np.float64(0.25),
                      seed=np.uint32(7)),
                 dict(causal=False, softmax_scale=0.5, dropout_p=0.25, seed=7))


def test_same_dtype_skips_none_and_names_both_arguments():
    like = torch.zeros(2)
    check_same_dtype("op", "x", like, weight=torch.ones(3), bias=None)
    with pytest.raises(TypeError, match=r"^op: bias must have x's dtype torch.float32, got torch.float16$"):
        check_same_dtype("op", "x", like, weight=torch.ones(3), bias=torch.ones(3, dtype=torch.float16))


def test_out_dtype_defaults_and_rejects_non_float_dtypes():
    assert check_out_dtype("op", None, torch.float16) is torch.float16
    assert check_out_dtype("op", torch.bfloat16, torch.float32) is torch.bfloat16
    for bad in (torch.int64, "float32", float):
        with pytest.raises(TypeError, match="op: out_dtype must be None, torch.float32"):
            check_out_dtype("op", bad, torch.float32)
