import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fusedgpt.kernels import cross_entropy, reference
from fusedgpt.kernels.backend import BackendUnavailableError
from tests.kernels.parity import assert_parity

# The package exports the function under the module's name; the module itself is needed
# for its launchers and compile-report configs.
ce_module = importlib.import_module("fusedgpt.kernels.cross_entropy")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
POSITIVE_IGNORE = 3  # a real class id used as ignore_index
ROW_SHAPES = {1: (1,), 7: (7,), 300: (3, 100)}  # 300 rows as (3, 100): a leading batch dim

FACTORS = dict(
    v=(8, 41, 50257), n=(1, 7, 300), reduction=("mean", "sum", "none"), ignored=("none", "some", "all"),
    ignore_index=(-100, POSITIVE_IGNORE), smoothing=(0.0, 0.1), z=(0.0, 1e-4), dtype=("fp32", "fp16"),
)
# A pairwise covering design over FACTORS (every value of every factor meets every value of
# every other factor in some case; the full product would be 1296 cases), except one row
# with "some" rows ignored, which cannot be. V = 50257 with N = 300 is the one expensive
# pair under the interpreter, so it appears once.
CASES = [
    (50257, 300, "mean", "some", 3, 0.1, 1e-4, "fp16"),
    (8, 1, "mean", "none", -100, 0.0, 0.0, "fp32"),
    (41, 7, "sum", "all", -100, 0.1, 1e-4, "fp32"),
    (41, 1, "none", "all", 3, 0.0, 0.0, "fp16"),
    (8, 7, "sum", "none", 3, 0.0, 1e-4, "fp16"),
    (50257, 7, "none", "some", -100, 0.0, 0.0, "fp32"),
    (8, 300, "none", "none", -100, 0.1, 0.0, "fp32"),
    (50257, 1, "sum", "none", 3, 0.1, 0.0, "fp32"),
    (41, 300, "mean", "all", -100, 0.0, 0.0, "fp16"),
    (8, 1, "none", "all", -100, 0.0, 1e-4, "fp32"),
    (8, 300, "sum", "some", -100, 0.0, 0.0, "fp32"),
    (41, 7, "mean", "none", -100, 0.0, 0.0, "fp32"),
    (41, 7, "mean", "some", -100, 0.0, 0.0, "fp32"),
    (50257, 1, "mean", "all", -100, 0.0, 0.0, "fp32"),
]
IMPOSSIBLE = {(("n", 1), ("ignored", "some"))}  # one row: none ignored, or all


def assert_covers_every_pair(cases, factors) -> None:
    names = list(factors)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        seen = {(case[i], case[j]) for case in cases}
        needed = {(x, y) for x, y in itertools.product(factors[a], factors[b]) if ((a, x), (b, y)) not in IMPOSSIBLE}
        assert needed <= seen, f"no case has ({a}, {b}) in {sorted(needed - seen)}"


def case_id(case) -> str:
    return "-".join(str(value) for value in case)


def make_target(shape, v, ignored, ignore_index, generator, device) -> torch.Tensor:
    """Random classes (never ``ignore_index`` by chance), then the ``ignored`` pattern:
    "some" ignores every other row, starting with the second."""
    if ignore_index >= 0:  # draw from the other v - 1 classes
        target = torch.randint(0, v - 1, shape, generator=generator)
        target = torch.where(target >= ignore_index, target + 1, target)
    else:
        target = torch.randint(0, v, shape, generator=generator)
    flat = target.view(-1)
    if ignored == "some":
        flat[1::2] = ignore_index
    elif ignored == "all":
        flat[:] = ignore_index
    return target.to(device)


def test_cases_cover_every_pair():
    assert_covers_every_pair(CASES, FACTORS)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity(case, device):
    v, n, reduction, ignored, ignore_index, smoothing, z, dtype = case
    generator = torch.Generator().manual_seed(n * v)
    shape = ROW_SHAPES[n]
    inputs = dict(
        logits=torch.randn(*shape, v, generator=generator).mul(3).to(device, DTYPES[dtype]),
        target=make_target(shape, v, ignored, ignore_index, generator, device),
    )
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing, z_loss=z)
    # For "none", assert_parity's output gradient is random per row: a non-uniform grad_output.
    assert_parity(lambda **kw: cross_entropy(**kw, **options, backend="triton"),
                  lambda **kw: reference.cross_entropy(**kw, **options), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("v", [41, 50257])
def test_confident_logits(v, dtype, device):
    """Target probability > 0.999: the loss is ~2e-4 and the true class's gradient p_t - 1
    is tiny; both must be at least as accurate as torch's own cross-entropy in the same
    dtype, and the gradient as accurate as the dtype allows."""
    n = 7
    generator = torch.Generator().manual_seed(v)
    logits = torch.randn(n, v, generator=generator, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=generator)
    rows = torch.arange(n)
    # p_t - 1 is about -2e-4: confident, and the gradient (p_t - 1) / n still an fp16 number.
    logits[rows, target] = math.log(v) + 9
    logits = logits.to(dtype).to(device)
    target = target.to(device)
    oracle_logits = logits.double()
    assert torch.softmax(oracle_logits, -1)[rows, target].min() > 0.999
    assert_parity(lambda logits: cross_entropy(logits, target, backend="triton"),
                  lambda logits: reference.cross_entropy(logits, target), dict(logits=logits))

    def true_class_error(fn, x):
        x = x.detach().clone().requires_grad_()
        fn(x, target).backward()
        return x.grad[rows, target].double()

    oracle = true_class_error(reference.cross_entropy, oracle_logits)
    ours = (true_class_error(lambda x, t: cross_entropy(x, t, backend="triton"), logits) - oracle).abs() / oracle.abs()
    theirs = (true_class_error(F.cross_entropy, logits) - oracle).abs() / oracle.abs()
    # fp32 keeps this small gradient to fp32 precision; fp16 stores it as a subnormal
    # (torch's fp16 cross-entropy rounds p_t to 1 and returns 0: 100% error).
    limit = {torch.float32: 1e-5, torch.float16: 1e-2}[dtype]
    assert ours.max() <= min(limit, theirs.max()), (ours.max().item(), theirs.max().item())


def test_non_contiguous_logits(device):
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 4, 60, generator=generator).to(device)
    target = torch.randint(0, 41, (4, 5), generator=generator).to(device)

    def sliced(fn):
        # A (T, B, V) view of a (B, T, V) tensor, narrowed to V = 41 of 60 columns: the row
        # stride is not V and the rows are not in memory order (flattening them copies).
        return lambda wide: fn(wide.transpose(0, 1)[..., :41], target, reduction="none")

    assert_parity(sliced(lambda *a, **kw: cross_entropy(*a, **kw, backend="triton")),
                  sliced(reference.cross_entropy), dict(wide=wide))
    # Row-strided but unit column stride: read in place through the row stride.
    assert_parity(lambda wide: cross_entropy(wide[1, :, :41], target[:, 1], backend="triton"),
                  lambda wide: reference.cross_entropy(wide[1, :, :41], target[:, 1]), dict(wide=wide))


def test_all_ignored_mean_is_zero_not_nan(device):
    # Logits whose exponentials overflow fp32: ignored rows must not be computed with them.
    logits = (torch.randn(4, 9, device=device) * 200).requires_grad_()
    target = torch.full((4,), -100, device=device)
    loss = cross_entropy(logits, target, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.isnan(F.cross_entropy(logits.detach(), target))  # the convention differs from torch's


def test_saves_only_logits_and_per_row_floats(device):
    """Accounting of what autograd keeps: the caller's logits (no copy), the target, and one
    fp32 per row; no probabilities."""
    logits = torch.randn(6, 50, 1000, device=device, requires_grad=True)
    target = torch.randint(0, 1000, (6, 50), device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, target, backend="triton")
    new = [t for t in saved if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()]
    assert len(new) == len(saved) - 1
    assert sum(t.numel() * t.element_size() for t in new if t.is_floating_point()) == 300 * 4


def test_bad_target_without_validation_stays_in_bounds(device):
    """With validate=False a bad target is never an address. The in-place mode reads and
    writes the same rows: guard rows around them stay untouched, a bad row gets a NaN loss
    and gradient, and the other rows are exact."""
    logits, target = _rows_with_bad_targets(device)
    buffer = torch.full((6, logits.shape[1]), 123.0, device=device)
    buffer[1:5] = logits
    loss, _ = ce_module.cross_entropy_forward_backward_(buffer[1:5], target, torch.ones((), device=device),
                                                        -100, 0.0, 0.0)
    good = [0, 3]
    reference_logits = logits[good].clone().requires_grad_()
    expected = reference.cross_entropy(reference_logits, target[good], reduction="none")
    expected.sum().backward()
    assert torch.isnan(loss[1:3]).all() and torch.isnan(buffer[2:4]).all()
    torch.testing.assert_close(loss[good], expected.detach())
    torch.testing.assert_close(buffer[1:5][good], reference_logits.grad)
    assert (buffer[[0, 5]] == 123.0).all()


def _rows_with_bad_targets(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 37 logits; the targets of rows 1 and 2 are past either end of [0, 37)."""
    v = 37
    logits = torch.randn(4, v, generator=torch.Generator().manual_seed(0)).to(device)
    return logits, torch.tensor([2, v, -(2**40), 5], device=device)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_target_without_validation_is_nan(backend, device):
    """The public function on either backend: without validation a bad row's loss and
    gradient are NaN (never an indexing error) and the other rows are untouched by it; with
    validation, a ValueError."""
    logits, target = _rows_with_bad_targets(device)
    good = [0, 3]
    for reduction in ("none", "sum"):
        leaf = logits.clone().requires_grad_()
        loss = cross_entropy(leaf, target, reduction=reduction, validate=False, backend=backend)
        loss.backward(torch.ones_like(loss))
        expected_leaf = logits[good].clone().requires_grad_()
        expected = reference.cross_entropy(expected_leaf, target[good], reduction="none")
        expected.sum().backward()
        assert torch.isnan(leaf.grad[1:3]).all()
        torch.testing.assert_close(leaf.grad[good], expected_leaf.grad)
        if reduction == "none":
            assert torch.isnan(loss[1:3]).all()
            torch.testing.assert_close(loss[good], expected.detach())
        else:
            assert torch.isnan(loss)
    with pytest.raises(ValueError, match="target holds 37, which is neither ignore_index"):
        cross_entropy(logits, target, backend=backend)


@pytest.mark.parametrize("v, row_stride", [(8198, 8199), (4102, 4103), (5, 7), (1030, 1030)])
def test_row_split_at_every_alignment(v, row_stride, device):
    """Rows whose starts fall at every offset from a 16-byte boundary (an odd row stride,
    fp16: head 0..7 columns before the aligned body), with a head and tail that together
    pass one 4096-wide block (v = 8198 and 4102 with a 7-column head), a row shorter than
    the head (v = 5) and no whole block at all (v = 1030)."""
    generator = torch.Generator().manual_seed(v)
    wide = torch.randn(8, row_stride, generator=generator).mul(3).to(device, torch.float16)
    target = torch.randint(0, v, (8,), generator=generator).to(device)
    target[0], target[1] = 0, v - 1  # the first and last columns: in the head or the tail
    assert_parity(lambda wide: cross_entropy(wide[:, :v], target, reduction="none", label_smoothing=0.1,
                                             backend="triton"),
                  lambda wide: reference.cross_entropy(wide[:, :v], target, reduction="none", label_smoothing=0.1),
                  dict(wide=wide))


def test_padded_rows_read_and_write_only_valid_columns(device):
    """Logits in rows padded to 64 (GPT-2's 50304 for 50257; here 64 for 41) with NaN in the
    padding: the loss and gradient are those of the valid columns, and the in-place mode
    leaves the padding as it was."""
    v, n = 41, 6
    generator = torch.Generator().manual_seed(2)
    buffer = torch.full((n, 64), NAN, device=device)
    buffer[:, :v] = torch.randn(n, v, generator=generator).to(device)
    target = torch.randint(0, v, (n,), generator=generator).to(device)
    logits = buffer[:, :v]
    assert_parity(lambda logits: cross_entropy(logits, target, backend="triton"),
                  lambda logits: reference.cross_entropy(logits, target), dict(logits=logits))
    expected = reference.cross_entropy(logits.clone().requires_grad_(), target, reduction="none")
    loss, _ = ce_module.cross_entropy_forward_backward_(logits, target, torch.ones((), device=device), -100, 0.0, 0.0)
    torch.testing.assert_close(loss, expected.detach())
    assert torch.isfinite(buffer[:, :v]).all() and torch.isnan(buffer[:, v:]).all()


INF, NAN = math.inf, math.nan
# Special values written over finite logits of one row each (the target is class 1).
NON_FINITE_ROWS = {
    "+inf other": {5: INF}, "+inf target": {1: INF}, "two +inf": {0: INF, 5: INF}, "-inf other": {5: -INF},
    "-inf target": {1: -INF}, "all -inf": {j: -INF for j in range(37)}, "nan other": {5: NAN},
    "nan target": {1: NAN}, "+inf and -inf": {0: -INF, 5: INF},
}


def non_finite_logits(v=37) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per NON_FINITE_ROWS case, then a finite row, then an ignored row holding NaN."""
    logits = torch.randn(len(NON_FINITE_ROWS) + 2, v, generator=torch.Generator().manual_seed(5))
    for row, values in enumerate(NON_FINITE_ROWS.values()):
        for column, value in values.items():
            logits[row, column] = value
    logits[-1, 3] = NAN
    target = torch.ones(len(logits), dtype=torch.int64)
    target[-1] = -100
    return logits, target


def assert_same_values(actual, expected, what):
    """NaN where expected is NaN, the same infinities, and close finite values."""
    expected = expected.to(actual.dtype)
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN at {actual.isnan()} != {expected.isnan()}"
    assert torch.equal(actual.isposinf(), expected.isposinf()) and torch.equal(actual.isneginf(), expected.isneginf())
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on inf - inf
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("smoothing, z", [(0.0, 0.0), (0.1, 0.0), (0.1, 1e-4)])
def test_non_finite_logits_behave_as_torch(backend, smoothing, z, device):
    """NaN propagates as in F.cross_entropy: no finite logsumexp (a NaN or +inf logit, or
    only -inf) gives a NaN loss and an all-NaN gradient row; a -inf target logit gives an
    infinite loss with a finite gradient. An ignored row is never read: 0 and 0 (torch's
    0 * NaN gives its gradient NaN there)."""
    logits, target = non_finite_logits()
    logits, target = logits.to(device), target.to(device)
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, target, reduction="none", label_smoothing=smoothing, z_loss=z, backend=backend)
    loss.backward(torch.ones_like(loss))
    oracle_leaf = logits[:-1].double().requires_grad_()
    if z == 0:
        expected = F.cross_entropy(oracle_leaf, target[:-1], reduction="none", label_smoothing=smoothing)
    else:  # torch has no z-loss: its terms through autograd, as the reference writes them
        expected = reference.cross_entropy(oracle_leaf, target[:-1], reduction="none", label_smoothing=smoothing,
                                           z_loss=z)
    expected.backward(torch.ones_like(expected))
    assert_same_values(loss[:-1], expected.detach(), "loss")
    assert_same_values(leaf.grad[:-1], oracle_leaf.grad, "gradient")
    assert loss[-1] == 0 and (leaf.grad[-1] == 0).all()
    assert torch.isnan(cross_entropy(logits, target, backend=backend))  # "mean" over NaN rows is NaN


def test_torch_compile_fullgraph_matches_eager(device):
    logits = torch.randn(3, 5, 41, device=device)
    target = torch.randint(0, 41, (3, 5), device=device)
    target[0, 0] = -100

    def loss_fn(logits, target, backend="triton"):
        return cross_entropy(logits * 2, target, label_smoothing=0.1, z_loss=1e-4, backend=backend) * 3

    # aot_eager: dynamo and AOTAutograd trace the custom ops exactly as under inductor,
    # without inductor's C++ build of the few surrounding ops (seconds on this CPU).
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert_parity(lambda logits: compiled(logits, target),
                  lambda logits: loss_fn(logits, target, backend="torch"), dict(logits=logits))
    target[1, 1] = 41  # the validation op runs inside the compiled graph too
    with pytest.raises(ValueError, match="target holds 41"):
        compiled(logits, target)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == 50257], ids=case_id)
def test_bf16_parity_gpu(case):
    v, n, reduction, ignored, ignore_index, smoothing, z, _ = case
    generator = torch.Generator().manual_seed(n)
    shape = ROW_SHAPES[n]
    inputs = dict(logits=torch.randn(*shape, v, generator=generator).mul(3).to("cuda", torch.bfloat16),
                  target=make_target(shape, v, ignored, ignore_index, generator, "cuda"))
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing, z_loss=z)
    assert_parity(lambda **kw: cross_entropy(**kw, **options, backend="triton"),
                  lambda **kw: reference.cross_entropy(**kw, **options), inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_host_synchronisation_gpu(reduction):
    """Without the target check, neither op synchronises with the host, forward or backward."""
    from fusedgpt.kernels import linear_cross_entropy

    hidden = torch.randn(64, 32, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 32, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    options = dict(reduction=reduction, validate=False, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cross_entropy(hidden @ weight.T, target, **options)
        loss = loss + linear_cross_entropy(hidden, weight, target, **options)
        loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ dispatch and bad input


def test_dispatch_bf16_and_float64_go_to_reference():
    if torch.cuda.is_available():
        pytest.skip("on CUDA bf16 runs the kernel")
    target = torch.tensor([1, 2])
    for dtype, reason in ((torch.bfloat16, "bfloat16"), (torch.float64, "float64")):
        logits = torch.randn(2, 5, dtype=dtype)
        torch.testing.assert_close(cross_entropy(logits, target), reference.cross_entropy(logits, target))
        with pytest.raises(BackendUnavailableError, match=reason):
            cross_entropy(logits, target, backend="triton")


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x, t: cross_entropy(x, t.float()), TypeError, "target must be int64"),
        (lambda x, t: cross_entropy(x, t.int()), TypeError, "target must be int64"),
        (lambda x, t: cross_entropy(x, t[:2]), ValueError, r"target must have shape \(3,\)"),
        (lambda x, t: cross_entropy(x, t[:, None]), ValueError, r"target must have shape \(3,\)"),
        (lambda x, t: cross_entropy(x.long(), t), TypeError, "logits must be float32"),
        (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "V >= 1"),
        (lambda x, t: cross_entropy(x[0, 0], t[0]), ValueError, "V >= 1"),
        (lambda x, t: cross_entropy(x, t.to("meta")), ValueError, "one device.*target on meta"),
        (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda x, t: cross_entropy(x, t, label_smoothing=1.5), ValueError,
         "label_smoothing must be a finite real number >= 0 and <= 1, got 1.5"),
        (lambda x, t: cross_entropy(x, t, label_smoothing=math.nan), ValueError, "label_smoothing must be"),
        (lambda x, t: cross_entropy(x, t, z_loss=-1e-4), ValueError, "z_loss must be a finite real number >= 0"),
        (lambda x, t: cross_entropy(x, t, z_loss=math.inf), ValueError, "z_loss must be a finite real number"),
        (lambda x, t: cross_entropy(x, t, ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (lambda x, t: cross_entropy(x, t, ignore_index=2**70), ValueError,
         r"ignore_index must be an int >= -2\*\*63 and < 2\*\*63, got 1180591620717411303424"),
        (lambda x, t: cross_entropy(x, t, ignore_index=-(2**63) - 1), ValueError, "ignore_index must be an int"),
        (lambda x, t: cross_entropy(x, t, validate="no"), TypeError, "validate must be a bool, got 'no'"),
        (lambda x, t: cross_entropy(x, t, backend="cuda"), ValueError, "backend must be one of"),
        (lambda x, t: cross_entropy(x, t.clamp(max=8) + 1), ValueError, "target holds 9, which is neither"),
        (lambda x, t: cross_entropy(x, t - 3), ValueError, "target holds -3, which is neither"),
        (lambda x, t: cross_entropy(x, t.numpy()), TypeError, "target must be a torch.Tensor"),
    ],
)
def test_bad_input(call, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel launched before the input was rejected")

    monkeypatch.setattr(ce_module, "_launch", no_kernel)
    with pytest.raises(error, match=words):
        call(torch.randn(3, 9), torch.tensor([0, 4, 8]))


# ------------------------------------------------------------------ compile report


def test_compile_report_every_mode_healthy_and_vectorised():
    """The training workload's launches (forward, backward, both in place) for every dtype
    and architecture: no spills, within the register budget that rows_per_wave assumes,
    128-bit loads in every main loop and exponentials without a subnormal fix-up."""
    from tests.kernels.test_compile_report import run_report

    rows = run_report("cross_entropy")
    modes = {(True, False), (False, True), (True, True)}
    seen = {(r["dtype"], r["arch"], r["config"]["FORWARD"], r["config"]["BACKWARD"]) for r in rows}
    assert seen == {(dtype, arch, *mode) for dtype in ("float32", "float16", "bfloat16")
                    for arch in ("sm_80", "sm_90") for mode in modes}
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert row["shared_bytes"] <= row["shared_limit"], row
        itemsize = getattr(torch, row["dtype"]).itemsize
        assert 0 < row["registers"] <= ce_module.REGISTER_BUDGET[row["config"]["BLOCK_V"], itemsize, False], row
        assert row["load_widths"].get("LDG.128", 0) > 0, row
        assert row["exp_ftz"] is True, row
