import math

import pytest
import torch

from fusedgpt.kernels import apply_rotary, reference, rotary_cache
from fusedgpt.kernels import rotary as rotary_module
from tests.kernels.parity import assert_parity

# (B, T, H, H_kv, D): D/2 = 5 and 3 are not powers of two; one head of one token; MQA.
SHAPES = [(2, 7, 3, 1, 16), (1, 1, 1, 1, 2), (3, 13, 4, 2, 10), (1, 5, 2, 2, 6)]
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)


def _qk(b, t, h, h_kv, d, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(q=torch.randn(b, t, h, d, generator=generator).to(device, dtype),
                k=torch.randn(b, t, h_kv, d, generator=generator).to(device, dtype))


def _rotary(fn, cos, sin, **options):
    return lambda q, k: fn(q, k, cos.to(q.device), sin.to(q.device), **options)


def _kernel(q, k, cos, sin, positions=None, interleaved=False):
    return apply_rotary(q, k, cos, sin, positions=positions, interleaved=interleaved, backend="triton")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_parity(shape, dtype, interleaved, device):
    cos, sin = rotary_cache(shape[-1], 32, theta=100.0)
    assert_parity(_rotary(_kernel, cos, sin, interleaved=interleaved),
                  _rotary(reference.apply_rotary, cos, sin, interleaved=interleaved), _qk(*shape, dtype, device))


@pytest.mark.parametrize("positions", ["offset", "per-sequence"])
def test_positions_parity(positions, device):
    b, t = 2, 5
    cos, sin = rotary_cache(8, 40, scaling=LLAMA3)
    pos = (torch.arange(t) + 17 if positions == "offset" else torch.tensor([[3, 4, 5, 6, 7], [30, 31, 32, 33, 34]]))
    pos = pos.to(device)
    assert_parity(_rotary(_kernel, cos, sin, positions=pos),
                  _rotary(reference.apply_rotary, cos, sin, positions=pos), _qk(b, t, 3, 1, 8, torch.float32, device))


def test_kv_cache_offset_matches_full_sequence(device):
    # Rotating tokens 9..11 at positions 9..11 gives what rotating the whole sequence gives.
    qk = _qk(2, 12, 2, 1, 8, torch.float32, device)
    cos, sin = (t.to(device) for t in rotary_cache(8, 16))
    full_q, full_k = _kernel(qk["q"], qk["k"], cos, sin)
    step_q, step_k = _kernel(qk["q"][:, 9:], qk["k"][:, 9:], cos, sin, positions=torch.arange(9, 12, device=device))
    torch.testing.assert_close(step_q, full_q[:, 9:])
    torch.testing.assert_close(step_k, full_k[:, 9:])


def test_views_of_packed_projection_are_read_in_place(device, monkeypatch):
    b, t, h, h_kv, d = 2, 6, 4, 2, 8
    generator = torch.Generator().manual_seed(3)
    inputs = dict(qkv=torch.randn(b, t, h + 2 * h_kv, d, generator=generator).to(device))
    cos, sin = (x.to(device) for x in rotary_cache(d, t))

    def split(fn):
        return lambda qkv: fn(qkv[:, :, :h], qkv[:, :, h:h + h_kv], cos, sin)

    assert_parity(split(_kernel), split(reference.apply_rotary), inputs)
    seen = []
    launch = rotary_module.rotary_forward
    monkeypatch.setattr(rotary_module, "rotary_forward", lambda q, k, *rest: seen.append((q, k)) or launch(q, k, *rest))
    split(_kernel)(inputs["qkv"])
    (q, k), = seen
    assert q.data_ptr() == inputs["qkv"].data_ptr() and not q.is_contiguous()
    assert k.data_ptr() == inputs["qkv"][:, :, h:].data_ptr()


def test_strided_last_dim_and_batch_major_views(device):
    # q as a transposed (B, H, T, D) buffer seen as (B, T, H, D); k with a strided last dim
    # (copied on purpose).
    generator = torch.Generator().manual_seed(4)
    inputs = dict(q=torch.randn(2, 3, 5, 8, generator=generator).to(device),
                  k=torch.randn(2, 5, 1, 16, generator=generator).to(device))
    cos, sin = (x.to(device) for x in rotary_cache(8, 5))

    def strided(fn):
        return lambda q, k: fn(q.transpose(1, 2), k[..., ::2], cos, sin)

    assert_parity(strided(_kernel), strided(reference.apply_rotary), inputs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_position_outside_table_gives_nan_not_a_bad_read(backend, device):
    qk = _qk(1, 3, 1, 1, 4, torch.float32, device)
    cos, sin = (x.to(device) for x in rotary_cache(4, 8))
    q, k = apply_rotary(qk["q"], qk["k"], cos, sin, positions=torch.tensor([0, 8, -1], device=device), backend=backend)
    assert torch.isfinite(q[:, 0]).all() and torch.isnan(q[:, 1:]).all() and torch.isnan(k[:, 1:]).all()


def test_interleaved_is_complex_multiplication():
    # The original RoPE: pairs (x[2i], x[2i+1]) as complex numbers times exp(i * angle).
    cos, sin = rotary_cache(8, 6, theta=50.0)
    qk = _qk(1, 6, 2, 1, 8, torch.float64, "cpu")
    q, _ = reference.apply_rotary(qk["q"], qk["k"], cos, sin, interleaved=True)
    turned = torch.view_as_complex(qk["q"].reshape(1, 6, 2, 4, 2).contiguous()) * torch.polar(
        torch.ones_like(cos, dtype=torch.float64), torch.atan2(sin.double(), cos.double()))[None, :, None]
    torch.testing.assert_close(q, torch.view_as_real(turned).flatten(-2))


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_matches_transformers_llama(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, max_len, theta = 16, 256, 500000.0
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, rope_parameters=rope)
    embedding = LlamaRotaryEmbedding(config)
    cos, sin = rotary_cache(head_dim, max_len, theta, scaling)
    # Frequencies: the angle at position 1 (all below pi here, so atan2 recovers it).
    torch.testing.assert_close(torch.atan2(sin[1].double(), cos[1].double()).float(), embedding.inv_freq,
                               rtol=1e-6, atol=0.0)
    if scaling is not None:  # the scaling really moved the low frequencies
        plain_cos, _ = rotary_cache(head_dim, max_len, theta)
        assert not torch.allclose(plain_cos, cos)
    position_ids = torch.arange(max_len)[None]
    hf_cos, hf_sin = embedding(torch.zeros(1, dtype=torch.float32), position_ids)
    # transformers computes the angles in fp32 (position * frequency), so allow its rounding.
    torch.testing.assert_close(torch.cat([cos, cos], -1)[None], hf_cos, atol=max_len * 2e-7, rtol=0)
    torch.testing.assert_close(torch.cat([sin, sin], -1)[None], hf_sin, atol=max_len * 2e-7, rtol=0)
    qk = _qk(1, max_len, 4, 2, head_dim, torch.float32, "cpu")
    hf_q, hf_k = apply_rotary_pos_emb(qk["q"], qk["k"], hf_cos, hf_sin, unsqueeze_dim=2)
    q, k = _kernel(qk["q"], qk["k"], cos, sin)
    torch.testing.assert_close(q, hf_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k, hf_k, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager(device):
    cos, sin = (x.to(device) for x in rotary_cache(8, 16))
    positions = torch.arange(3, 9, device=device)

    def attention_inputs(q, k, backend="triton"):
        q, k = apply_rotary(q, k, cos, sin, positions=positions, backend=backend)
        return q * k.sum(2, keepdim=True)

    compiled = torch.compile(attention_inputs, fullgraph=True)
    assert_parity(compiled, lambda **kw: attention_inputs(**kw, backend="torch"),
                  _qk(2, 6, 2, 1, 8, torch.float32, device))


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_bf16_parity_gpu(interleaved):
    cos, sin = rotary_cache(128, 300, 500000.0, LLAMA3, device="cuda")
    assert_parity(_rotary(_kernel, cos, sin, interleaved=interleaved),
                  _rotary(reference.apply_rotary, cos, sin, interleaved=interleaved),
                  _qk(2, 257, 8, 2, 128, torch.bfloat16, "cuda"))


# ------------------------------------------------------------------ bad input


def _good():
    cos, sin = rotary_cache(8, 10)
    return torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8), cos, sin


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda q, k, c, s: (q[0], k, c, s, {}), ValueError, r"q must have 4 dimensions \(B, T, H, D\)"),
        (lambda q, k, c, s: (q, k[:, :4], c, s, {}), ValueError, r"k must have shape \(B, T, H_kv, D\) = \(2, 5, H_kv, 8\)"),
        (lambda q, k, c, s: (q.long(), k, c, s, {}), TypeError, "q must be float32"),
        (lambda q, k, c, s: (q[..., :7], k[..., :7], c, s, {}), ValueError, "D must be even"),
        (lambda q, k, c, s: (q, k, c[:, :3], s, {}), ValueError, r"cos must have shape \(max_len, D/2\)"),
        (lambda q, k, c, s: (q, k, c, s[:4], {}), ValueError, "sin must have cos's shape"),
        (lambda q, k, c, s: (q, k, c, s, dict(positions=torch.arange(5.0))), TypeError, "positions must be int32 or int64"),
        (lambda q, k, c, s: (q, k, c, s, dict(positions=torch.arange(4))), ValueError, r"positions must have shape \(T,\)"),
        (lambda q, k, c, s: (q, k, c, s, dict(positions=[0, 1, 2, 3, 4])), TypeError, "positions must be a torch.Tensor"),
        (lambda q, k, c, s: (q, k, c, s, dict(interleaved="no")), TypeError, "interleaved must be a bool"),
        (lambda q, k, c, s: (q, k, c.to("meta"), s, {}), ValueError, "one device"),
        (lambda q, k, c, s: (q, k, c, s, dict(backend="cuda")), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(change, error, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel launched before the input was rejected")

    monkeypatch.setattr(rotary_module, "rotary_forward", no_kernel)
    q, k, cos, sin, options = change(*_good())
    with pytest.raises(error, match=words):
        apply_rotary(q, k, cos, sin, **options)


@pytest.mark.parametrize(
    "args, scaling, error, words",
    [
        ((7, 10), None, ValueError, "head_dim must be even"),
        ((0, 10), None, ValueError, "head_dim must be an int >= 2"),
        ((8, 0), None, ValueError, "max_len must be an int >= 1"),
        ((8, 10, 1.0), None, ValueError, "theta must be a finite real number > 1"),
        ((8, 10), dict(rope_type="yarn", factor=4.0), ValueError, "rope_type must be 'default' or 'llama3'"),
        ((8, 10), dict(rope_type="llama3", factor=8.0), ValueError, "needs .*low_freq_factor"),
        ((8, 10), {**LLAMA3, "factor": -1.0}, ValueError, r"scaling\['factor'\] must be"),
        ((8, 10), {**LLAMA3, "low_freq_factor": 4.0}, ValueError, "low_freq_factor < high_freq_factor"),
    ],
)
def test_rotary_cache_bad_input(args, scaling, error, words):
    with pytest.raises(error, match=words):
        rotary_cache(*args, scaling=scaling)


def test_rotary_cache_is_fp32_and_exact_at_long_positions():
    cos, sin = rotary_cache(4, 1 << 17, theta=10000.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (1 << 17, 2)
    last = (1 << 17) - 1
    assert cos[last, 0].item() == pytest.approx(math.cos(last), abs=1e-7)
