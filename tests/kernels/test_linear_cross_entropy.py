import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fusedgpt.kernels import linear_cross_entropy, reference
from tests.kernels.parity import assert_parity
from tests.kernels.test_cross_entropy import DTYPES, ROW_SHAPES, assert_covers_every_pair, case_id, make_target

lce_module = importlib.import_module("fusedgpt.kernels.linear_cross_entropy")
ce_module = importlib.import_module("fusedgpt.kernels.cross_entropy")

HIDDEN = 24
BACKENDS = ("triton", "torch")  # the same chunk loop, with the kernel or plain PyTorch per chunk
CHUNK = {1: 1, 7: 3, 300: 64}  # "chunked" cases: several chunks (one for N = 1), the last one short

FACTORS = dict(
    v=(8, 41, 50257), n=(1, 7, 300), reduction=("mean", "sum", "none"), ignored=("none", "some", "all"),
    ignore_index=(-100, 3), smoothing=(0.0, 0.1), z=(0.0, 1e-4), dtype=("fp32", "fp16"), bias=(False, True),
    chunked=(False, True),
)
# Pairwise covering design over FACTORS, as in test_cross_entropy.py.
CASES = [
    (50257, 300, "none", "some", 3, 0.1, 1e-4, "fp16", True, True),
    (8, 1, "mean", "none", -100, 0.0, 0.0, "fp32", False, False),
    (41, 7, "sum", "all", -100, 0.0, 1e-4, "fp32", True, True),
    (41, 1, "sum", "all", 3, 0.1, 0.0, "fp16", False, False),
    (8, 7, "mean", "none", 3, 0.1, 0.0, "fp16", True, True),
    (50257, 7, "none", "some", -100, 0.0, 0.0, "fp32", False, False),
    (8, 300, "mean", "all", -100, 0.1, 1e-4, "fp32", False, False),
    (41, 1, "none", "none", 3, 0.0, 1e-4, "fp32", False, True),
    (8, 300, "sum", "none", -100, 0.0, 0.0, "fp16", True, False),
    (50257, 1, "mean", "none", -100, 0.0, 0.0, "fp32", True, False),
    (41, 300, "mean", "some", -100, 0.0, 0.0, "fp32", False, False),
    (8, 1, "none", "all", -100, 0.0, 0.0, "fp32", False, False),
    (8, 7, "sum", "some", -100, 0.0, 0.0, "fp32", False, False),
    (50257, 1, "sum", "all", -100, 0.0, 0.0, "fp32", False, False),
]


def make_inputs(v, n, ignored, ignore_index, dtype, bias, device) -> dict:
    generator = torch.Generator().manual_seed(n * v)
    shape = ROW_SHAPES[n]
    inputs = dict(
        hidden=torch.randn(*shape, HIDDEN, generator=generator).to(device, dtype),
        weight=(torch.randn(v, HIDDEN, generator=generator) * (3 / HIDDEN**0.5)).to(device, dtype),
        target=make_target(shape, v, ignored, ignore_index, generator, device),
    )
    if bias:
        inputs["bias"] = torch.randn(v, generator=generator).to(device, dtype)
    return inputs


def test_cases_cover_every_pair():
    assert_covers_every_pair(CASES, FACTORS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity(case, backend, device):
    v, n, reduction, ignored, ignore_index, smoothing, z, dtype, bias, chunked = case
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing, z_loss=z)
    chunk_size = CHUNK[n] if chunked else None
    # Gradients of hidden, weight and bias; for "none" with a random (non-uniform) grad_output.
    assert_parity(
        lambda **kw: linear_cross_entropy(**kw, **options, chunk_size=chunk_size, backend=backend),
        lambda **kw: reference.linear_cross_entropy(**kw, **options),
        make_inputs(v, n, ignored, ignore_index, DTYPES[dtype], bias, device),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_with_uneven_grad_output(backend, device):
    """Per-token weights, zero on some tokens: a forward that folded one scale into the
    gradients would get these wrong."""
    inputs = make_inputs(41, 7, "none", -100, torch.float32, True, device)
    weights = torch.tensor([0.0, 1.0, -2.0, 0.0, 5.0, 0.5, 3.0], device=device)
    assert_parity(
        lambda **kw: linear_cross_entropy(**kw, reduction="none", chunk_size=2, backend=backend) * weights,
        lambda **kw: reference.linear_cross_entropy(**kw, reduction="none") * weights,
        inputs,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_mean_gradients_keep_their_digits_under_loss_scaling(backend, device):
    """fp16 "mean" over N = 1024 tokens, backward with GradScaler's 2**16. The gradient of a
    class no token targets is a sum of small probabilities (here ~e**-8 / N per token): the
    incoming 2**16 / N must reach them before they are rounded to fp16, as in eager
    PyTorch, not after (1 / N folded into fp16 gradients in the forward left them at one
    or two subnormal ulps: 60 to 120 times eager's error)."""
    n, v, targeted = 1024, 64, 4
    generator = torch.Generator().manual_seed(3)
    inputs = dict(hidden=torch.randn(n, HIDDEN, generator=generator),
                  weight=torch.randn(v, HIDDEN, generator=generator) * 0.1,
                  bias=torch.where(torch.arange(v) < targeted, 0.0, -8.0))
    inputs = {name: t.to(device, torch.float16) for name, t in inputs.items()}
    target = torch.randint(0, targeted, (n,), generator=generator).to(device)
    def grads(fn, dtype):
        leaves = {name: t.to(dtype).clone().requires_grad_() for name, t in inputs.items()}
        loss = fn(**leaves, target=target)  # fp32 for fp16 inputs: 2**16 overflows fp16
        loss.backward(torch.full_like(loss, 2.0**16))
        return {name: t.grad for name, t in leaves.items()}

    oracle = grads(reference.linear_cross_entropy, torch.float64)
    eager = grads(reference.linear_cross_entropy, torch.float16)
    fused = grads(lambda **kw: linear_cross_entropy(**kw, chunk_size=300, backend=backend), torch.float16)
    untargeted = slice(targeted, None)
    for name, part in [("hidden", slice(None)), ("weight", slice(None)), ("bias", slice(None)),
                       ("weight", untargeted), ("bias", untargeted)]:
        want = oracle[name][part]
        error = (fused[name][part].double() - want).abs().max().item()
        eager_error = (eager[name][part].double() - want).abs().max().item()
        assert fused[name].dtype == torch.float16
        assert error <= 2 * eager_error, f"grad of {name}[{part}]: error {error:.3g}, eager fp16 {eager_error:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradients_add(backend, device):
    """GPT-2's head is the token embedding: its gradient is the embedding's plus the head's."""
    v, batch, steps = 41, 3, 5
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, v, (batch, steps), generator=generator).to(device)
    target = torch.roll(tokens, -1, dims=1)

    def model(loss_fn):
        def run(embedding, scale):
            hidden = F.embedding(tokens, embedding) * scale
            return loss_fn(hidden, embedding, target)
        return run

    inputs = dict(embedding=torch.randn(v, HIDDEN, generator=generator).to(device),
                  scale=torch.tensor(2.0).to(device))
    assert_parity(model(lambda *a: linear_cross_entropy(*a, chunk_size=4, backend=backend)),
                  model(reference.linear_cross_entropy), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    """hidden: a (T, B, H) view of (B, T, H); weight: 24 of 30 columns. Read through their
    strides; the gradients come back in the inputs' shapes."""
    generator = torch.Generator().manual_seed(2)
    inputs = dict(hidden=torch.randn(3, 5, HIDDEN, generator=generator).to(device),
                  weight=torch.randn(41, 30, generator=generator).to(device))
    target = torch.randint(0, 41, (5, 3), generator=generator).to(device)

    def strided(fn):
        return lambda hidden, weight: fn(hidden.transpose(0, 1), weight[:, :HIDDEN], target)

    assert_parity(strided(lambda *a: linear_cross_entropy(*a, chunk_size=4, backend=backend)),
                  strided(reference.linear_cross_entropy), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend, device):
    inputs = make_inputs(41, 7, "some", -100, torch.float32, True, device)
    hidden = inputs["hidden"].requires_grad_()
    loss = linear_cross_entropy(hidden, inputs["weight"], inputs["target"], inputs["bias"], backend=backend)
    loss.backward()
    oracle_hidden = inputs["hidden"].detach().double().requires_grad_()
    expected = reference.linear_cross_entropy(oracle_hidden, inputs["weight"].double(), inputs["target"],
                                              inputs["bias"].double())
    expected.backward()
    torch.testing.assert_close(hidden.grad, oracle_hidden.grad.float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        no_grad_loss = linear_cross_entropy(hidden, inputs["weight"], inputs["target"], inputs["bias"],
                                            backend=backend)
    assert not no_grad_loss.requires_grad
    torch.testing.assert_close(no_grad_loss, loss.detach())


def test_float64_runs_the_chunked_torch_path_exactly(device):
    inputs = {k: v.double() if v.is_floating_point() else v
              for k, v in make_inputs(41, 7, "some", -100, torch.float32, True, device).items()}
    leaves = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    loss = linear_cross_entropy(**leaves, reduction="none", label_smoothing=0.1, z_loss=1e-4, chunk_size=3)
    assert loss.dtype == torch.float64
    grad_output = torch.arange(7.0, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"], leaves["bias"]], grad_output)
    expected = reference.linear_cross_entropy(**leaves, reduction="none", label_smoothing=0.1, z_loss=1e-4)
    expected_grads = torch.autograd.grad(expected, [leaves["hidden"], leaves["weight"], leaves["bias"]], grad_output)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_default_chunk_size_fits_budget_in_whole_waves():
    budget = lce_module.CHUNK_BYTES
    width = lce_module.logits_row_stride(50257)
    assert width == 50304  # rows 16-byte aligned (and 64-element, as the model pads its head)
    for dtype, use_triton, per_logit in [(torch.float32, True, 4), (torch.float32, False, 4),
                                         (torch.float16, True, 2), (torch.bfloat16, False, 6)]:
        rows = lce_module.default_chunk_size(10**6, 50257, dtype, use_triton)
        assert rows * width * per_logit <= budget < (rows + 1) * width * per_logit
        # Whole waves of rows: the nearest number of them, where that is not none.
        for wave in (264, 324, 396):
            waves = lce_module.default_chunk_size(10**6, 50257, dtype, use_triton, wave=wave)
            if rows >= wave / 2:
                assert waves % wave == 0 and abs(waves - rows) <= wave / 2
            else:
                assert waves == rows
    # GPT-2, fp16: 333 rows fit. A100 (108 SMs x 3 rows): 324; H100 (132 x 3): 396, 19% over.
    assert lce_module.default_chunk_size(10**6, 50257, torch.float16, True, wave=324) == 324
    assert lce_module.default_chunk_size(10**6, 50257, torch.float16, True, wave=396) == 396
    assert lce_module.default_chunk_size(10**6, 50257, torch.float32, True, wave=396) == 166
    assert lce_module.default_chunk_size(7, 50257, torch.float16, True, wave=264) == 7
    assert lce_module.default_chunk_size(5, 10**9, torch.float32, True) == 1
    assert lce_module.default_chunk_size(0, 8, torch.float32, True) == 1
    assert ce_module.rows_per_wave(torch.device("cpu"), 50257, torch.bfloat16, 0.0) == 1


def test_rows_per_wave_from_the_register_budget(monkeypatch):
    """An H100's 132 SMs: three 16-warp rows each for the bf16 training build (40
    registers), two for fp32 or with label smoothing; ten 4-warp rows for a small vocabulary."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    cuda = torch.device("cuda")
    assert ce_module.rows_per_wave(cuda, 50257, torch.bfloat16, 0.0) == 396
    assert ce_module.rows_per_wave(cuda, 50257, torch.float32, 0.0) == 264
    assert ce_module.rows_per_wave(cuda, 50257, torch.float16, 0.1) == 264
    assert ce_module.rows_per_wave(cuda, 1000, torch.bfloat16, 0.0) == 1320


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_non_finite_logits_behave_as_cross_entropy(reduction, backend, device):
    """A bias with +inf, -inf at the target, or NaN makes every token's logits non-finite:
    losses and every gradient as the reference's (F.cross_entropy's for the tokens kept;
    the ignored token adds nothing), through the gradients computed in the forward ("sum")
    and those recomputed from the saved logsumexp ("none")."""
    from tests.kernels.test_cross_entropy import NON_FINITE_ROWS, assert_same_values

    generator = torch.Generator().manual_seed(4)
    inputs = dict(hidden=torch.randn(3, HIDDEN, generator=generator), weight=torch.randn(37, HIDDEN, generator=generator))
    target = torch.tensor([1, 1, -100], device=device)
    for case in ("+inf other", "-inf target", "nan other"):
        inputs["bias"] = torch.zeros(37)
        for column, value in NON_FINITE_ROWS[case].items():
            inputs["bias"][column] = value
        ours = {k: t.to(device).clone().requires_grad_() for k, t in inputs.items()}
        oracle = {k: t.to(device, torch.float64).clone().requires_grad_() for k, t in inputs.items()}
        loss = linear_cross_entropy(**ours, target=target, reduction=reduction, chunk_size=2, backend=backend)
        expected = reference.linear_cross_entropy(**oracle, target=target, reduction=reduction)
        loss.backward(torch.ones_like(loss))
        expected.backward(torch.ones_like(expected))
        assert_same_values(loss.detach(), expected.detach(), f"{case}: loss")
        for name in inputs:
            assert_same_values(ours[name].grad, oracle[name].grad, f"{case}: grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_logits_rows_are_aligned(backend, device, monkeypatch):
    """Every chunk's logits reach the per-chunk loss with rows a multiple of 64 elements apart."""
    strides = []
    chunk_loss = "_triton_chunk_loss" if backend == "triton" else "_torch_chunk_loss"
    original = getattr(lce_module, chunk_loss)
    monkeypatch.setattr(lce_module, chunk_loss, lambda logits, *args: strides.append(logits.stride()) or
                        original(logits, *args))
    inputs = make_inputs(41, 7, "some", -100, torch.float32, True, device)
    loss = linear_cross_entropy(**inputs, chunk_size=3, backend=backend)
    assert strides == [(64, 1)] * 3 and torch.isfinite(loss)


def test_torch_compile_fullgraph_matches_eager(device):
    inputs = make_inputs(41, 7, "some", -100, torch.float32, True, device)

    def loss_fn(hidden, weight, target, bias, backend="triton"):
        mean = linear_cross_entropy(hidden.tanh(), weight, target, bias, chunk_size=3, backend=backend)
        per_token = linear_cross_entropy(hidden, weight, target, reduction="none", chunk_size=3, backend=backend)
        return mean * 2 + per_token

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # see test_cross_entropy
    assert_parity(compiled, lambda **kw: reference_loss_fn(**kw), inputs)


def reference_loss_fn(hidden, weight, target, bias):
    mean = reference.linear_cross_entropy(hidden.tanh(), weight, target, bias)
    return mean * 2 + reference.linear_cross_entropy(hidden, weight, target, reduction="none")


class _KernelLaunchesNothing:
    """Stands in for the Triton kernel under the interpreter, which would need minutes for
    4096 x 50257 logits. Memory is all the chunk loop's and the launcher's (the kernel only
    writes into tensors they allocate), and that is what is measured; the parity tests
    check the kernel's numbers."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_is_a_small_fraction_of_the_logits(backend, device, monkeypatch):
    """N = 4096, V = 50257, fp32: what linear_cross_entropy holds at its peak beyond its
    inputs (saved tensors + the largest temporary) against the full logits."""
    n, v, hidden_size = 4096, 50257, 32
    if backend == "triton" and device.type == "cpu":
        monkeypatch.setattr(ce_module, "_cross_entropy_kernel", _KernelLaunchesNothing())
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=generator).to(device).requires_grad_()
    weight = torch.randn(v, hidden_size, generator=generator).div(hidden_size**0.5).to(device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=generator).to(device)
    inputs = {t.untyped_storage().data_ptr() for t in (hidden, weight, target)}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = linear_cross_entropy(hidden, weight, target, backend=backend)
        loss.backward()
    largest = max(max(e.self_cpu_memory_usage, getattr(e, "self_device_memory_usage", 0)) for e in profile.events())
    logits_bytes = n * v * 4
    ratio = (sum(saved.values()) + largest) / logits_bytes
    print(f"\nlinear_cross_entropy[{backend}] N={n} V={v} H={hidden_size} fp32: saved {sum(saved.values())} B "
          f"+ largest temporary {largest} B = {ratio:.2%} of the full logits ({logits_bytes} B)")
    assert 0 < largest and ratio <= 0.10
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - baseline) / logits_bytes
        print(f"CUDA peak beyond the inputs: {peak:.2%} of the full logits")
        assert peak <= 0.10


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == 50257], ids=case_id)
def test_bf16_parity_gpu(case):
    v, n, reduction, ignored, ignore_index, smoothing, z, _, bias, chunked = case
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing, z_loss=z)
    assert_parity(
        lambda **kw: linear_cross_entropy(**kw, **options, chunk_size=CHUNK[n] if chunked else None,
                                          backend="triton"),
        lambda **kw: reference.linear_cross_entropy(**kw, **options),
        make_inputs(v, n, ignored, ignore_index, torch.bfloat16, bias, "cuda"),
    )


# ------------------------------------------------- fp32 (master) weight, half hidden

# Mixed-precision cases: v, n, reduction, chunk size (None: the default), bias. 50257
# classes over 7 tokens in chunks of 3; 300 tokens in chunks of 64 (the last one short).
MIXED_CASES = [(50257, 7, "mean", 3, True), (50257, 7, "none", 3, False), (41, 300, "sum", 64, True),
               (41, 300, "none", None, True)]


def make_mixed_inputs(v, n, bias, hidden_dtype, device) -> dict:
    """hidden in ``hidden_dtype``, weight and bias fp32: an autocast step's head."""
    inputs = make_inputs(v, n, "some", -100, torch.float32, bias, device)
    inputs["hidden"] = inputs["hidden"].to(hidden_dtype)
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MIXED_CASES, ids=str)
def test_fp32_weight_with_half_hidden_parity(case, backend, device):
    """fp16 hidden, fp32 weight and bias: the loss and every gradient against float64
    (the oracle casts the weight to hidden's dtype as the op does); the weight's and
    bias's gradients come back fp32, straight from the accumulator. Over several chunks
    that is a sum of fp16 chunk products, no longer fp16 itself, as it would be after a
    round trip through fp16 (in one chunk the accumulator holds one fp16 product)."""
    v, n, reduction, chunk_size, bias = case
    inputs = make_mixed_inputs(v, n, bias, torch.float16, device)
    assert_parity(lambda **kw: linear_cross_entropy(**kw, reduction=reduction, chunk_size=chunk_size, backend=backend),
                  lambda **kw: reference.linear_cross_entropy(**kw, reduction=reduction), inputs)
    leaves = {k: t.clone().requires_grad_() if t.is_floating_point() else t for k, t in inputs.items()}
    loss = linear_cross_entropy(**leaves, reduction=reduction, chunk_size=chunk_size, backend=backend)
    loss.backward(torch.ones_like(loss))
    assert leaves["hidden"].grad.dtype == torch.float16
    for name in ("weight", "bias") if bias else ("weight",):
        grad = leaves[name].grad
        assert grad.dtype == torch.float32
        if chunk_size is not None:
            assert (grad.half().float() != grad).any(), f"grad of {name} went through fp16"


class _Casts(TorchDispatchMode):
    """Records the (input, output) dtypes of every cast of a tensor of ``shape`` that reaches
    the dispatcher (the fused ops' insides do not: they run below the op)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.casts = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.casts.append((args[0].dtype, out.dtype))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_is_cast_once_per_call(backend, device, monkeypatch):
    """The master weight is cast to hidden's dtype once, before the chunk loop, which sees
    only hidden's dtype; its gradient is never cast on the way back."""
    chunk_dtypes = []
    chunked = lce_module._chunked
    monkeypatch.setattr(lce_module, "_chunked", lambda hidden, weight, *a: chunk_dtypes.append(weight.dtype) or
                        chunked(hidden, weight, *a))
    inputs = make_mixed_inputs(41, 7, False, torch.float16, device)
    weight = inputs["weight"].requires_grad_()
    with _Casts(weight.shape) as recorder:
        loss = linear_cross_entropy(inputs["hidden"], weight, inputs["target"], chunk_size=2, backend=backend)
        loss.backward()
    assert recorder.casts == [(torch.float32, torch.float16)] and chunk_dtypes == [torch.float16]
    assert weight.grad.dtype == torch.float32


def test_fp32_weight_with_half_hidden_compiles(device):
    inputs = make_mixed_inputs(41, 7, True, torch.float16, device)

    def loss_fn(hidden, weight, target, bias):
        mean = linear_cross_entropy(hidden, weight, target, bias, chunk_size=3, backend="triton")
        return mean * 2 + linear_cross_entropy(hidden, weight, target, reduction="none", chunk_size=3,
                                               backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert_parity(compiled, mixed_reference_loss_fn, inputs)


def mixed_reference_loss_fn(hidden, weight, target, bias):
    mean = reference.linear_cross_entropy(hidden, weight, target, bias)
    return mean * 2 + reference.linear_cross_entropy(hidden, weight, target, reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("case", MIXED_CASES, ids=str)
def test_fp32_weight_with_bf16_hidden_parity_gpu(case):
    v, n, reduction, chunk_size, bias = case
    leaves = make_mixed_inputs(v, n, bias, torch.bfloat16, "cuda")
    assert_parity(lambda **kw: linear_cross_entropy(**kw, reduction=reduction, chunk_size=chunk_size,
                                                    backend="triton"),
                  lambda **kw: reference.linear_cross_entropy(**kw, reduction=reduction), leaves)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda h, w, t: linear_cross_entropy(h, w, t.float()), TypeError, "target must be int64"),
        (lambda h, w, t: linear_cross_entropy(h, w, t[:3]), ValueError, r"target must have shape \(5,\)"),
        (lambda h, w, t: linear_cross_entropy(h, w[:, :7], t), ValueError, r"weight must have shape \(V, 8\)"),
        (lambda h, w, t: linear_cross_entropy(h, w[0], t), ValueError, r"weight must have shape \(V, 8\)"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, torch.zeros(10)), ValueError, r"bias must have shape \(11,\)"),
        (lambda h, w, t: linear_cross_entropy(h, w.half(), t), TypeError, "weight must have hidden's dtype"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, torch.zeros(11).half()), TypeError, "bias must have weight's"),
        (lambda h, w, t: linear_cross_entropy(h.half(), w.bfloat16(), t), TypeError,
         r"weight must have hidden's dtype torch.float16 or torch.float32, got torch.bfloat16"),
        (lambda h, w, t: linear_cross_entropy(h.bfloat16(), w.double(), t), TypeError,
         "weight must have hidden's dtype torch.bfloat16 or torch.float32"),
        (lambda h, w, t: linear_cross_entropy(h.double(), w, t), TypeError, "weight must have hidden's dtype"),
        (lambda h, w, t: linear_cross_entropy(h.half(), w, t, torch.zeros(11).half()), TypeError,
         "bias must have weight's dtype torch.float32, got torch.float16"),
        (lambda h, w, t: linear_cross_entropy(h.long(), w, t), TypeError, "hidden must be float32"),
        (lambda h, w, t: linear_cross_entropy(h[:, :0], w[:, :0], t), ValueError, "H >= 1"),
        (lambda h, w, t: linear_cross_entropy(h, w.to("meta"), t), ValueError, "one device.*weight on meta"),
        (lambda h, w, t: linear_cross_entropy(h, w, t.clamp(max=10) + 1), ValueError, "target holds 11, which"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, [0.0] * 11), TypeError, "bias must be a torch.Tensor"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, torch.zeros(11, dtype=torch.long)), TypeError,
         "bias must be float32"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, torch.zeros(11, device="meta")), ValueError,
         "one device.*bias on meta"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=2**70), ValueError, "ignore_index must be an int"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, z_loss=math.nan), ValueError, "z_loss must be a finite"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, validate=1), TypeError, "validate must be a bool"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="batchmean"), ValueError, "reduction must be"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda h, w, t: linear_cross_entropy(h, w, t, backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(call, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("work started before the input was rejected")

    monkeypatch.setattr(lce_module, "_chunked", no_kernel)
    with pytest.raises(error, match=words):
        call(torch.randn(5, 8), torch.randn(11, 8), torch.tensor([0, 3, 10, 4, 7]))


def test_bf16_on_cpu_never_reads_the_padding():
    # Row-padded chunk logits (V = 100 -> rows 128 apart): with uninitialised padding the
    # CPU bf16 matmul gave non-finite hidden gradients in about a quarter of calls.
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        hidden = torch.randn(18, 64, generator=generator).to(torch.bfloat16).requires_grad_()
        weight = torch.randn(100, 64, generator=generator).requires_grad_()
        target = torch.randint(0, 100, (18,), generator=generator)
        linear_cross_entropy(hidden, weight, target, backend="torch").backward()
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
