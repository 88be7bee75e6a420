"""Flash attention: parity of the output and of dq, dk, dv against a float64 reference
(plain, grouped-query, windowed, soft-capped, packed variable-length), dropout, non-finite
input, saved-tensor accounting, configs and the compile report, dispatch and bad input."""

import itertools
import math
import random
import re

import pytest
import torch

from fusedgpt.kernels import flash_attention, flash_attention_qkvpacked, reference
from fusedgpt.kernels import attention as attention_module
from fusedgpt.kernels.backend import BackendUnavailableError
from fusedgpt.train.trainer import deterministic_algorithms
from tests.kernels.launches import record_launches
from tests.kernels.parity import assert_parity
from tests.kernels.sass import opcodes as sass_opcodes

F32, F16 = torch.float32, torch.float16


def _qkv(b, h, tq, tk, d, dtype, device, seed=0, h_kv=None):
    generator = torch.Generator().manual_seed(seed)

    def draw(heads, t):
        return torch.randn(b, heads, t, d, generator=generator).to(device, dtype)

    h_kv = h if h_kv is None else h_kv
    return dict(q=draw(h, tq), k=draw(h_kv, tk), v=draw(h_kv, tk))


def _kernel(**options):
    return lambda q, k, v: flash_attention(q, k, v, backend="triton", **options)


def _oracle(causal=True, softmax_scale=None, dropout_p=0.0, dropout_mask=None, **features):
    """The float64 reference; ``features``: window, softcap, cu_seqlens_q, cu_seqlens_k."""
    return lambda q, k, v: reference.attention(q, k, v, causal, softmax_scale, dropout_p, dropout_mask, **features)


# ------------------------------------------------------------------------- parity

# A covering design rather than the full cross product (interpreter time): every T in
# {1, 17, 77, 128, 257} and every D in {16, 48, 64, 128} meets both causal settings and both
# dtypes, and the pinned interpreter blocks (32 x 16, 16 x 32) see single, partial and many
# blocks.
SQUARE_CASES = [
    # T, D, causal, dtype
    (1, 16, True, F32),
    (1, 128, False, F16),
    (17, 48, True, F16),
    (17, 64, False, F32),
    (77, 64, True, F16),
    (77, 16, False, F32),
    (128, 128, True, F32),
    (128, 48, False, F16),
    (257, 48, True, F32),
    (257, 16, False, F16),
    (257, 128, True, F16),
]


def _case_id(case):
    return "-".join(str(x).replace("torch.", "") for x in case)


def test_covering_design_covers_every_length_head_dim_mask_and_dtype():
    for column, wanted in ((0, {1, 17, 77, 128, 257}), (1, {16, 48, 64, 128})):
        for causal in (True, False):
            assert {c[column] for c in SQUARE_CASES if c[2] == causal} >= wanted
        for dtype in (F32, F16):
            assert {c[column] for c in SQUARE_CASES if c[3] == dtype} >= wanted


@pytest.mark.parametrize("t, d, causal, dtype", SQUARE_CASES, ids=map(_case_id, SQUARE_CASES))
def test_parity(t, d, causal, dtype, device):
    batch = 1 if t > 128 else 2  # the longest sequences with one batch row: interpreter time
    assert_parity(_kernel(causal=causal), _oracle(causal), _qkv(batch, 2, t, t, d, dtype, device))


RECTANGULAR_CASES = [
    # Tq, Tk, D, causal, dtype: decoding (Tq < Tk) and, with a causal mask, rows that see no key
    (1, 77, 64, True, F16),
    (1, 77, 80, False, F32),  # 80 and 96: non-power-of-two head dims in the 128-wide block
    (5, 77, 96, True, F32),
    (5, 77, 16, False, F16),
    (40, 23, 64, True, F32),
    # Tk - Tq = 30: the diagonal ends one key short of a pinned block boundary, where an
    # off-by-one in the unmasked/masked split would show.
    (20, 50, 48, True, F32),
]


@pytest.mark.parametrize("tq, tk, d, causal, dtype", RECTANGULAR_CASES, ids=map(_case_id, RECTANGULAR_CASES))
def test_parity_rectangular(tq, tk, d, causal, dtype, device):
    assert_parity(_kernel(causal=causal), _oracle(causal), _qkv(2, 3, tq, tk, d, dtype, device))


def test_rows_that_see_no_key_are_zero(device):
    inputs = {k: v.requires_grad_() for k, v in _qkv(1, 2, 40, 23, 64, F32, device).items()}
    out = flash_attention(**inputs, backend="triton")
    out.sum().backward()
    hidden = 40 - 23  # query i sees keys j <= i - 17
    assert torch.equal(out[:, :, :hidden], torch.zeros_like(out[:, :, :hidden]))
    assert out[:, :, hidden:].abs().amin(dim=-1).gt(0).all()
    assert torch.equal(inputs["q"].grad[:, :, :hidden], torch.zeros_like(inputs["q"].grad[:, :, :hidden]))


def test_softmax_scale(device):
    assert_parity(_kernel(softmax_scale=0.3), _oracle(softmax_scale=0.3), _qkv(1, 2, 33, 33, 48, F32, device))


def _packed(b, t, h, d, dtype, device):
    return {"qkv": torch.randn(b, t, 3, h, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)}


def _split(fn):
    """Attention on the q, k, v views of a packed (B, T, 3, H, D) projection."""
    def call(qkv):
        q, k, v = qkv.unbind(2)
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return call


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_packed_qkv_views_read_in_place(dtype, device, monkeypatch):
    h, d = 3, 48
    inputs = _packed(2, 45, h, d, dtype, device)
    launched = []
    forward = attention_module.flash_attention_forward

    def spy(q, k, v, *args):
        # The launcher gets the views themselves: one storage, at the packed offsets.
        launched.append(({t.untyped_storage().data_ptr() for t in (q, k, v)}, [t.storage_offset() for t in (q, k, v)]))
        return forward(q, k, v, *args)

    monkeypatch.setattr(attention_module, "flash_attention_forward", spy)
    assert_parity(_split(_kernel()), _split(_oracle()), inputs)
    storages, offsets = launched[0]
    assert len(storages) == 1 and offsets == [0, h * d, 2 * h * d]


PACKED_CASES = [(2, 77, 3, 48, F32, {}), (1, 40, 2, 64, F16, dict(window=9, softcap=4.0)),
                (1, 33, 2, 16, F32, dict(dropout_p=0.25, seed=5))]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-backward", "deterministic-backward"])
@pytest.mark.parametrize("b, t, h, d, dtype, options", PACKED_CASES, ids=lambda x: str(x))
def test_qkvpacked_parity(b, t, h, d, dtype, options, deterministic, device):
    features = {name: options[name] for name in ("window", "softcap") if name in options}
    mask = None
    if options.get("dropout_p"):
        mask = attention_module.dropout_mask(options["seed"], (b, h, t, t), options["dropout_p"], device)

    def oracle(qkv):
        q, k, v = qkv.unbind(2)
        return _oracle(True, None, options.get("dropout_p", 0.0), mask, **features)(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    qkv = torch.randn(b, t, 3, h, d, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    with deterministic_algorithms(deterministic, device):
        assert_parity(lambda qkv: flash_attention_qkvpacked(qkv, backend="triton", **options), oracle, dict(qkv=qkv))


def test_qkvpacked_gradient_is_one_tensor_written_in_place(device):
    # The packed path returns qkv's gradient from the op itself: no split/cat node between.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    qkv = torch.randn(2, 21, 3, 2, 16, device=device).requires_grad_()
    out = flash_attention_qkvpacked(qkv, backend="triton")
    assert "AccumulateGrad" in {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
    with Ops() as ops:
        out.pow(2).sum().backward()
    assert "fusedgpt.flash_attention_qkvpacked_bwd.default" in ops.seen
    assert not [op for op in ops.seen if "cat" in op or "stack" in op], ops.seen
    views = qkv.detach().clone().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in views.unbind(2))
    flash_attention(q, k, v, backend="triton").pow(2).sum().backward()
    torch.testing.assert_close(qkv.grad, views.grad, rtol=1e-6, atol=1e-6)


def test_qkvpacked_under_torch_compile_fullgraph(device):
    qkv = torch.randn(1, 17, 3, 2, 16, device=device)
    grads = []
    for fn in (flash_attention_qkvpacked, torch.compile(flash_attention_qkvpacked, fullgraph=True)):
        leaf = qkv.clone().requires_grad_()
        fn(leaf, window=5, backend="triton").pow(2).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, words", [((2, 5, 2, 3, 8), "(B, T, 3, H, D)"), ((2, 5, 24), "(B, T, 3, H, D)")])
def test_qkvpacked_rejects_other_shapes(bad, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        flash_attention_qkvpacked(torch.zeros(bad), backend="torch")
    with pytest.raises(TypeError, match="qkv must be a tensor"):
        flash_attention_qkvpacked([1.0], backend="torch")


def test_qkvpacked_names_its_own_arguments_in_errors():
    with pytest.raises(TypeError, match="flash_attention_qkvpacked: qkv must be float32"):
        flash_attention_qkvpacked(torch.zeros(1, 4, 3, 2, 8, dtype=torch.int64), backend="torch")
    cu_seqlens = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens and max_seqlen go together, got only cu_seqlens"):
        flash_attention_qkvpacked(torch.zeros(1, 4, 3, 2, 8), cu_seqlens=cu_seqlens, backend="torch")
    with pytest.raises(ValueError, match="got only max_seqlen"):
        flash_attention_qkvpacked(torch.zeros(1, 4, 3, 2, 8), max_seqlen=4, backend="torch")


def test_head_dim_with_non_unit_stride_is_copied(device):
    qkv = _qkv(2, 2, 19, 19, 32, F32, device)
    wide = {name: torch.cat([t, t], dim=-1)[..., ::2] for name, t in qkv.items()}
    assert wide["q"].stride(-1) == 2
    assert_parity(_kernel(), _oracle(), wide)


def test_output_is_stored_token_major(device):
    out = flash_attention(**_qkv(2, 3, 21, 21, 16, F32, device), backend="triton")
    assert out.shape == (2, 3, 21, 16) and out.transpose(1, 2).is_contiguous()


def test_logsumexp_is_saved_in_fp32(device):
    inputs = _qkv(1, 2, 30, 11, 48, F16, device)
    _, lse = attention_module.flash_attention_forward(**inputs, causal=True, softmax_scale=0.2, dropout_p=0.0, seed=0)
    q, k = inputs["q"].double(), inputs["k"].double()
    scores = (q @ k.transpose(-1, -2) * 0.2).masked_fill(~reference.attention_mask(30, 11), float("-inf"))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=1e-5, atol=1e-5)


def test_empty_batch(device):
    inputs = {k: v.requires_grad_() for k, v in _qkv(0, 2, 7, 7, 16, F32, device).items()}
    out = flash_attention(**inputs, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 2, 7, 16) and inputs["k"].grad.shape == (0, 2, 7, 16)


def test_torch_compile_fullgraph_matches_eager(device):
    inputs = _packed(2, 24, 2, 16, F32, device)

    def block(qkv, backend="triton"):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return flash_attention(q, k, v, dropout_p=0.1, seed=7, backend=backend).transpose(1, 2).flatten(2)

    # aot_eager traces exactly what inductor would (dynamo, fake tensors, AOT autograd)
    # without compiling C++ for the CPU around the kernel, which would only cost time here.
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    leaf, eager_leaf = inputs["qkv"].clone().requires_grad_(), inputs["qkv"].clone().requires_grad_()
    out = compiled(leaf)
    out.square().sum().backward()
    expected = block(eager_leaf)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=0, atol=0)


# ------------------------------------------------ grouped-query, window, softcap, packed


def _offsets(lengths, device):
    """int32 (N + 1,) offsets of packed sequences of these lengths."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _packed_options(q_lengths, k_lengths, device):
    return dict(
        cu_seqlens_q=_offsets(q_lengths, device), cu_seqlens_k=_offsets(k_lengths, device),
        max_seqlen_q=max(q_lengths), max_seqlen_k=max(k_lengths),
    )


FEATURE_CASES = [
    # id, B, H, H_kv, Tq (or packed query lengths), Tk (or key lengths), D, dtype, options.
    # Each query/key-head ratio 1, 2, 3, 4, 8 and multi-query; windows of 1, inside, and
    # wider than T; soft-capping with and without causal; D 32 .. 128 (80: not a power of
    # two); the flash-attention suite's odd pairs; dropout with each feature.
    ("gqa2", 1, 4, 2, 113, 203, 64, F16, {}),
    ("gqa4-softcap-noncausal", 1, 8, 2, 45, 45, 64, F32, dict(causal=False, softcap=5.0)),
    ("gqa8-window-dropout", 1, 16, 2, 17, 33, 64, F16, dict(window=5, dropout_p=0.3)),
    ("mqa-window-d80", 2, 3, 1, 77, 77, 80, F32, dict(window=20)),
    ("window1", 1, 2, 2, 108, 256, 64, F32, dict(window=1)),
    ("mqa-window-wider-than-t", 1, 2, 1, 203, 113, 64, F16, dict(window=256)),
    ("softcap-window-dropout-d128", 1, 2, 2, 65, 65, 128, F16, dict(softcap=3.0, window=30, dropout_p=0.2)),
    ("softcap-dropout", 2, 2, 2, 40, 50, 48, F32, dict(softcap=1.0, dropout_p=0.2)),
    # Packed: sequences of length 0 and 1, Tq > Tk (rows that see no key), Tq < Tk.
    ("packed-gqa2", 1, 4, 2, [1, 37, 0, 12, 1], [1, 50, 64, 5, 9], 64, F32, {}),
    ("packed-mqa-softcap-noncausal", 1, 2, 1, [20, 1, 45], [33, 0, 45], 64, F16, dict(causal=False, softcap=2.0)),
    ("packed-window-dropout", 1, 2, 2, [30, 17, 1], [30, 40, 3], 32, F32, dict(window=7, dropout_p=0.25)),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-backward", "deterministic-backward"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_parity_features(case, deterministic, device):
    _, b, h, h_kv, tq, tk, d, dtype, options = case
    options = dict(options)
    if isinstance(tq, list):
        options.update(_packed_options(tq, tk, device))
        tq, tk = sum(tq), sum(tk)
    features = {name: options[name] for name in ("window", "softcap", "cu_seqlens_q", "cu_seqlens_k") if name in options}
    mask = None
    if options.get("dropout_p"):
        options["seed"] = 77
        mask = attention_module.dropout_mask(77, (b, h, tq, tk), options["dropout_p"], device)
    oracle = _oracle(options.get("causal", True), None, options.get("dropout_p", 0.0), mask, **features)
    with deterministic_algorithms(deterministic, device):
        assert_parity(_kernel(**options), oracle, _qkv(b, h, tq, tk, d, dtype, device, h_kv=h_kv))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("choice", ["", "fused", "recompute"])
def test_backward_path_follows_torch_determinism_and_the_env(deterministic, choice, device, monkeypatch):
    # Fused: one kernel adds dq into fp32 sums with atomics (the 5 products once), its last
    # program writing dq; recompute (always when deterministic, or when the env asks):
    # the dK/dV kernel, then the dQ kernel (a fixed summation order).
    monkeypatch.setenv(attention_module.BACKWARD_ENV, choice)
    launched = record_launches(monkeypatch, attention_module, ("_attn_bwd_fused", "_attn_bwd_dkdv", "_attn_bwd_dq"))
    inputs = {k: v.requires_grad_() for k, v in _qkv(1, 2, 40, 40, 16, F32, device).items()}
    with deterministic_algorithms(deterministic, device):
        flash_attention(**inputs, backend="triton").sum().backward()
    fused = not deterministic and choice != "recompute"
    assert launched == (["_attn_bwd_fused"] if fused else ["_attn_bwd_dkdv", "_attn_bwd_dq"])


def _workspace(tensor):
    """The fused backward's workspace for ``tensor``'s device and the current stream."""
    device = tensor.device
    return attention_module._DQ_WORKSPACES[device, torch.cuda.current_stream(device).cuda_stream
                                           if device.type == "cuda" else None]


def _fused_backward_against_reference(shape, device, packed=False, seed=0, **options):
    """Run the fused backward on (B, H, H_kv, Tq, Tk, D) — packed: B sequences, the last
    shorter and, from three on, without keys — check q, k, v's gradients against the
    float64 reference and that the workspace is left zero; returns that workspace."""
    b, h, h_kv, tq, tk, d = shape
    sequences = b
    if packed:
        lengths_q, lengths_k = [tq] * (b - 1) + [tq // 3], [tk] * (b - 1) + [0 if b > 2 else tk // 2]
        options.update(_packed_options(lengths_q, lengths_k, device))
        b, tq, tk = 1, sum(lengths_q), sum(lengths_k)
    leaves = {k: v.requires_grad_() for k, v in _qkv(b, h, tq, tk, d, F32, device, seed=seed, h_kv=h_kv).items()}
    with deterministic_algorithms(False, device):
        out = flash_attention(**leaves, **options, backend="triton")
        grad = torch.randn_like(out)
        out.backward(grad)
    expected = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    oracle_options = {k: v for k, v in options.items() if not k.startswith("max_seqlen")}
    reference.attention(**expected, **oracle_options).backward(grad.double())
    for name in ("q", "k", "v"):
        torch.testing.assert_close(leaves[name].grad.double(), expected[name].grad, rtol=1e-4, atol=1e-4)
    sums, counts = _workspace(leaves["q"])
    assert sums.numel() >= b * h * tq * 64 and counts.numel() >= sequences * h_kv
    assert not sums.any() and not counts.any(), "the fused backward left its workspace non-zero"
    return sums, counts


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_fused_backward_leaves_its_workspace_zero_and_reuses_it(packed, device, monkeypatch):
    # The last program of each (sequence, key/value head) zeroes the sums and the count it
    # used: a second call (smaller, then larger: the workspace grows) starts from zeros.
    monkeypatch.setattr(attention_module, "_DQ_WORKSPACES", {})
    sizes = []
    for seed, shape in enumerate([(3, 6, 3, 45, 61, 48), (1, 2, 1, 17, 17, 16), (2, 8, 2, 70, 70, 64)]):
        sums, counts = _fused_backward_against_reference(shape, device, packed, seed, causal=True)
        sizes.append(sums.numel())
    assert sizes[1] == sizes[0] < sizes[2]  # kept, then grown


def _programs_run_in(order, monkeypatch) -> list:
    """Make the interpreter run a grid's programs in ``order`` ("reversed" or "shuffled",
    per grid axis) instead of ascending: it keeps its loops and we permute the program ids
    each step hands out. Returns a list that records each permuted grid."""
    from triton.runtime import interpreter

    builder, generator, permuted = interpreter.interpreter_builder, random.Random(1), []
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx

    def grid_dim(*dims):
        permuted.append([list(range(n))[::-1] if order == "reversed" else generator.sample(range(n), n) for n in dims])
        set_grid_dim(*dims)

    def grid_idx(*index):
        set_grid_idx(*(axis[i] for axis, i in zip(permuted[-1], index)))

    monkeypatch.setattr(builder, "set_grid_dim", grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", grid_idx)
    return permuted


@pytest.mark.skipif(torch.cuda.is_available(), reason="orders the interpreter's programs (a GPU runs them at once: "
                    "see test_fused_backward_dq_under_concurrent_programs_gpu)")
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_fused_backward_is_right_whichever_program_finishes_last(order, monkeypatch):
    # In ascending order the last program of a pair is its last key block; here it is the
    # first (reversed) or any (shuffled) — the one that sees the most queries under causal.
    monkeypatch.setattr(attention_module, "_DQ_WORKSPACES", {})
    permuted = _programs_run_in(order, monkeypatch)
    device = torch.device("cpu")
    _fused_backward_against_reference((2, 4, 2, 77, 77, 48), device, causal=True)
    _fused_backward_against_reference((3, 4, 1, 40, 52, 64), device, packed=True, causal=True, window=9)
    assert any(axis != sorted(axis) for grid in permuted for axis in grid)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fused_backward_orders_its_sums_before_the_last_programs_read(arch):
    """The memory ordering the interpreter cannot exercise (it runs programs one after
    another), read from the SASS of the build training runs: every thread's additions,
    then a CTA barrier, then the count's increment between a gpu-scope fence (release) and
    an L1 invalidation (acquire), a barrier, and the sums read past L1."""
    opcodes = sass_opcodes("attention", "bwd-fused", "_attn_bwd_dkdv_kernel", arch, {"HAS_DROPOUT": False})
    count = next(i for i, op in enumerate(opcodes) if op.startswith("ATOMG.E.ADD"))
    last_addition = max(i for i, op in enumerate(opcodes) if op.split(".")[0] in ("RED", "REDG"))
    assert last_addition < count
    assert any(op.startswith("BAR.SYNC") for op in opcodes[last_addition:count])
    assert "MEMBAR.ALL.GPU" in opcodes[count - 3:count] and opcodes[count + 1] == "CCTL.IVALL"
    after = opcodes[count + 1:]
    first_read = next(i for i, op in enumerate(after) if op.startswith("LDG.E"))
    assert any(op.startswith("BAR.SYNC") for op in after[:first_read])
    reads = [op for op in after if op.startswith("LDG.E")]
    assert reads and all("STRONG.GPU" in op for op in reads)


def test_backward_env_choice_is_checked(device, monkeypatch):
    inputs = {k: v.requires_grad_() for k, v in _qkv(1, 2, 20, 20, 16, F32, device).items()}
    monkeypatch.setenv(attention_module.BACKWARD_ENV, "both")
    out = flash_attention(**inputs, backend="triton")
    with pytest.raises(ValueError, match="must be 'fused' or 'recompute'"):
        out.sum().backward()


def test_fused_and_deterministic_backward_agree(device):
    inputs = _qkv(2, 4, 77, 77, 48, F32, device, h_kv=2)
    grads = []
    for deterministic in (False, True):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        with deterministic_algorithms(deterministic, device):
            flash_attention(**leaves, window=30, backend="triton").pow(2).sum().backward()
        grads.append([leaves[name].grad for name in ("q", "k", "v")])
    for fused, fixed in zip(*grads):
        torch.testing.assert_close(fused, fixed, rtol=1e-5, atol=1e-5)


def test_packed_sequences_match_each_sequence_alone(device):
    # The same kernel on each sequence as its own batch: packing changes nothing (and the
    # reference's packed mask is not the only witness).
    q_lengths, k_lengths = [9, 1, 40], [30, 4, 40]
    inputs = _qkv(1, 4, sum(q_lengths), sum(k_lengths), 16, F32, device, h_kv=2)
    packed = flash_attention(**inputs, window=6, softcap=4.0, backend="triton",
                             **_packed_options(q_lengths, k_lengths, device))
    q_at, k_at = _offsets(q_lengths, "cpu").tolist(), _offsets(k_lengths, "cpu").tolist()
    for n in range(len(q_lengths)):
        alone = flash_attention(
            inputs["q"][:, :, q_at[n]:q_at[n + 1]], inputs["k"][:, :, k_at[n]:k_at[n + 1]],
            inputs["v"][:, :, k_at[n]:k_at[n + 1]], window=6, softcap=4.0, backend="triton",
        )
        torch.testing.assert_close(packed[:, :, q_at[n]:q_at[n + 1]], alone, rtol=1e-6, atol=1e-6)


def test_grouped_query_reads_kv_in_place(device, monkeypatch):
    inputs = _qkv(1, 8, 21, 21, 16, F32, device, h_kv=2)
    launched = []
    forward = attention_module.flash_attention_forward

    def spy(q, k, v, *args):
        launched.append((k.data_ptr(), tuple(k.shape)))
        return forward(q, k, v, *args)

    monkeypatch.setattr(attention_module, "flash_attention_forward", spy)
    flash_attention(**inputs, backend="triton")
    assert launched == [(inputs["k"].data_ptr(), (1, 2, 21, 16))]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-backward", "deterministic-backward"])
def test_window_skips_key_blocks_outside_it(device, deterministic):
    # NaN values in keys 0..15 (one pinned forward key block). A masked-but-visited block
    # would spread them (0 * NaN in P V) to every row of the query blocks that visit it;
    # skipped, they cannot reach query blocks whose window starts past them: with window 8,
    # the forward's query blocks from row 32 on (pinned BLOCK_M 32). For dq, the blocks of
    # the kernel that forms it: the dQ kernel's (BLOCK_M 32, BLOCK_N 16): rows from 32 on;
    # the fused backward's, which adds dq from 32-key blocks into 16-query blocks: the key
    # block 0..31 is seen up to query 31 + 8 - 1, so rows from 48 on.
    window = 8
    fwd = attention_module.INTERPRETER_CONFIGS["fwd"][0].kwargs
    fused = attention_module.INTERPRETER_CONFIGS["bwd"][0].kwargs
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"]) == (32, 16) and (fused["BLOCK_M"], fused["BLOCK_N"]) == (16, 32)
    clean_from = fwd["BLOCK_M"]
    dq_clean_from = 32 if deterministic else 48
    clean = {k: v.requires_grad_() for k, v in _qkv(1, 2, 96, 96, 16, F32, device).items()}
    poisoned = {k: v.detach().clone().requires_grad_() for k, v in clean.items()}
    with torch.no_grad():
        poisoned["v"][:, :, :16] = float("nan")
    outs = []
    with deterministic_algorithms(deterministic, device):
        for inputs in (clean, poisoned):
            out = flash_attention(**inputs, window=window, backend="triton")
            out.sum().backward()
            outs.append(out)
    assert outs[1][:, :, :clean_from].isnan().any()  # the first query block did see them
    torch.testing.assert_close(outs[1][:, :, clean_from:], outs[0][:, :, clean_from:], rtol=0, atol=0)
    assert poisoned["q"].grad[:, :, :dq_clean_from].isnan().any()
    torch.testing.assert_close(poisoned["q"].grad[:, :, dq_clean_from:], clean["q"].grad[:, :, dq_clean_from:],
                               rtol=0, atol=0)


def test_torch_compile_fullgraph_with_every_feature(device):
    inputs = _qkv(1, 4, 30, 30, 16, F32, device, h_kv=2)
    options = dict(dropout_p=0.1, seed=3, window=5, softcap=2.0, **_packed_options([10, 20], [12, 18], device))

    def attend(q, k, v):
        return flash_attention(q, k, v, backend="triton", **options)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    leaves = [{k: v.clone().requires_grad_() for k, v in inputs.items()} for _ in range(2)]
    out, expected = compiled(**leaves[0]), attend(**leaves[1])
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(leaves[0][name].grad, leaves[1][name].grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_a_query_row_propagates(backend, device):
    # Defined behaviour, as PyTorch's own ops: a NaN in query row i makes output row i and
    # dq row i NaN, and the gradients of every key and value that row sees (others may be
    # NaN too, through 0 * NaN); the other rows are untouched. Never a 0 in its place.
    row = 5
    inputs = {k: v.requires_grad_() for k, v in _qkv(1, 2, 20, 20, 16, F32, device).items()}
    poisoned = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.no_grad():
        poisoned["q"][0, 1, row, 3] = float("nan")
    results = []
    for leaves in (inputs, poisoned):
        out = flash_attention(**leaves, backend=backend)
        out.sum().backward()
        results.append(out)
    clean, out = results
    assert out[0, 1, row].isnan().all() and poisoned["q"].grad[0, 1, row].isnan().all()
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, 1, row] = False
    torch.testing.assert_close(out[others], clean[others], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(poisoned["q"].grad[others], inputs["q"].grad[others], rtol=1e-6, atol=1e-6)
    for name in ("k", "v"):
        assert poisoned[name].grad[0, 1, : row + 1].isnan().all(), name  # causal: keys 0..row



# ------------------------------------------------------------------------- dropout


DROPOUT_CASES = [(77, 77, 48, True, F32), (5, 77, 64, True, F16), (33, 50, 16, False, F32)]


@pytest.mark.parametrize("tq, tk, d, causal, dtype", DROPOUT_CASES, ids=map(_case_id, DROPOUT_CASES))
def test_dropout_parity_with_the_kernels_mask(tq, tk, d, causal, dtype, device):
    p, seed = 0.25, 1234
    mask = attention_module.dropout_mask(seed, (2, 2, tq, tk), p, device)
    assert 0 < mask.float().mean() < 1
    assert_parity(
        _kernel(causal=causal, dropout_p=p, seed=seed),
        _oracle(causal, dropout_p=p, dropout_mask=mask),
        _qkv(2, 2, tq, tk, d, dtype, device),
    )


def test_dropout_keep_rate_and_independence(device):
    p, shape = 0.3, (2, 2, 128, 160)
    mask = attention_module.dropout_mask(99, shape, p, device).float()
    assert abs(mask.mean().item() - (1 - p)) < 0.01  # 82k draws: 0.01 is > 5 standard deviations
    # No structure along any axis: per-head, per-query and per-key keep rates near 1 - p
    # (bounds at 5 standard deviations).
    assert (mask.mean(dim=(2, 3)) - (1 - p)).abs().max() < 0.02
    assert (mask.mean(dim=(0, 1, 3)) - (1 - p)).abs().max() < 0.1
    assert (mask.mean(dim=(0, 1, 2)) - (1 - p)).abs().max() < 0.1
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    assert torch.equal(mask, attention_module.dropout_mask(99, shape, p, device).float())
    assert not torch.equal(mask, attention_module.dropout_mask(100, shape, p, device).float())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_same_seed_same_result(backend, device):
    inputs = _qkv(1, 2, 40, 40, 16, F32, device)

    def run(seed):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = flash_attention(**leaves, dropout_p=0.4, seed=seed, backend=backend)
        out.sum().backward()
        return [out] + [leaves[k].grad for k in ("q", "k", "v")]

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_dropout_without_seed_follows_torch_generator(device):
    inputs = _qkv(1, 1, 16, 16, 16, F32, device)
    torch.manual_seed(3)
    first = flash_attention(**inputs, dropout_p=0.5, backend="triton")
    torch.manual_seed(3)
    assert torch.equal(first, flash_attention(**inputs, dropout_p=0.5, backend="triton"))
    assert not torch.equal(first, flash_attention(**inputs, dropout_p=0.5, backend="triton"))


# ------------------------------------------------------------------------- memory


def _saved(fn, inputs):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(**leaves)
    return saved, out


def test_saves_only_qkv_output_and_fp32_logsumexp(device):
    b, h, h_kv, tq, tk, d = 1, 4, 2, 67, 89, 16  # primes: no saved shape can hide Tq * Tk
    inputs = _qkv(b, h, tq, tk, d, F16, device, h_kv=h_kv)
    saved, out = _saved(_kernel(dropout_p=0.1, seed=1), inputs)
    assert all(t.numel() < tq * tk for t in saved), [tuple(t.shape) for t in saved]
    storages = {t.untyped_storage().data_ptr(): t for t in saved}
    # q, o and k, v (grouped: H_kv heads, never repeated) in fp16, and the fp32 logsumexp
    expected = (2 * b * h_kv * tk * d + 2 * b * h * tq * d) * 2 + b * h * tq * 4
    assert sum(t.untyped_storage().nbytes() for t in storages.values()) == expected
    assert any(t.dtype == torch.float32 and t.shape == (b, h, tq) for t in saved)
    assert any(t.data_ptr() == out.data_ptr() for t in saved)
    # The accounting does see a Tq x Tk tensor where one is saved: the reference path, which
    # keeps the probabilities (and the dropout mask).
    reference_saved, _ = _saved(lambda **kw: flash_attention(**kw, dropout_p=0.1, seed=1, backend="torch"), inputs)
    assert any(t.shape[-2:] == (tq, tk) for t in reference_saved)


# ------------------------------------------------------------------------- configs


# The kernels' config lists: forward, fused backward, and the deterministic backward's two.
KINDS = ("fwd", "bwd", "dkdv", "dq")
KEY_BLOCK_KINDS = ("bwd", "dkdv")  # these own a key block and loop over query blocks


def test_configs_suit_the_hardware_and_the_causal_diagonal():
    assert set(attention_module.HALF_CONFIGS) == {
        (block_d, dropout) for block_d in attention_module.HEAD_DIM_BLOCKS for dropout in (False, True)
    }
    for specialisation, by_kind in attention_module.HALF_CONFIGS.items():
        assert set(by_kind) == set(KINDS), specialisation
        for kind, configs in by_kind.items():
            owned, looped = ("BLOCK_N", "BLOCK_M") if kind in KEY_BLOCK_KINDS else ("BLOCK_M", "BLOCK_N")
            for c in configs:
                assert c.kwargs[owned] >= max(64, c.kwargs[looped]) and c.num_warps % 4 == 0, (specialisation, kind, c)
    for (capability, block_d, dropout), by_kind in attention_module.ARCH_HALF_CONFIGS.items():
        assert capability in (8, 9) and (block_d, dropout) in attention_module.HALF_CONFIGS
        for kind, configs in by_kind.items():
            owned, looped = ("BLOCK_N", "BLOCK_M") if kind in KEY_BLOCK_KINDS else ("BLOCK_M", "BLOCK_N")
            for c in configs:
                assert c.kwargs[owned] >= max(64, c.kwargs[looped]) and c.num_warps % 4 == 0, c
    for kind, configs in {**attention_module.FP32_CONFIGS, **attention_module.INTERPRETER_CONFIGS}.items():
        owned, looped = ("BLOCK_N", "BLOCK_M") if kind in KEY_BLOCK_KINDS else ("BLOCK_M", "BLOCK_N")
        assert all(c.kwargs[owned] >= c.kwargs[looped] for c in configs), kind


@pytest.mark.parametrize("dtype", [F16, torch.bfloat16, F32], ids=str)
def test_autotune_pruning_by_shape(dtype):
    q = torch.empty(0, dtype=dtype)
    for kind in KINDS:
        prune = attention_module._prune(kind)
        for block_d in attention_module.HEAD_DIM_BLOCKS:
            for dropout in (False, True):
                meta = dict(BLOCK_D=block_d, HAS_DROPOUT=dropout, WINDOWED=False, SOFTCAP=False, VARLEN=False)
                pool = attention_module.gpu_configs(kind, dtype, block_d, dropout)
                small = prune(pool, dict(Q=q, q_bucket=1, k_bucket=1), **meta)
                assert len(small) == 1 and small[0] in pool
                assert small[0].kwargs["BLOCK_M"] == min(c.kwargs["BLOCK_M"] for c in pool)
                assert prune(pool, dict(Q=q, q_bucket=8192, k_bucket=8192), **meta) == pool
                decode = prune(pool, dict(Q=q, q_bucket=1, k_bucket=8192), **meta)
                assert all(c.kwargs["BLOCK_M"] == small[0].kwargs["BLOCK_M"] for c in decode)


def test_per_architecture_lists_are_pruned_by_the_gpu_and_listed_for_it(monkeypatch):
    # sm_80's own fused-backward list at D=128; sm_90 keeps the shared one.
    q = torch.empty(0, dtype=F16)
    meta = dict(BLOCK_D=128, HAS_DROPOUT=False, WINDOWED=False, SOFTCAP=False, VARLEN=False)
    kept = {}
    for capability in (8, 9):
        monkeypatch.setattr(attention_module, "_listed_capability", capability)
        pool = attention_module.gpu_configs("bwd", F16, 128, False, capability=capability)
        kept[capability] = attention_module._prune("bwd")(pool, dict(Q=q, q_bucket=4096, k_bucket=4096), **meta)
    assert kept[8] == attention_module.ARCH_HALF_CONFIGS[8, 128, False]["bwd"]
    assert kept[9] == attention_module.HALF_CONFIGS[128, False]["bwd"]
    monkeypatch.setattr(attention_module, "_listed_capability", None)
    from fusedgpt.kernels import compile_report

    variants = attention_module.aot_variants(F16, compile_report.WORKLOADS["d128"])
    tagged = {(v.archs, v.config["BLOCK_M"], v.config["BLOCK_N"]) for v in variants if v.archs}
    assert (("sm_80",), 64, 64) in tagged and (("sm_90",), 32, 128) in tagged
    assert {v.pass_ for v in variants if v.archs} == {"bwd-fused", "fwd"}  # sm_90's D=128 forward too


@pytest.mark.parametrize("feature", ["WINDOWED", "SOFTCAP", "VARLEN"])
def test_feature_builds_get_the_small_config_single_stage(feature):
    # Window, soft-cap and packed builds spilled on sm_80 with the tuned lists: each gets
    # its list's small tiles, single-stage (fp32 lists are single-stage small tiles already).
    for dtype in (F16, torch.bfloat16, F32):
        q = torch.empty(0, dtype=dtype)
        for kind in KINDS:
            for block_d in attention_module.HEAD_DIM_BLOCKS:
                for dropout in (False, True):
                    tuned = attention_module.gpu_configs(kind, dtype, block_d, dropout)
                    meta = dict(BLOCK_D=block_d, HAS_DROPOUT=dropout, WINDOWED=False, SOFTCAP=False, VARLEN=False)
                    meta[feature] = True
                    kept = attention_module._prune(kind)(tuned, dict(Q=q, q_bucket=8192, k_bucket=8192), **meta)
                    if dtype == F32:
                        assert kept == tuned
                        continue
                    [config] = kept
                    assert config.kwargs == tuned[0].kwargs and config.num_warps == tuned[0].num_warps
                    assert config.num_stages == 1


def test_head_dim_blocks():
    assert [attention_module.head_dim_block(d) for d in (1, 16, 48, 64, 65, 80, 96, 128)] == [64] * 4 + [128] * 4


@pytest.fixture(scope="module")
def report_rows():
    from tests.kernels.test_compile_report import run_report

    return run_report("attention")


def test_compile_report_covers_every_config(report_rows):
    from fusedgpt.kernels.compile_report import DTYPES

    expected = {
        (v.pass_, v.kernel.__name__, str(v.config), arch)
        for name in DTYPES for v in attention_module.aot_variants(DTYPES[name]) for arch in v.archs or ("sm_80", "sm_90")
    }
    seen = {(r["pass"], r["kernel"], str({"dtype": r["dtype"], **r["config"]}), r["arch"]) for r in report_rows}
    assert seen == expected and len(report_rows) == len(expected)
    kernels = {r["kernel"] for r in report_rows}
    assert kernels == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_delta_kernel"}
    # Both backwards: the dK/dV kernel with and without dQ's accumulation.
    assert {r["config"]["ACCUMULATE_DQ"] for r in report_rows if r["kernel"] == "_attn_bwd_dkdv_kernel"} == {True, False}


def test_compile_report_is_healthy_with_tensor_cores(report_rows):
    from fusedgpt.kernels.compile_report import problems

    assert problems(report_rows) == []
    for row in report_rows:
        where = (row["kernel"], row["dtype"], row["arch"], row["config"])
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, where
        assert row["shared_bytes"] <= row["shared_limit"], where
        if row["kernel"] == "_attn_bwd_delta_kernel":  # no matmul
            continue
        if row["dtype"] in ("float16", "bfloat16"):
            tensor_cores = row["hmma"] if row["arch"] == "sm_80" else row["hgmma"]
            assert tensor_cores > 0, where
        else:  # fp32 is computed in true fp32, on CUDA cores
            assert row["hmma"] == row["hgmma"] == 0, where


# ------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("tq, tk, d, causal", [(257, 257, 128, True), (77, 77, 48, False), (5, 77, 80, True)])
def test_bf16_parity_gpu(tq, tk, d, causal):
    assert_parity(_kernel(causal=causal), _oracle(causal), _qkv(2, 3, tq, tk, d, torch.bfloat16, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("h_kv", [16, 4], ids=["mha", "gqa4"])
def test_fused_backward_dq_under_concurrent_programs_gpu(h_kv):
    """What the interpreter cannot show: the last program of each (batch, key/value head)
    reads complete sums while the others still run. Over repeated calls on a busy grid,
    the fused dq agrees with the recompute backward's, and the workspace is left zero."""
    device = torch.device("cuda")
    inputs = _qkv(4, 16, 2048, 2048, 64, torch.bfloat16, device, h_kv=h_kv)
    o, lse = attention_module.flash_attention_forward(*inputs.values(), True, 0.125, 0.0, 0)
    do = torch.randn_like(o)
    args = (do, *inputs.values(), o, lse, True, 0.125, 0.0, 0)
    expected = attention_module.flash_attention_backward(*args, fused=False)
    for _ in range(20):
        got = attention_module.flash_attention_backward(*args, fused=True)
        for name, a, b in zip("qkv", got, expected):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=f"d{name}")
    sums, counts = _workspace(inputs["q"])
    assert not sums.any() and not counts.any()


@pytest.mark.gpu
def test_bf16_dropout_parity_gpu():
    mask = attention_module.dropout_mask(11, (2, 2, 300, 300), 0.2, "cuda")
    assert_parity(_kernel(dropout_p=0.2, seed=11), _oracle(dropout_p=0.2, dropout_mask=mask),
                  _qkv(2, 2, 300, 300, 96, torch.bfloat16, "cuda"))


# ------------------------------------------------------------------------- dispatch and bad input


@pytest.mark.parametrize(
    "shape, words",
    [((1, 2, 9, 160), "head dim 160 > 128"), ((65536, 1, 2, 16), "batch 65536 or heads 1 exceed the kernel grid")],
    ids=["head-dim", "batch"],
)
def test_what_the_kernel_cannot_take_goes_to_reference_under_auto(shape, words, device):
    b, h, t, d = shape
    inputs = _qkv(b, h, t, t, d, F32, device)
    torch.testing.assert_close(flash_attention(**inputs), reference.attention(**inputs))
    with pytest.raises(BackendUnavailableError, match=words):
        flash_attention(**inputs, backend="triton")


def test_float64_and_bf16_go_to_reference_under_auto(device):
    inputs = _qkv(1, 2, 9, 9, 16, torch.float64, device)
    torch.testing.assert_close(flash_attention(**inputs), reference.attention(**inputs))
    with pytest.raises(BackendUnavailableError, match="float64"):
        flash_attention(**inputs, backend="triton")
    if not torch.cuda.is_available():
        bf16 = _qkv(1, 2, 9, 9, 16, torch.bfloat16, "cpu")
        torch.testing.assert_close(flash_attention(**bf16), reference.attention(**bf16))
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            flash_attention(**bf16, backend="triton")


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr("fusedgpt.kernels.backend.INTERPRETER_ON", False)
    inputs = _qkv(1, 1, 4, 4, 16, F32, "cpu")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        flash_attention(**inputs, backend="triton")
    torch.testing.assert_close(flash_attention(**inputs), reference.attention(**inputs))


def _bad(packed=False, **changes):
    """Valid inputs with ``changes``: a function of an input tensor, or an option's value.
    ``packed``: two packed sequences (queries 2 + 3, keys 3 + 4) with 4 query heads and 2
    key/value heads, instead of a (2, 3, 5, 7, 16) batch."""
    def make():
        if packed:
            inputs, options = _qkv(1, 4, 5, 7, 16, F32, "cpu", h_kv=2), _packed_options([2, 3], [3, 4], "cpu")
        else:
            inputs, options = _qkv(2, 3, 5, 7, 16, F32, "cpu"), {}
        for name, change in changes.items():
            if name in inputs:
                inputs[name] = change(inputs[name])
            else:
                options[name] = change
        return inputs, options
    return make


@pytest.mark.parametrize(
    "make, error, words",
    [
        (_bad(q=lambda t: t[0]), ValueError, "q must have 4 dimensions"),
        (_bad(k=lambda t: t[None]), ValueError, "k must have 4 dimensions"),
        (_bad(k=lambda t: t[:1], v=lambda t: t[:1]), ValueError,
         r"k must have shape \(B, H_kv, Tk, D\) = \(2, H_kv, Tk, 16\)"),
        (_bad(v=lambda t: t[:, :2]), ValueError, "v must have shape"),
        (_bad(k=lambda t: t[..., :8]), ValueError, "k must have shape"),
        (_bad(v=lambda t: t[:, :, :6]), ValueError, "k and v must have the same length"),
        (_bad(q=lambda t: t[:, :, :0]), ValueError, "must be >= 1"),
        (_bad(k=lambda t: t.half()), TypeError, "k must have q's dtype"),
        (_bad(q=lambda t: t.long()), TypeError, "q must be float32"),
        (_bad(v=lambda t: t.numpy()), TypeError, "v must be a torch.Tensor"),
        (_bad(v=lambda t: t.to("meta")), ValueError, "one device.*v on meta"),
        (_bad(causal="yes"), TypeError, "causal must be a bool"),
        (_bad(causal=1), TypeError, "causal must be a bool, got 1"),
        (_bad(softmax_scale=0.0), ValueError, "softmax_scale must be a finite real number > 0"),
        (_bad(softmax_scale=math.nan), ValueError, "softmax_scale"),
        (_bad(softmax_scale=math.inf), ValueError, "softmax_scale must be a finite real number > 0, got inf"),
        (_bad(softmax_scale=True), TypeError, "softmax_scale must be a finite real number"),
        (_bad(dropout_p=1.0), ValueError, "dropout_p must be a finite real number >= 0 and < 1, got 1.0"),
        (_bad(dropout_p=-0.1), ValueError, "dropout_p"),
        (_bad(dropout_p=math.nan), ValueError, "dropout_p"),
        (_bad(seed=-1), ValueError, r"seed must be an int >= 0 and < 2\*\*63, got -1"),
        (_bad(seed=2**63), ValueError, "seed must be an int"),
        (_bad(seed=1.5), TypeError, "seed must be an int"),
        (_bad(backend="cuda"), ValueError, "backend must be one of"),
        (_bad(k=lambda t: t[:, :2], v=lambda t: t[:, :2]), ValueError,
         "q's heads H = 3 must be a multiple of k and v's heads H_kv = 2"),
        (_bad(window=0), ValueError, "window must be an int >= 1"),
        (_bad(window=2.0), TypeError, "window must be an int"),
        (_bad(window=4, causal=False), ValueError, "window needs causal=True"),
        (_bad(softcap=0.0), ValueError, "softcap must be a finite real number > 0"),
        (_bad(softcap=-1.0), ValueError, "softcap"),
        (_bad(softcap=math.inf), ValueError, "softcap"),
        (_bad(cu_seqlens_q=_offsets([2, 3], "cpu"), cu_seqlens_k=_offsets([3, 4], "cpu"), max_seqlen_q=3,
              max_seqlen_k=4), ValueError, "one batch row .* got batch 2"),
        (_bad(packed=True, cu_seqlens_k=None), ValueError, "need both cu_seqlens_q and cu_seqlens_k"),
        (_bad(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=3), ValueError,
         r"need both cu_seqlens_q and cu_seqlens_k, got only \['max_seqlen_q'\]"),
        (_bad(packed=True, cu_seqlens_q=_offsets([2, 3], "cpu").long()), TypeError, "cu_seqlens_q must be int32"),
        (_bad(packed=True, cu_seqlens_k=[0, 3, 7]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
        (_bad(packed=True, cu_seqlens_q=_offsets([2, 3], "cpu")[None]), ValueError, r"cu_seqlens_q must have shape \(N \+ 1,\)"),
        (_bad(packed=True, cu_seqlens_q=torch.tensor([0, 4, 2, 5], dtype=torch.int32)), ValueError,
         r"cu_seqlens_q must rise from 0 to the packed length 5 without decreasing, got \[0, 4, 2, 5\]"),
        (_bad(packed=True, cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
         "cu_seqlens_k must rise from 0 to the packed length 7"),
        (_bad(packed=True, cu_seqlens_k=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "rise from 0"),
        (_bad(packed=True, cu_seqlens_k=_offsets([3, 1, 3], "cpu")), ValueError, "must count the same sequences, got 2 and 3"),
        (_bad(packed=True, max_seqlen_k=None), ValueError, "max_seqlen_k is required with cu_seqlens_k"),
        (_bad(packed=True, max_seqlen_q=2), ValueError, "max_seqlen_q = 2 is less than the longest sequence, 3"),
        (_bad(packed=True, max_seqlen_q=0), ValueError, "max_seqlen_q must be an int >= 1"),
        (_bad(packed=True, cu_seqlens_q=_offsets([2, 3], "meta")), ValueError, "one device.*cu_seqlens_q on meta"),
    ],
)
def test_bad_input(make, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel launched before the input was rejected")

    monkeypatch.setattr(attention_module, "flash_attention_forward", no_kernel)
    monkeypatch.setattr(reference, "attention", no_kernel)
    inputs, options = make()
    with pytest.raises(error, match=words):
        flash_attention(**inputs, **options)
