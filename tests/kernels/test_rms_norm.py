import pytest
import torch

from fusedgpt.kernels import add_rms_norm, reference, rms_norm
from fusedgpt.kernels import layernorm as layernorm_module
from fusedgpt.kernels.backend import BackendUnavailableError
from tests.kernels.parity import assert_parity

SHAPES = [(1, 1), (3, 7, 96), (2, 5, 1023), (2, 4099)]  # the last loops over 4096-wide blocks


def _inputs(shape, dtype, device, residual=False, residual_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(shape, generator=generator).mul(3).add(1).to(device, dtype),
        weight=torch.randn(shape[-1], generator=generator).to(device),
    )
    if residual:
        inputs["residual"] = torch.randn(shape, generator=generator).to(device, residual_dtype or dtype)
    return inputs


def _oracle(fn, out_dtype=None, **options):
    """The reference with ``options``; ``out_dtype`` applies except to the float64 oracle,
    which stays float64 so it is exact."""
    def call(**kw):
        return fn(**kw, **options, out_dtype=None if kw["x"].dtype == torch.float64 else out_dtype)
    return call


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["plain", "gemma"])
def test_rms_norm_parity(shape, dtype, offset, device):
    assert_parity(lambda **kw: rms_norm(**kw, offset=offset, backend="triton"),
                  _oracle(reference.rms_norm, offset=offset), _inputs(shape, dtype, device))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_add_rms_norm_parity(shape, dtype, device):
    # Gradients arrive through both outputs: normed, and summed (the residual stream).
    assert_parity(lambda **kw: add_rms_norm(**kw, eps=1e-5, backend="triton"),
                  _oracle(reference.add_rms_norm, eps=1e-5), _inputs(shape, dtype, device, residual=True))


@pytest.mark.parametrize("shape", [(3, 7, 96), (2, 4099)], ids=str)
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["out-default", "out-fp32"])
def test_add_rms_norm_fp16_branch_fp32_stream(shape, out_dtype, device):
    # Mixed precision: fp16 branch x, fp32 residual stream; summed comes back fp32, normed
    # in out_dtype (default x's fp16), and each input's gradient in its own dtype.
    inputs = _inputs(shape, torch.float16, device, residual=True, residual_dtype=torch.float32)
    normed, summed = add_rms_norm(**inputs, out_dtype=out_dtype, backend="triton")
    assert summed.dtype == torch.float32 and normed.dtype == (out_dtype or torch.float16)
    assert_parity(lambda **kw: add_rms_norm(**kw, offset=1.0, out_dtype=out_dtype, backend="triton"),
                  _oracle(reference.add_rms_norm, out_dtype, offset=1.0), inputs)


def test_rms_norm_fp32_stream_to_fp16_output(device):
    inputs = _inputs((4, 5, 200), torch.float32, device)
    assert_parity(lambda **kw: rms_norm(**kw, out_dtype=torch.float16, backend="triton"),
                  _oracle(reference.rms_norm, torch.float16), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_head_qk_norm_on_packed_projection_view(dtype, device):
    # Qwen3 normalises each head of q and k over the head dim: rms_norm on a (B, T, H, D)
    # view of the packed q|k|v projection (B, T, H + 2 H_kv, D), strided in T.
    b, t, h, h_kv, d = 2, 5, 3, 1, 32
    generator = torch.Generator().manual_seed(1)
    inputs = dict(qkv=torch.randn(b, t, h + 2 * h_kv, d, generator=generator).to(device, dtype),
                  weight=torch.randn(d, generator=generator).to(device))

    def per_head(norm):
        def call(qkv, weight):
            q, k = qkv[:, :, :h], qkv[:, :, h:h + h_kv]
            return norm(q, weight), norm(k, weight)
        return call

    assert not inputs["qkv"][:, :, :h].is_contiguous()
    assert_parity(per_head(lambda t_, w: rms_norm(t_, w, backend="triton")),
                  per_head(lambda t_, w: reference.rms_norm(t_, w)), inputs)


def test_non_contiguous_inputs(device):
    inputs = _inputs((6, 4, 200), torch.float32, device, residual=True)

    def strided(fn):
        # x: transposed (copied on purpose); residual: a row-strided slice read in place.
        def call(x, residual, weight):
            wide = torch.cat([residual, residual], dim=-1)[..., :200]
            return fn(x.transpose(0, 1), wide.transpose(0, 1), weight)
        return call

    assert_parity(strided(lambda *a: add_rms_norm(*a, backend="triton")), strided(reference.add_rms_norm), inputs)


def test_only_the_stream_is_used(device):
    inputs = _inputs((3, 50), torch.float16, device, residual=True, residual_dtype=torch.float32)
    assert_parity(lambda **kw: add_rms_norm(**kw, backend="triton")[1] * 2.0,
                  lambda **kw: reference.add_rms_norm(**kw)[1] * 2.0, inputs)


def test_torch_compile_fullgraph_matches_eager(device):
    inputs = _inputs((2, 3, 64), torch.float32, device, residual=True)

    def block(x, residual, weight, backend="triton"):
        normed, summed = add_rms_norm(x, residual, weight, backend=backend)
        return rms_norm(normed.relu() + summed, weight, offset=1.0, backend=backend)

    compiled = torch.compile(block, fullgraph=True)
    assert_parity(compiled, lambda **kw: block(**kw, backend="torch"), inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_branch_fp32_stream_gpu(shape):
    inputs = _inputs(shape, torch.bfloat16, "cuda", residual=True, residual_dtype=torch.float32)
    assert_parity(lambda **kw: add_rms_norm(**kw, backend="triton"), reference.add_rms_norm, inputs)


def test_float64_goes_to_reference_under_auto(device):
    x = torch.randn(2, 8, dtype=torch.float64, device=device)
    w = torch.ones(8, dtype=torch.float64, device=device)
    torch.testing.assert_close(rms_norm(x, w), reference.rms_norm(x, w))
    with pytest.raises(BackendUnavailableError, match="float64"):
        rms_norm(x, w, backend="triton")


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x, w: rms_norm(x, torch.ones(7)), ValueError, r"rms_norm: weight must have shape \(8,\)"),
        (lambda x, w: rms_norm(x.long(), w), TypeError, "x must be float32"),
        (lambda x, w: rms_norm(x, w, eps=0.0), ValueError, "eps must be a finite real number > 0"),
        (lambda x, w: rms_norm(x, w, offset=float("nan")), ValueError, "offset must be a finite real number"),
        (lambda x, w: rms_norm(x, w, offset=True), TypeError, "offset must be a finite real number"),
        (lambda x, w: rms_norm(x, w, out_dtype=torch.int32), TypeError, "out_dtype must be"),
        (lambda x, w: rms_norm(x, w, backend="gpu"), ValueError, "backend must be one of"),
        (lambda x, w: add_rms_norm(x, x[:, :4], w), ValueError, "add_rms_norm: residual must have x's shape"),
        (lambda x, w: add_rms_norm(x, x.int(), w), TypeError, "residual must be float32"),
        (lambda x, w: rms_norm(x, w.to("meta")), ValueError, "one device"),
        (lambda x, w: rms_norm(torch.randn(3, 0), torch.ones(0)), ValueError, "last dimension"),
    ],
)
def test_bad_input(call, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel launched before the input was rejected")

    monkeypatch.setattr(layernorm_module, "layer_norm_forward", no_kernel)
    with pytest.raises(error, match=words):
        call(torch.randn(3, 8), torch.ones(8))
