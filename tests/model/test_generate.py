import pytest
import torch

from fusedgpt.model import GPT, GPTConfig
from fusedgpt.model.generate import filter_logits, generate, stream

V, CONTEXT = 101, 16


def small_model(backend: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, context_length=CONTEXT, n_layer=2, n_head=4, n_embd=64, backend=backend)).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    # The reference kernels: generation logic is what is tested here, and the interpreter
    # would spend minutes on these many small steps (the kernel path has its own test).
    return small_model("torch")


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_hand(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """The definition: run the whole (cropped) sequence every step, take the argmax."""
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(idx[:, -CONTEXT:])[:, -1].argmax(-1)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
    return idx


@pytest.mark.parametrize("prompt_length", [5, 20], ids=["short-prompt", "prompt-over-context"])
def test_greedy_with_and_without_cache_match_the_definition(model, prompt_length):
    # 30 new tokens run past the 16-position window: the cache must slide, the prompt crop.
    idx = prompt(3, prompt_length)
    expected = greedy_by_hand(model, idx, 30)
    with_cache = generate(model, idx, 30, temperature=0)
    without_cache = generate(model, idx, 30, temperature=0, use_cache=False)
    assert torch.equal(with_cache, expected)
    assert torch.equal(without_cache, expected)


def test_greedy_on_the_kernels_with_and_without_cache():
    fused = small_model("auto")  # the Triton kernels under the interpreter (or on CUDA)
    idx = prompt(2, 5)
    expected = greedy_by_hand(fused, idx, 4)
    assert torch.equal(generate(fused, idx, 4, temperature=0), expected)
    assert torch.equal(generate(fused, idx, 4, temperature=0, use_cache=False), expected)


def test_seeded_sampling_is_reproducible(model):
    idx = prompt(2, 4)

    def draw(seed, **kw):
        return generate(model, idx, 20, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(seed), **kw)

    first = draw(0)
    assert torch.equal(first, draw(0))
    assert torch.equal(first, draw(0, use_cache=False))
    assert not torch.equal(first, draw(1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    for top_p, kept in ((0.4, [1]), (0.75, [1, 3]), (0.85, [1, 2, 3]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])):
        filtered = filter_logits(logits, top_p=top_p)
        assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == kept, top_p
        assert torch.equal(filtered[0, kept], logits[0, kept])


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [5.0, 2.0, 2.0, 2.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.sum(dim=-1).tolist() == [2, 2]
    assert not kept[0, [0, 4]].any() and kept[1, 0]  # the ties share the places left
    assert torch.equal(filter_logits(logits, top_k=5), logits)


def test_top_k_and_top_p_limit_what_is_sampled(model):
    idx = prompt(4, 3)
    with torch.no_grad():
        logits = model(idx)[:, -1]
    allowed_k = torch.topk(logits, 3, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        token = next(stream(model, idx, 1, top_k=3, generator=generator))
        assert (allowed_k == token[:, None]).any(dim=1).all()
    allowed_p = torch.isfinite(filter_logits(logits, top_p=0.3))
    for _ in range(20):
        token = next(stream(model, idx, 1, top_p=0.3, generator=generator))
        assert allowed_p.gather(1, token[:, None]).all()


def test_end_of_sequence_per_row(model):
    idx = prompt(3, 4)
    free = generate(model, idx, 12, temperature=0)
    eos = free[0, 5].item()  # the second token row 0 produces
    new = free[:, 4:]
    hits = [(row == eos).nonzero() for row in new]
    assert len(hits[1]) == 0 or hits[1][0].item() > hits[0][0].item(), "rows must finish at different steps"

    out = generate(model, idx, 12, temperature=0, eos_id=eos)
    expected = free.clone()
    for row, hit in enumerate(hits):
        if len(hit):
            expected[row, 4 + hit[0].item() + 1 :] = eos  # padding after the row's EOS
    if all(len(hit) for hit in hits):  # every row done: generation stops there
        expected = expected[:, : 4 + max(hit[0].item() for hit in hits) + 1]
    assert torch.equal(out, expected)


def test_stops_when_every_row_is_done(model):
    idx = prompt(2, 4)
    first = generate(model, idx, 1, temperature=0)[:, -1]
    out = generate(model, torch.cat([idx[:1], idx[:1]]), 10, temperature=0, eos_id=first[0].item())
    assert out.shape == (2, 5)


def test_zero_new_tokens_and_mode_restored(model):
    idx = prompt(2, 4)
    model.train()
    try:
        assert torch.equal(generate(model, idx, 0), idx)
        generate(model, idx, 2)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(idx=prompt(2, 4).float()), TypeError, "idx"),
        (dict(idx=prompt(1, 4)[0]), ValueError, "idx"),
        (dict(idx=torch.tensor([[0, V]])), ValueError, "idx"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(eos_id=V), ValueError, "eos_id"),
        (dict(vocab_limit=V + 1), ValueError, "vocab_limit"),
        (dict(vocab_limit=0), ValueError, "vocab_limit"),
        (dict(vocab_limit=40, eos_id=40), ValueError, "eos_id"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_bad_arguments(model, change, error, match):
    args = dict(idx=prompt(2, 4), max_new_tokens=3)
    args.update(change)
    with pytest.raises(error, match=match):
        stream(model, args.pop("idx"), args.pop("max_new_tokens"), **args)


def test_a_smaller_tokenizer_gets_only_its_own_ids(model):
    """vocab_limit (a tokenizer smaller than the embedding, as Qwen3's): greedy takes the
    argmax among the allowed ids and sampling draws only allowed ids, though unrestricted
    draws from the same seed do pick ids past the limit."""
    limit, idx = 40, prompt(3, 5)

    def draw(**kw):
        return generate(model, idx, 25, temperature=2.0, generator=torch.Generator().manual_seed(0), **kw)[:, 5:]

    assert bool((draw() >= limit).any())
    assert int(draw(vocab_limit=limit).max()) < limit
    expected = idx
    with torch.no_grad():
        for _ in range(8):
            next_token = model(expected[:, -CONTEXT:])[:, -1, :limit].argmax(-1)
            expected = torch.cat([expected, next_token[:, None]], dim=1)
    assert torch.equal(generate(model, idx, 8, temperature=0, vocab_limit=limit), expected)
    assert torch.equal(generate(model, idx, 8, temperature=0, vocab_limit=V), greedy_by_hand(model, idx, 8))


def test_command_line_rejects_an_unknown_device(tmp_path, capsys):
    from fusedgpt.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, before anything loads
        main(["generate", "--checkpoint", str(tmp_path), "--device", "gpu0"])
    assert exit_info.value.code == 2
    assert "argument --device: expected auto|cpu|cuda|cuda:N, got 'gpu0'" in capsys.readouterr().err


def test_command_line_skips_a_damaged_newest_checkpoint_of_a_run(tmp_path, capsys):
    from fusedgpt.cli import main
    from fusedgpt.io.checkpoint import save_checkpoint

    config = GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=2, n_embd=16, backend="torch")
    for step in (1, 2):
        model = GPT(config)
        save_checkpoint(tmp_path, step, dict(model.named_parameters()), None, {"model": config.to_dict(), "tokenizer": "gpt2"})
    damaged = tmp_path / "ckpt_00000002" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    argv = ["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0", "--device", "cpu"]
    assert main([*argv, "--checkpoint", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping a newer checkpoint: checkpoint {damaged.parent} is damaged: model.safetensors" in err
    assert f"using {tmp_path / 'ckpt_00000001'}" in err
    assert main([*argv, "--checkpoint", str(damaged.parent)]) == 2  # named explicitly: no fallback
    assert f"error: checkpoint {damaged.parent} is damaged: model.safetensors" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_backend_rename_loads(tmp_path):
    from fusedgpt.io.checkpoint import save_checkpoint
    from fusedgpt.model.generate import load_for_generation

    config = GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=2, n_embd=16, backend="torch")
    model = GPT(config)
    legacy = {("kernels" if key == "backend" else key): value for key, value in config.to_dict().items()}
    save_checkpoint(tmp_path, 1, dict(model.named_parameters()), None, {"model": legacy, "tokenizer": "gpt2"})
    loaded, tokenizer = load_for_generation(tmp_path, backend="torch")
    assert loaded.config == config and tokenizer == "gpt2"
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["hugging-face", "training"])
def test_command_line_streams_the_greedy_continuation(kind, tmp_path, capsys):
    from fusedgpt.cli import main
    from fusedgpt.model.tokenizer import get_tokenizer
    from fusedgpt.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tokenizer = get_tokenizer("gpt2")
    config = GPTConfig(vocab_size=tokenizer.n_vocab, context_length=32, n_layer=1, n_head=2, n_embd=32, backend="torch")
    model = GPT(config).eval()
    if kind == "hugging-face":
        model.save_pretrained(tmp_path)
    else:
        save_checkpoint(tmp_path, 7, dict(model.named_parameters()), None, {"model": config.to_dict(), "tokenizer": "gpt2"})

    prompt = "Hello, wörld"
    idx = torch.tensor([tokenizer.encode(prompt)])
    new = generate(model, idx, 12, temperature=0, eos_id=tokenizer.eot_token)[0, idx.shape[1]:].tolist()
    new = new[: new.index(tokenizer.eot_token)] if tokenizer.eot_token in new else new
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0", "--backend", "torch", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(new) + "\n"
