"""The Llama family (Llama 3, Qwen3) against ``transformers`` itself: random small models
built here and saved to temporary directories (no network). Tiny shapes, because the
"triton" backend runs the kernels through the interpreter."""

import json

import pytest
import torch

from fusedgpt.model import KVCache, Llama, LlamaConfig, from_pretrained, hf_llama
from fusedgpt.model.generate import generate

transformers = pytest.importorskip("transformers")

V, T = 97, 11
IDX = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)


def _randomise_norms(model) -> None:
    """Norm weights away from 1, so that their mapping is checked too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)


def _save(model, tmp_path_factory, name):
    _randomise_norms(model)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return directory, model.eval()


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    """LlamaForCausalLM: GQA 2:1, Llama 3 rope scaling (active within 64 positions), untied head."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_theta=500.0, **LLAMA3_SCALING), bos_token_id=0, eos_token_id=1)
    return _save(transformers.LlamaForCausalLM(config), tmp_path_factory, "hf-llama")


@pytest.fixture(scope="module")
def hf_qwen3_dir(tmp_path_factory):
    """Qwen3ForCausalLM: q/k norm, head_dim * heads != hidden, tied head."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters=dict(rope_theta=10000.0, rope_type="default"),
        bos_token_id=0, eos_token_id=1)
    return _save(transformers.Qwen3ForCausalLM(config), tmp_path_factory, "hf-qwen3")


@pytest.fixture(params=["llama", "qwen3"])
def hf_dir(request):
    return request.getfixturevalue(f"hf_{request.param}_dir")


def _shifted(idx):
    return torch.cat([idx[:, 1:], torch.full((idx.shape[0], 1), -100)], dim=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_and_loss_match_transformers(hf_dir, backend):
    directory, reference = hf_dir
    model = from_pretrained(directory, backend=backend)
    assert isinstance(model, Llama) and not model.training and model.config.backend == backend
    with torch.no_grad():
        logits, loss = model(IDX), model(IDX, _shifted(IDX))
        expected = reference(IDX, labels=IDX)  # transformers shifts the labels itself
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-6)


def test_config_read_from_both_layouts(hf_llama_dir, hf_qwen3_dir):
    llama = from_pretrained(hf_llama_dir[0]).config
    assert (llama.n_head, llama.n_kv_head, llama.head_dim, llama.qk_norm, llama.tie_weights) == (4, 2, 8, False, False)
    assert llama.rope_theta == 500.0 and llama.rope_scaling == LLAMA3_SCALING
    qwen = from_pretrained(hf_qwen3_dir[0]).config
    assert (qwen.head_dim, qwen.qk_norm, qwen.tie_weights, qwen.rope_scaling) == (16, True, True, None)
    # The Hub checkpoints' layout: top-level rope_theta and rope_scaling ("type" in older files).
    hub = json.loads((hf_llama_dir[0] / "config.json").read_text())
    hub.pop("rope_parameters")
    hub.update(rope_theta=500000.0, rope_scaling={**LLAMA3_SCALING, "rope_type": None, "type": "llama3"},
               torch_dtype="bfloat16")
    hub["rope_scaling"].pop("rope_type")
    config = hf_llama.config_from_hf(hub)
    assert config.rope_theta == 500000.0 and config.rope_scaling == LLAMA3_SCALING


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type 'yarn'"),
    ("attention_bias", True, "attention_bias=True"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types"),
    ("model_type", "mistral", "model_type='mistral'"),
])
def test_unsupported_config_fields_are_named(hf_llama_dir, field, value, message):
    hf_config = json.loads((hf_llama_dir[0] / "config.json").read_text())
    hf_config[field] = value
    with pytest.raises(ValueError, match=message):
        hf_llama.config_from_hf(hf_config)


def test_weights_that_do_not_fit_the_config_are_refused(hf_llama_dir, tmp_path):
    directory = tmp_path / "wrong-vocab"
    directory.mkdir()
    hf_config = json.loads((hf_llama_dir[0] / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf_config, "vocab_size": V + 3}))
    (directory / "model.safetensors").write_bytes((hf_llama_dir[0] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not belong together"):
        from_pretrained(directory)


@pytest.mark.parametrize("shard_bytes", [2**30, 20_000])
def test_save_pretrained_back_to_transformers(hf_dir, tmp_path, shard_bytes):
    directory, reference = hf_dir
    model = from_pretrained(directory, backend="torch")
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded == (shard_bytes < 2**30) and sharded != (tmp_path / "model.safetensors").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(reference)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDX).logits, reference(IDX).logits, atol=1e-5, rtol=0)
    again = from_pretrained(tmp_path, backend="torch")
    assert again.config == model.config


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cached_greedy_generation_matches_transformers(hf_dir, backend):
    directory, reference = hf_dir
    model = from_pretrained(directory, backend=backend)
    prompt = IDX[:, :5]
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(generate(model, prompt, 6, temperature=0), expected)
    if backend == "torch":  # the uncached path reruns every prefix: slow in the interpreter
        assert torch.equal(generate(model, prompt, 6, temperature=0, use_cache=False), expected)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_tiny_presets_tie_the_head_and_cache_only_kv_heads(preset):
    config = LlamaConfig.from_preset(preset, backend="torch", vocab_size=V, context_length=32)
    model = Llama(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cache = KVCache(32)
    with torch.no_grad():
        model(IDX[:, :6], cache=cache)
    assert cache._keys[0].shape == (2, config.n_kv_head, 32, config.head_dim) and config.n_kv_head < config.n_head


@pytest.mark.parametrize("preset, total, non_embedding", [
    ("llama3.2-1b", 1_235_814_400, None),
    ("llama3.2-3b", 3_212_749_824, None),
    ("llama3.1-8b", 8_030_261_248, None),
    # The Qwen3 model cards give non-embedding counts to the digits written: 0.44B, 1.4B.
    ("qwen3-0.6b", None, "0.44"),
    ("qwen3-1.7b", None, "1.4"),
])
def test_published_presets_have_their_parameter_counts(preset, total, non_embedding):
    with torch.device("meta"):  # the shapes without the memory
        model = Llama(LlamaConfig.from_preset(preset))
    if total is not None:
        assert model.num_parameters() == total
    else:
        digits = len(non_embedding.split(".")[1])
        assert f"{model.num_parameters(non_embedding=True) / 1e9:.{digits}f}" == non_embedding


# --------------------------------------------------------------------------- tokenizers
# Small byte-level BPEs trained here, written as a model directory's files, read back, and
# compared with Hugging Face's own ``tokenizers`` reading the same tokenizer.json.

TEXTS = [
    "Hello world! It's 2024: we'll see 123456789 apples, don't you think?\n\n  Indented\tline\r\nend",
    "Ünïcödé — naïve café, 東京, emoji 🙂 and <|eot_id|> inside text",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "",
]


@pytest.fixture(scope="module")
def small_bpe():
    from fusedgpt.model.tokenizer import LLAMA3_PATTERN, shakespeare_path, train_bpe

    text = shakespeare_path().read_text()[:60_000] + " ".join(TEXTS[:2])
    return train_bpe(text, 600, special_tokens=(), pattern=LLAMA3_PATTERN)


def _tokenizer_json(bpe, added, *, normalizer=None, merges_as_pairs=False, gpt2_split=False):
    from fusedgpt.model.tokenizer import _byte_decoder

    to_char = {b: c for c, b in _byte_decoder().items()}
    text = lambda token: "".join(to_char[b] for b in token)  # noqa: E731
    merges = [(text(a), text(b)) for a, b in bpe.merges]
    return {
        "version": "1.0",
        "added_tokens": [dict(id=token_id, content=token, special=True, single_word=False, lstrip=False,
                              rstrip=False, normalized=False) for token, token_id in added.items()],
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        if gpt2_split else {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": bpe.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {text(token): rank for token, rank in bpe.ranks.items()},
                  "merges": [list(m) for m in merges] if merges_as_pairs else [" ".join(m) for m in merges]},
    }


@pytest.mark.parametrize("normalizer, merges_as_pairs, gpt2_split", [
    (None, False, False),  # Llama 3's layout: a Split regex, then ByteLevel
    ({"type": "NFC"}, True, False),  # Qwen's: NFC, merges as pairs (newer tokenizers)
    (None, False, True),  # GPT-2's: ByteLevel with its own regex
])
def test_tokenizer_json_encodes_as_hugging_face_does(small_bpe, tmp_path, normalizer, merges_as_pairs, gpt2_split):
    from tokenizers import Tokenizer

    from fusedgpt.model.tokenizer import get_tokenizer

    names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    added = {name: small_bpe.n_vocab + i for i, name in enumerate(names)}
    spec = _tokenizer_json(small_bpe, added, normalizer=normalizer, merges_as_pairs=merges_as_pairs,
                           gpt2_split=gpt2_split)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours, theirs = get_tokenizer(tmp_path), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text, allowed_special="all")
        assert ids == theirs.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text
    assert ours.encode("<|eot_id|>", allowed_special="all") == [added["<|eot_id|>"]]
    assert len(ours.encode(TEXTS[0])) < 0.7 * len(TEXTS[0].encode())  # the merges are used


def test_tokenizer_model_ranks_with_llama3_special_tokens(small_bpe, tmp_path):
    from fusedgpt.model.tokenizer import get_tokenizer, save_bpe

    save_bpe(small_bpe, tmp_path / "tokenizer.model").with_name("tokenizer.model.json").unlink()
    tokenizer = get_tokenizer(tmp_path)
    n = len(small_bpe.ranks)
    assert tokenizer.n_vocab == n + 256
    special = tokenizer._special_tokens
    assert (special["<|begin_of_text|>"], special["<|eot_id|>"], special["<|reserved_special_token_246|>"]) == (
        n, n + 9, n + 255)
    for text in TEXTS:
        assert tokenizer.encode(text, disallowed_special=()) == small_bpe.encoding().encode(text)
    # A tokenizer_config.json's added tokens win over the built-in list.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(n): {"content": "<s>"}, str(n + 1): {"content": "</s>"}}}))
    assert get_tokenizer(tmp_path)._special_tokens == {"<s>": n, "</s>": n + 1}


def test_unsupported_tokenizer_files_are_named(small_bpe, tmp_path):
    from fusedgpt.model.tokenizer import TokenizerFileError, get_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0f\n\x05<unk>\x15\x00\x00\x00\x00")  # SentencePiece protobuf
    with pytest.raises(TokenizerFileError, match="SentencePiece"):
        get_tokenizer(tmp_path)
    spec = _tokenizer_json(small_bpe, {})
    spec["model"]["merges"][3:5] = spec["model"]["merges"][4:2:-1]  # two merges swapped
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerFileError, match=r"merges\[4\].*not in merge order"):
        get_tokenizer(tmp_path)
    spec = _tokenizer_json(small_bpe, {}, normalizer={"type": "Lowercase"})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerFileError, match="normalizer 'Lowercase' is not supported"):
        get_tokenizer(tmp_path)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliding_window_matches_transformers(tmp_path_factory, backend):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        max_window_layers=0, bos_token_id=0, eos_token_id=1)
    directory, reference = _save(transformers.Qwen3ForCausalLM(config), tmp_path_factory, "hf-qwen3-window")
    model = from_pretrained(directory, backend=backend)
    assert model.config.sliding_window == 4 and model.config.n_kv_head == 1
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), reference(IDX).logits, atol=1e-4, rtol=0)
        # The window matters here: without it the logits differ.
        unwindowed = from_pretrained(directory, backend="torch", sliding_window=None)
        assert (unwindowed(IDX) - reference(IDX).logits).abs().max() > 1e-2
    prompt = IDX[:, :3]
    expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  attention_mask=torch.ones_like(prompt))
    assert torch.equal(generate(model, prompt, 6, temperature=0), expected)


# --------------------------------------------------------------------------- training and the commands


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from fusedgpt.model.tokenizer import shakespeare_path

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(shakespeare_path().read_text()[:20_000])
    return path


def _train_argv(preset, corpus_file, out, steps):
    return ["train", "--preset", preset, "--n-embd", "32", "--n-head", "2", "--data", str(corpus_file),
            "--val-fraction", "0.05", "--out", str(out), "--max-steps", str(steps), "--batch-size", "2",
            "--context-length", "16", "--eval-every", "1000", "--eval-batches", "1", "--sample-tokens", "3",
            "--lr", "0.01", "--warmup-steps", "2", "--save-every", "4", "--seed", "7", "--backend", "torch",
            "--no-progress"]


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_train_resume_and_generate_commands(preset, corpus_file, tmp_path, capsys, monkeypatch):
    """``fusedgpt train --preset llama-tiny``: the loss falls; a run stopped at a checkpoint and
    resumed is bitwise the straight run; ``fusedgpt generate`` continues from the checkpoint."""
    import signal

    from safetensors.torch import load_file

    from fusedgpt.cli import main
    from fusedgpt.io import checkpoint as ckpt
    from fusedgpt.train.trainer import Trainer

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]

    straight = tmp_path / "straight"
    assert main(_train_argv(preset, corpus_file, straight, 8)) == 0
    assert "sample:" in capsys.readouterr().out
    curve = losses(straight)
    assert len(curve) == 8 and sum(curve[-2:]) / 2 < curve[0] - 0.3, curve

    real_step = Trainer.train_step

    def interrupted_after_four(self, step):  # a real Ctrl-C in the middle of step 4
        result = real_step(self, step)
        if step + 1 == 4:
            signal.raise_signal(signal.SIGINT)
        return result

    split = tmp_path / "split"
    monkeypatch.setattr(Trainer, "train_step", interrupted_after_four)
    main(_train_argv(preset, corpus_file, split, 8))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert ckpt.latest_checkpoint(split).name == "ckpt_00000004"
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0
    assert losses(split) == curve  # bitwise
    final, resumed = (load_file(d / "ckpt_00000008" / "model.safetensors") for d in (straight, split))
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(straight), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--temperature", "0", "--backend", "torch"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:\n")


def test_resume_refuses_another_family(corpus_file, tmp_path, capsys):
    from fusedgpt.cli import main

    out = tmp_path / "run"
    assert main(_train_argv("llama-tiny", corpus_file, out, 1)) == 0
    argv = ["train", "--out", str(out), "--resume", "--max-steps", "2", "--preset", "tiny", "--no-progress"]
    assert main(argv) == 2
    assert "a LlamaConfig model, but the configuration asks for a GPTConfig" in capsys.readouterr().err


# --------------------------------------------------------------------------- packed sequences


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_sequences_equal_running_each_alone(backend):
    """Sequences packed into one row (cu_seqlens) give each sequence's own logits, loss and
    gradients: nothing attends across a boundary and positions restart at every sequence."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, context_length=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                         intermediate_size=48, qk_norm=True, tie_weights=False, backend=backend)
    model = Llama(config)
    lengths = [5, 1, 9, 4]
    sequences = [torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    targets = [torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(100 + n)) for n in lengths]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    packed_logits = model(torch.cat(sequences, 1), cu_seqlens=cu_seqlens)
    alone_logits = torch.cat([model(s) for s in sequences], 1)
    torch.testing.assert_close(packed_logits, alone_logits, atol=1e-5, rtol=0)

    packed_loss = model(torch.cat(sequences, 1), torch.cat(targets, 1), cu_seqlens=cu_seqlens)
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()))
    alone_loss = sum(model(s, t) * t.numel() for s, t in zip(sequences, targets)) / sum(lengths)
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()))
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-6, rtol=1e-6)
    for packed, alone in zip(packed_grads, alone_grads):
        torch.testing.assert_close(packed, alone, atol=1e-6, rtol=1e-5)


def test_packed_sequences_bad_offsets_are_refused():
    model = Llama(LlamaConfig(vocab_size=V, context_length=32, n_layer=1, backend="torch"))
    idx = torch.randint(0, V, (1, 6))
    for cu_seqlens, error, message in [
        (torch.tensor([0, 6]), TypeError, "int32"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), ValueError, "rising from 0 to total"),
        (torch.tensor([0, 3, 3, 6], dtype=torch.int32), ValueError, "no empty sequence"),
    ]:
        with pytest.raises(error, match=message):
            model(idx, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="KV cache"):
        model(idx, cache=KVCache(32), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))


def test_packed_instruction_batch_has_the_padded_batch_loss():
    from fusedgpt.model.tokenizer import get_tokenizer
    from fusedgpt.train.finetune_data import Instruction
    from fusedgpt.train.finetune_instruct import IGNORE_INDEX, TEMPLATES, collate, encode_instructions, pack

    tokenizer = get_tokenizer("gpt2")
    examples = [Instruction("Name the play.", f"line {i}" * (i % 3), "comedy " * (1 + 2 * i)) for i in range(5)]
    batch, _ = encode_instructions(examples, tokenizer, TEMPLATES["alpaca"], 128)
    model = Llama(LlamaConfig.from_preset("llama-tiny", backend="torch"))
    for mask_prompt in (False, True):
        inputs, targets, cu_seqlens = pack(batch, mask_prompt)
        padded_inputs, padded_targets = collate(batch, tokenizer.eot_token, mask_prompt)
        assert inputs.shape == (1, sum(len(e.tokens) - 1 for e in batch))
        assert inputs.numel() < padded_inputs.numel()  # the padding is gone
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens[-1] == inputs.shape[1]
        kept = padded_targets[padded_targets != IGNORE_INDEX]
        assert torch.equal(targets[targets != IGNORE_INDEX], kept)  # same targets, padding left out
        with torch.no_grad():
            torch.testing.assert_close(model(inputs, targets, cu_seqlens=cu_seqlens),
                                       model(padded_inputs, padded_targets), atol=1e-5, rtol=1e-5)


def test_packing_benchmark_counts_the_same_tokens_in_fewer_positions():
    import argparse

    from bench.packing import measure, report

    args = argparse.Namespace(preset="llama-tiny", batch_size=4, batches=1, backend="torch")
    totals = measure(args)
    padded, packed = totals["padded"], totals["packed"]
    assert packed["tokens"] == padded["tokens"] == packed["positions"] < padded["positions"]
    assert all(t["seconds"] > 0 and t["saved"] > 0 for t in totals.values())
    assert "packed / padded: tokens/s x" in report(totals, args)


@pytest.fixture(scope="module")
def prepared_corpus(corpus_file, tmp_path_factory):
    from fusedgpt.train.data import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([corpus_file], out, val_fraction=0.05, progress=False)
    return out


@pytest.mark.parametrize("preset, sharding", [("llama-tiny", []), ("qwen3-tiny", ["--fsdp"])], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_double_accumulation(preset, sharding, prepared_corpus, tmp_path):
    """torchrun with gloo on CPU, as GPT-2's test in tests/train/test_distributed.py."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fusedgpt.train.trainer import TrainConfig, Trainer

    steps, out = 3, tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fusedgpt",
               "train", "--preset", preset, "--n-embd", "32", "--n-head", "2", "--data", str(prepared_corpus),
               "--out", str(out), "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "1",
               "--context-length", "16", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "1000",
               "--eval-batches", "1", "--sample-tokens", "0", "--seed", "7", "--device", "cpu", "--backend", "torch",
               "--no-progress", *sharding]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = Trainer(TrainConfig(preset=preset, model={"n_embd": 32, "n_head": 2}, data=str(prepared_corpus),
                                 out=str(tmp_path / "single"), max_steps=steps, batch_size=2, grad_accum=2,
                                 context_length=16, lr=3e-3, warmup_steps=2, eval_every=1000, eval_batches=1,
                                 sample_tokens=0, seed=7, backend="torch", progress=False)).run()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    distributed_losses = [r["train_loss"] for r in lines if "train_loss" in r]
    torch.testing.assert_close(torch.tensor(distributed_losses), torch.tensor(single.train_losses), rtol=1e-5, atol=1e-5)
    weights, single_weights = (load_file(d / f"ckpt_{steps:08d}" / "model.safetensors") for d in (out, tmp_path / "single"))
    for name, value in single_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_generate_command_on_a_hugging_face_directory_uses_its_tokenizer(small_bpe, tmp_path, capsys):
    """``fusedgpt generate --checkpoint DIR`` on a Llama directory with its own tokenizer.json:
    the greedy continuation is transformers' (decoded by the same tokenizer)."""
    from fusedgpt.cli import main
    from fusedgpt.model.tokenizer import get_tokenizer

    added = {"<|begin_of_text|>": small_bpe.n_vocab, "<|eot_id|>": small_bpe.n_vocab + 1}
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=small_bpe.n_vocab + len(added), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(small_bpe, added)))

    prompt = "To be, or not"
    tokenizer = get_tokenizer(tmp_path)
    idx = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = reference.generate(idx, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                                      attention_mask=torch.ones_like(idx))
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "5",
                 "--temperature", "0", "--backend", "torch"]) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(expected[0, idx.shape[1]:].tolist()) + "\n"
