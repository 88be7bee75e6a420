import math

import pytest
import torch
from torch.func import functional_call

from fusedgpt.kernels import reference
from fusedgpt.model import GPT, PRESETS, GPTConfig, KVCache
from tests.kernels.parity import assert_parity

V, T = 101, 37  # vocabulary and length that are no block multiple


def small_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=V, context_length=64, n_layer=2, n_head=4, n_embd=64), **overrides})


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def shifted_targets(idx: torch.Tensor) -> torch.Tensor:
    """Next-token targets, with the last position and a few others ignored (-100)."""
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    targets[0, 3:6] = -100
    return targets


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "name, total, non_embedding",
    # Hugging Face's GPT2LMHeadModel.num_parameters() for the released sizes.
    [("gpt2", 124_439_808, 85_056_000), ("gpt2-medium", 354_823_168, 302_311_424),
     ("gpt2-large", 774_030_080, 708_390_400), ("gpt2-xl", 1_557_611_200, 1_475_561_600)],
)
def test_gpt2_presets_have_gpt2_parameter_counts(name, total, non_embedding):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
    assert model.num_parameters() == total
    assert model.num_parameters(non_embedding=True) == non_embedding


def test_cpu_presets_are_small():
    for name, limit in (("tiny", 1_000_000), ("small", 10_000_000)):
        config = GPTConfig.from_preset(name)
        with torch.device("meta"):
            assert GPT(config).num_parameters(non_embedding=True) < limit
        assert config.context_length <= 256


def test_config_round_trip_and_overrides():
    config = GPTConfig.from_preset("small", vocab_size=4096, pad_vocab_multiple=64, backend="torch")
    assert (config.n_layer, config.vocab_size, config.padded_vocab_size) == (PRESETS["small"]["n_layer"], 4096, 4096)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert GPTConfig(pad_vocab_multiple=64).padded_vocab_size == 50304


@pytest.mark.parametrize(
    "bad", [dict(n_embd=100, n_head=3), dict(n_layer=0), dict(dropout=1.0), dict(backend="cuda"),
            dict(vocab_size=2.5), dict(bias="yes")],
    ids=str,
)
def test_config_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        GPTConfig(**bad)


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="block_size"):
        GPTConfig.from_dict({"block_size": 128})


def test_gpt2_initialisation():
    config = small_config(n_layer=8, n_embd=256)
    model = GPT(config)
    params = dict(model.named_parameters())
    assert params["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    for name in ("transformer.h.3.attn.c_proj.weight", "transformer.h.7.mlp.c_proj.weight"):
        assert params[name].std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05)
    assert torch.all(params["transformer.h.0.mlp.c_fc.bias"] == 0)
    assert torch.all(params["transformer.ln_f.weight"] == 1)
    assert model.lm_head.weight is model.transformer.wte.weight


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "variant", [dict(pad_vocab_multiple=64), dict(bias=False, tie_weights=False)], ids=["padded-tied", "nobias-untied"]
)
def test_model_parity_triton_vs_torch(variant):
    """The model on the kernels (interpreter) against itself on the references in float64:
    logits, loss and the gradient of every parameter."""
    torch.manual_seed(0)
    fused = GPT(small_config(backend="triton", **variant))
    oracle = GPT(small_config(backend="torch", **variant))
    idx = tokens(2, T)
    targets = shifted_targets(idx)

    def run(model):
        def logits_and_loss(**params):
            return functional_call(model, params, (idx,)), functional_call(model, params, (idx, targets))
        return logits_and_loss

    assert_parity(run(fused), run(oracle), dict(fused.named_parameters()))


def test_padded_vocabulary_rows_never_count():
    model = GPT(small_config(pad_vocab_multiple=64, backend="torch"))
    idx = tokens(2, T)
    before = model(idx), model(idx, shifted_targets(idx))
    with torch.no_grad():
        model.lm_head.weight[V:] = 100.0  # padded rows that would dominate if they counted
    logits, loss = model(idx), model(idx, shifted_targets(idx))
    assert logits.shape == (2, T, V)
    torch.testing.assert_close(logits, before[0])
    torch.testing.assert_close(loss, before[1])


def test_kv_cache_gives_the_same_logits():
    """Prefill, then chunks of 1 and 3 tokens through the cache (queries fewer than keys)."""
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = tokens(2, T)
    cache = KVCache(model.config.context_length)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :30], cache=cache), model(idx[:, 30:31], cache=cache), model(idx[:, 31:34], cache=cache)]
        pieces.append(model(idx[:, 34:], cache=cache, last_only=True))
    torch.testing.assert_close(torch.cat(pieces[:3], dim=1), full[:, :34], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pieces[3], full[:, -1:], atol=1e-5, rtol=1e-5)
    assert cache.length == T


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_only_in_training(backend):
    torch.manual_seed(0)
    model = GPT(small_config(dropout=0.2, backend=backend))
    plain = GPT(small_config(backend=backend))
    plain.load_state_dict(model.state_dict())
    idx = tokens(2, 9)
    targets = shifted_targets(idx)
    assert model(idx, targets).item() != model(idx, targets).item()
    torch.testing.assert_close(model.eval()(idx, targets), plain(idx, targets))


def test_autocast_bf16():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = tokens(2, 9)
    targets = shifted_targets(idx)
    reference_loss = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, targets)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(reference_loss.item(), rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend, dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_head_gradient_is_fp32_from_the_loss_accumulator(backend, dtype):
    """Under autocast the head's fp32 weight goes into the fused loss as it is: its gradient
    is fp32 from the loss's accumulator, never rounded to the autocast dtype on the way back
    (as a cast of the weight before the loss would), and matches the float64 gradient of
    the loss of the same rounded hidden and weight. (bf16 runs the torch path on a CPU;
    fp16 the kernels under the interpreter.)"""
    torch.manual_seed(0)
    model = GPT(small_config(backend=backend, tie_weights=False))
    idx = tokens(2, 9)
    targets = shifted_targets(idx)
    captured = {}
    model.transformer.ln_f.register_forward_hook(lambda module, args, out: captured.update(hidden=out[0].detach()))
    with torch.autocast("cpu", dtype=dtype):
        model(idx, targets).backward()
    grad = model.lm_head.weight.grad
    assert grad.dtype == torch.float32 and captured["hidden"].dtype == dtype
    assert (grad.to(dtype).float() != grad).any(), "the head's gradient went through the autocast dtype"

    hidden, flat_targets = captured["hidden"].reshape(-1, model.config.n_embd), targets.reshape(-1)
    oracle = model.lm_head.weight.detach().to(dtype).double().requires_grad_()
    reference.linear_cross_entropy(hidden.double(), oracle, flat_targets).backward()
    eager = model.lm_head.weight.detach().clone().requires_grad_()  # F.linear + cross-entropy, autocast
    with torch.autocast("cpu", dtype=dtype):
        reference.linear_cross_entropy(hidden, eager, flat_targets).backward()
    error = (grad.double() - oracle.grad).abs().max().item()
    eager_error = (eager.grad.double() - oracle.grad).abs().max().item()
    assert error <= 2 * eager_error + 1e-6, (error, eager_error)


def test_unpadded_head_is_not_sliced():
    """Without padding the head goes into the loss whole: no slice, so no slice_backward
    writing a copy of the (V, C) gradient."""
    model = GPT(small_config(backend="torch"))
    idx = tokens(2, 9)
    loss = model(idx, shifted_targets(idx))
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    assert not [node.name() for node in seen if node.name().startswith("Slice")]


def test_torch_compile_traces_without_graph_breaks():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = tokens(2, 9)  # short: under the interpreter the kernels' cost grows with T
    targets = shifted_targets(idx)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(idx, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(idx, targets)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for compiled_grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(compiled_grad, p.grad)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "idx, error, match",
    [
        (tokens(2, 5).float(), TypeError, "int64"),
        (tokens(2, 5).int(), TypeError, "int64"),
        (tokens(1, 5)[0], ValueError, r"\(B, T\)"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"\(B, T\)"),
        (torch.tensor([[1, 2, V]]), ValueError, "outside"),
        (torch.tensor([[1, -1, 2]]), ValueError, "outside"),
        (tokens(1, 65), ValueError, "context length"),
    ],
    ids=["float", "int32", "1d", "empty", "too-high", "negative", "too-long"],
)
def test_forward_rejects_bad_idx(idx, error, match):
    with pytest.raises(error, match=match):
        GPT(small_config(backend="torch"))(idx)


def test_forward_rejects_bad_targets_and_full_cache():
    model = GPT(small_config(backend="torch"))
    with pytest.raises(ValueError, match="targets"):
        model(tokens(2, 5), tokens(2, 4))
    with pytest.raises(TypeError, match="targets"):
        model(tokens(2, 5), tokens(2, 5).float())
    cache = KVCache(64)
    model(tokens(1, 60), cache=cache)
    with pytest.raises(ValueError, match="60 cached"):
        model(tokens(1, 5), cache=cache)
