import math

import pytest
import torch

from fusedgpt.kernels import add_layer_norm, layer_norm, reference
from fusedgpt.kernels import layernorm as layernorm_module
from fusedgpt.kernels.backend import BackendUnavailableError
from tests.kernels.parity import assert_parity

SHAPES = [(1, 1), (3, 7, 768), (2, 5, 1023), (4, 3, 4099), (2, 9001), (1, 65536)]  # the last three loop over blocks


def _inputs(shape, dtype, device, bias=True, residual=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = shape[-1]
    inputs = dict(
        x=torch.randn(shape, generator=generator).mul(3).add(1).to(device, dtype),
        weight=torch.randn(n, generator=generator).to(device),
    )
    if residual:
        inputs["residual"] = torch.randn(shape, generator=generator).to(device, dtype)
    if bias:
        inputs["bias"] = torch.randn(n, generator=generator).to(device)
    return inputs


def test_widest_test_row_exceeds_largest_block():
    assert max(s[-1] for s in SHAPES) > layernorm_module.MAX_BLOCK_N


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_parity(shape, dtype, bias, device):
    assert_parity(
        lambda **kw: layer_norm(**kw, backend="triton"), reference.layer_norm, _inputs(shape, dtype, device, bias)
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_add_layer_norm_parity(shape, dtype, bias, device):
    # Gradients arrive through both outputs: normed, and summed (the residual stream).
    assert_parity(
        lambda **kw: add_layer_norm(**kw, backend="triton"),
        reference.add_layer_norm,
        _inputs(shape, dtype, device, bias, residual=True),
    )


@pytest.mark.parametrize("used", ["normed", "summed"])
def test_add_layer_norm_one_output_used(used, device):
    inputs = _inputs((3, 5, 300), torch.float32, device, residual=True)

    def first_or_second(fn):
        index = 0 if used == "normed" else 1
        return lambda **kw: fn(**kw)[index] * 1.5

    assert_parity(first_or_second(lambda **kw: add_layer_norm(**kw, backend="triton")),
                  first_or_second(reference.add_layer_norm), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_inputs(dtype, device):
    inputs = _inputs((6, 4, 200), dtype, device, residual=True)

    def strided(fn):
        # x: transposed (column stride != 1, copied on purpose); residual: a row-strided
        # slice (read in place through its row stride); weight: a stride-2 view.
        def call(x, residual, weight, bias):
            wide = torch.cat([residual, residual], dim=-1)[..., :200]
            return fn(x.transpose(0, 1), wide.transpose(0, 1), torch.stack([weight, weight], 1)[:, 0], bias)
        return call

    assert_parity(strided(lambda *a: add_layer_norm(*a, backend="triton")), strided(reference.add_layer_norm), inputs)
    assert_parity(
        lambda x, weight, bias: layer_norm(x[:, ::2], weight, bias, backend="triton"),
        lambda x, weight, bias: reference.layer_norm(x[:, ::2], weight, bias),
        _inputs((5, 6, 200), dtype, device),
    )


def test_half_weights_and_eps(device):
    inputs = _inputs((4, 33), torch.float16, device)
    inputs = {k: v.half() for k, v in inputs.items()}
    assert_parity(lambda **kw: layer_norm(**kw, eps=1e-3, backend="triton"),
                  lambda **kw: reference.layer_norm(**kw, eps=1e-3), inputs)


def test_empty_rows(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = layer_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=device))


def test_torch_compile_fullgraph_matches_eager(device):
    inputs = _inputs((2, 3, 64), torch.float32, device, residual=True)

    def block(x, residual, weight, bias, backend="triton"):
        normed, summed = add_layer_norm(x, residual, weight, bias, backend=backend)
        return layer_norm(normed.relu() + summed, weight, None, backend=backend)

    compiled = torch.compile(block, fullgraph=True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    eager_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    compiled(**leaves).square().sum().backward()
    block(**eager_leaves).square().sum().backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, eager_leaves[name].grad, rtol=1e-5, atol=1e-5)
    assert_parity(compiled, lambda **kw: block(**kw, backend="torch"), inputs)


def test_main_loops_move_only_the_rows_128_bits_at_a_time():
    # The sm_90 builds at GPT-2 width (768 of a 1024-wide block, 4 warps: 8 bf16 or fp32
    # features per thread), read from their SASS: per row, each loop moves only its rows
    # -- bf16 x, dy and outputs one LDG/STG.128 per thread, the fp32 stream and its
    # gradient two -- plus the fp32 row statistics. The weight and bias are loaded once
    # per program, outside the loops. (In a child process: the compile report needs the
    # real JIT kernels, not the interpreter's.)
    from tests.kernels.test_compile_report import run_report

    rows = run_report("layernorm", "--arch", "sm_90", "--dtype", "bf16")
    widths = {(row["pass"], row["config"].get("HAS_RESIDUAL", row["config"].get("HAS_DSUM"))): row["load_widths"]
              for row in rows}
    assert widths == {
        ("fwd", False): {"LDG.128": 1, "STG.128": 1, "STG.32": 2},  # x; y, mean and rstd
        ("fwd", True): {"LDG.128": 3, "STG.128": 3, "STG.32": 2},  # x, stream; summed, y
        ("bwd", False): {"LDG.128": 2, "LDG.32": 2, "STG.128": 1},  # dy, x, mean, rstd; dx
        ("bwd", True): {"LDG.128": 5, "LDG.32": 2, "STG.128": 3},  # dy, summed, d summed; d stream, d branch
    }


def _mixed_inputs(shape, device, branch_dtype):
    """A branch x in ``branch_dtype`` and an fp32 residual stream, as under autocast."""
    inputs = _inputs(shape, torch.float32, device, residual=True)
    inputs["x"] = inputs["x"].to(branch_dtype)
    return inputs


def _oracle(fn, out_dtype):
    """The reference with ``out_dtype``, except for the float64 oracle, which stays exact."""
    return lambda **kw: fn(**kw, out_dtype=None if kw["x"].dtype == torch.float64 else out_dtype)


@pytest.mark.parametrize("shape", [(3, 7, 768), (2, 4099)], ids=str)
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["out-default", "out-fp32"])
def test_add_layer_norm_fp16_branch_fp32_stream(shape, out_dtype, device):
    # summed keeps the stream's fp32, normed comes out in out_dtype (default: the branch's
    # fp16), and each input gets its gradient in its own dtype, from one backward pass.
    inputs = _mixed_inputs(shape, device, torch.float16)
    normed, summed = add_layer_norm(**inputs, out_dtype=out_dtype, backend="triton")
    assert summed.dtype == torch.float32 and normed.dtype == (out_dtype or torch.float16)
    assert_parity(lambda **kw: add_layer_norm(**kw, out_dtype=out_dtype, backend="triton"),
                  _oracle(reference.add_layer_norm, out_dtype), inputs)


def test_layer_norm_fp32_stream_to_fp16_output(device):
    inputs = _inputs((4, 5, 300), torch.float32, device)
    y = layer_norm(**inputs, out_dtype=torch.float16, backend="triton")
    assert y.dtype == torch.float16
    assert_parity(lambda **kw: layer_norm(**kw, out_dtype=torch.float16, backend="triton"),
                  _oracle(reference.layer_norm, torch.float16), inputs)


def test_mixed_dtypes_only_the_stream_is_used(device):
    inputs = _mixed_inputs((3, 50), device, torch.float16)
    assert_parity(lambda **kw: add_layer_norm(**kw, backend="triton")[1] * 2.0,
                  lambda **kw: reference.add_layer_norm(**kw)[1] * 2.0, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 7, 768), (2, 9001)], ids=str)
def test_bf16_branch_fp32_stream_gpu(shape):
    assert_parity(lambda **kw: add_layer_norm(**kw, backend="triton"), reference.add_layer_norm,
                  _mixed_inputs(shape, "cuda", torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_parity_gpu(shape):
    assert_parity(lambda **kw: add_layer_norm(**kw, backend="triton"), reference.add_layer_norm,
                  _inputs(shape, torch.bfloat16, "cuda", residual=True))


# ------------------------------------------------------------------ dispatch and bad input


def test_auto_sends_bf16_to_reference_under_interpreter():
    if torch.cuda.is_available():
        pytest.skip("on CUDA bf16 runs the kernel")
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.ones(8)
    torch.testing.assert_close(layer_norm(x, w), reference.layer_norm(x, w))
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        layer_norm(x, w, backend="triton")


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr("fusedgpt.kernels.backend.INTERPRETER_ON", False)
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(BackendUnavailableError, match="backend='triton'.*TRITON_INTERPRET"):
        layer_norm(x, w, backend="triton")
    # auto takes the reference, and so does the environment default
    torch.testing.assert_close(layer_norm(x, w), reference.layer_norm(x, w))


def test_env_var_chooses_default(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel ran although the torch backend was chosen")

    monkeypatch.setattr(layernorm_module, "layer_norm_forward", no_kernel)
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")
    x, w = torch.randn(2, 8), torch.ones(8)
    torch.testing.assert_close(layer_norm(x, w), reference.layer_norm(x, w))
    monkeypatch.setenv("FUSEDGPT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FUSEDGPT_BACKEND"):
        layer_norm(x, w)


def test_float64_goes_to_reference_under_auto(device):
    x = torch.randn(2, 8, dtype=torch.float64, device=device)
    w = torch.ones(8, dtype=torch.float64, device=device)
    torch.testing.assert_close(layer_norm(x, w), reference.layer_norm(x, w))
    with pytest.raises(BackendUnavailableError, match="float64"):
        layer_norm(x, w, backend="triton")


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x, w: layer_norm(x, torch.ones(7)), ValueError, "weight must have shape \\(8,\\)"),
        (lambda x, w: layer_norm(x, w, torch.ones(3)), ValueError, "bias must have shape"),
        (lambda x, w: layer_norm(x.long(), w), TypeError, "x must be float32"),
        (lambda x, w: layer_norm(x, w.int()), TypeError, "weight must be float32"),
        (lambda x, w: layer_norm(x, w, eps=0.0), ValueError, "eps must be a finite real number > 0, got 0.0"),
        (lambda x, w: layer_norm(x, w, eps=-1e-5), ValueError, "eps must be a finite real number > 0"),
        (lambda x, w: layer_norm(x, w, eps=math.inf), ValueError, "eps must be a finite real number > 0, got inf"),
        (lambda x, w: add_layer_norm(x, x, w, eps=math.nan), ValueError, "add_layer_norm: eps must be a finite"),
        (lambda x, w: layer_norm(x, w, eps="1e-5"), TypeError, "eps must be a finite real number"),
        (lambda x, w: layer_norm(x, w, eps=torch.tensor(1e-5)), TypeError, r"eps must be .*\(Tensor\)"),
        (lambda x, w: layer_norm(x, w, backend="cuda"), ValueError, "backend must be one of"),
        (lambda x, w: layer_norm(x.numpy(), w), TypeError, "x must be a torch.Tensor"),
        (lambda x, w: layer_norm(x, w.to("meta")), ValueError, "one device.*weight on meta"),
        (lambda x, w: add_layer_norm(x, x[:, :4], w), ValueError, "residual must have x's shape"),
        (lambda x, w: add_layer_norm(x, x.long(), w), TypeError, "residual must be float32"),
        (lambda x, w: layer_norm(x, w, out_dtype=torch.int8), TypeError, "out_dtype must be None, torch.float32"),
        (lambda x, w: layer_norm(x, w, out_dtype="bf16"), TypeError, "out_dtype must be"),
        (lambda x, w: layer_norm(torch.randn(3, 0), torch.ones(0)), ValueError, "last dimension"),
    ],
)
def test_bad_input(call, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel launched before the input was rejected")

    monkeypatch.setattr(layernorm_module, "layer_norm_forward", no_kernel)
    with pytest.raises(error, match=words):
        call(torch.randn(3, 8), torch.ones(8))
