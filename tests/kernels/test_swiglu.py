import pytest
import torch

from fusedgpt.kernels import reference, swiglu
from fusedgpt.kernels.backend import BackendUnavailableError
from tests.kernels.parity import assert_parity

swiglu_module = __import__("fusedgpt.kernels.swiglu", fromlist=["swiglu"])

SHAPES = [(1, 1), (3, 7, 37), (2, 5, 1031), (4, 2048 + 3)]  # the last two span several blocks


def _inputs(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Gates over [-8, 8]: both tails of the sigmoid, where silu's gradient turns over.
    return dict(gate=torch.randn(shape, generator=generator).mul(4).to(device, dtype),
                up=torch.randn(shape, generator=generator).to(device, dtype))


def _kernel(gate, up=None):
    return swiglu(gate, up, backend="triton")


def _packed_reference(gate):
    return reference.swiglu(*gate.chunk(2, dim=-1))  # gate: the packed [gate | up]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_parity(shape, dtype, device):
    assert_parity(_kernel, reference.swiglu, _inputs(shape, dtype, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_packed_projection_parity(dtype, device):
    generator = torch.Generator().manual_seed(1)
    packed = torch.randn(3, 5, 2 * 300, generator=generator).mul(3).to(device, dtype)
    assert_parity(_kernel, _packed_reference, dict(gate=packed))


def test_packed_projection_needs_no_copy(device, monkeypatch):
    # Forward reads both halves in place; backward writes one (..., 2F) gradient buffer,
    # which reaches the packed tensor as it is.
    packed = torch.randn(2, 3, 2 * 40, device=device, requires_grad=True)
    seen = {}
    forward, backward = swiglu_module.swiglu_forward, swiglu_module.swiglu_backward
    monkeypatch.setattr(swiglu_module, "swiglu_forward", lambda g, u: seen.update(fwd=(g, u)) or forward(g, u))
    monkeypatch.setattr(swiglu_module, "swiglu_backward",
                        lambda dy, g, u: seen.setdefault("bwd", backward(dy, g, u)))
    swiglu(packed, backend="triton").sum().backward()
    gate, up = seen["fwd"]
    assert gate.data_ptr() == packed.data_ptr() and up.data_ptr() == packed[..., 40:].data_ptr()
    assert seen["bwd"].data_ptr() == packed.grad.data_ptr()


def test_halves_of_packed_projection_as_two_views(device):
    generator = torch.Generator().manual_seed(2)
    inputs = dict(proj=torch.randn(4, 3, 2 * 50, generator=generator).mul(3).to(device))

    def halves(fn):
        return lambda proj: fn(proj[..., :50], proj[..., 50:])

    assert_parity(halves(_kernel), halves(reference.swiglu), inputs)


def test_non_contiguous_inputs(device):
    inputs = _inputs((6, 4, 30), torch.float32, device)
    assert_parity(lambda gate, up: _kernel(gate.transpose(0, 1), up[::2].transpose(0, 1)),
                  lambda gate, up: reference.swiglu(gate.transpose(0, 1), up[::2].transpose(0, 1)),
                  dict(gate=inputs["gate"], up=torch.cat([inputs["up"], inputs["up"]])))


def test_empty_rows(device):
    gate = torch.randn(0, 3, 8, device=device, requires_grad=True)
    y = _kernel(gate, torch.randn(0, 3, 8, device=device))
    y.sum().backward()
    assert y.shape == (0, 3, 8) and gate.grad.shape == gate.shape


def test_torch_compile_fullgraph_matches_eager(device):
    def mlp(gate, up, backend="triton"):
        packed = torch.cat([gate, up], dim=-1)
        return swiglu(gate, up, backend=backend) + swiglu(packed, backend=backend)

    compiled = torch.compile(mlp, fullgraph=True)
    assert_parity(compiled, lambda **kw: mlp(**kw, backend="torch"), _inputs((2, 3, 24), torch.float32, device))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_parity_gpu(shape):
    assert_parity(_kernel, reference.swiglu, _inputs(shape, torch.bfloat16, "cuda"))


def test_float64_goes_to_reference_under_auto(device):
    gate, up = torch.randn(2, 8, dtype=torch.float64, device=device), torch.randn(2, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(swiglu(gate, up), reference.swiglu(gate, up))
    with pytest.raises(BackendUnavailableError, match="float64"):
        swiglu(gate, up, backend="triton")


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda g, u: swiglu(g, u[:, :4]), ValueError, r"swiglu: up must have gate's shape \(3, 8\)"),
        (lambda g, u: swiglu(g, u.half()), TypeError, "up must have gate's dtype"),
        (lambda g, u: swiglu(g.long(), u), TypeError, "gate must be float32"),
        (lambda g, u: swiglu(g, u.int()), TypeError, "up must be float32"),
        (lambda g, u: swiglu(g[:, :7]), ValueError, "packed .* must be even"),
        (lambda g, u: swiglu(g[:, :0], u[:, :0]), ValueError, "F >= 1"),
        (lambda g, u: swiglu(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "F >= 1"),
        (lambda g, u: swiglu(g.numpy(), u), TypeError, "gate must be a torch.Tensor"),
        (lambda g, u: swiglu(g, u.to("meta")), ValueError, "one device"),
        (lambda g, u: swiglu(g, u, backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(call, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel launched before the input was rejected")

    monkeypatch.setattr(swiglu_module, "swiglu_forward", no_kernel)
    with pytest.raises(error, match=words):
        call(torch.randn(3, 8), torch.randn(3, 8))
