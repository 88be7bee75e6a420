"""GPT-2 weights in and out of Hugging Face's format, against ``transformers`` itself (no
network: every checkpoint is a random small model written to a temporary directory)."""

import json
import re
import sys

import pytest
import torch

from fusedgpt.model import GPT, GPTConfig, hf

transformers = pytest.importorskip("transformers")

V, T = 101, 37


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel saved with save_pretrained; its logits and loss on ``IDX``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and LayerNorm affines, so their mapping is checked too
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    directory = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(directory)
    return directory, model


IDX = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def hf_logits_and_loss(model):
    with torch.no_grad():
        out = model(IDX, labels=IDX)  # Hugging Face shifts the labels itself
    return out.logits, out.loss


def ours_logits_and_loss(model: GPT):
    targets = torch.cat([IDX[:, 1:], torch.full((IDX.shape[0], 1), -100)], dim=1)
    with torch.no_grad():
        return model(IDX), model(IDX, targets)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_load_matches_transformers(hf_dir, backend):
    directory, reference = hf_dir
    model = GPT.from_pretrained(directory, backend=backend)
    assert not model.training and model.config.backend == backend
    logits, loss = ours_logits_and_loss(model)
    expected_logits, expected_loss = hf_logits_and_loss(reference)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-6)


def test_round_trip_back_to_transformers(hf_dir, tmp_path):
    directory, reference = hf_dir
    GPT.from_pretrained(directory, pad_vocab_multiple=64).save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits_and_loss(back)[0], hf_logits_and_loss(reference)[0], atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == V


def test_export_of_a_model_without_biases_or_tying(tmp_path):
    """Zero biases stand in for absent ones and an untied head is written: same logits."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, context_length=64, n_layer=2, n_head=4, n_embd=64,
                       bias=False, tie_weights=False, pad_vocab_multiple=64, backend="torch")
    model = GPT(config).eval()
    model.save_pretrained(tmp_path)
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits_and_loss(exported)[0], ours_logits_and_loss(model)[0], atol=1e-4, rtol=0)
    reloaded = GPT.from_pretrained(tmp_path, backend="torch")
    assert not reloaded.config.tie_weights
    torch.testing.assert_close(ours_logits_and_loss(reloaded)[0], ours_logits_and_loss(model)[0])


def test_legacy_pytorch_model_bin(hf_dir, tmp_path):
    """The Hub's original layout: no ``transformer.`` prefix, attention-mask buffers, a pickle."""
    directory, reference = hf_dir
    state = {name.removeprefix("transformer."): t for name, t in reference.state_dict().items() if name != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    logits, _ = ours_logits_and_loss(GPT.from_pretrained(tmp_path, backend="torch"))
    torch.testing.assert_close(logits, hf_logits_and_loss(reference)[0], atol=1e-4, rtol=0)


def test_unsupported_config_is_refused(hf_dir, tmp_path):
    directory, _ = hf_dir
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(GPTConfig(vocab_size=V), torch.float32)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"),
         r"model.safetensors is not a readable safetensors file"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
         r"model.safetensors is not a readable safetensors file"),
        (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items()
                                                               if k != "vocab_size"})),
         r"config.json: missing key 'vocab_size'"),
        (lambda d: (d / "config.json").write_text("{not json"), r"config.json is not valid JSON"),
        (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"garbage")),
         r"pytorch_model.bin cannot be read as PyTorch weights"),
    ],
    ids=["garbage-weights", "truncated-weights", "config-without-vocab-size", "config-not-json", "garbage-pickle"],
)
def test_damaged_files_are_value_errors_naming_the_file(tmp_path, damage, message):
    GPT(GPTConfig(vocab_size=V, context_length=16, n_layer=1, n_head=2, n_embd=16, backend="torch")).save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        GPT.from_pretrained(tmp_path)


def test_by_name_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match="hf download openai-community/gpt2 .* --local-dir gpt2"):
        GPT.from_pretrained("gpt2")


def test_by_name_through_huggingface_hub(hf_dir, monkeypatch):
    """The name goes to snapshot_download (replaced here: tests never touch the network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    directory, _ = hf_dir
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert GPT.from_pretrained("gpt2-medium").config.vocab_size == V
    assert calls == ["openai-community/gpt2-medium"]

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not fetch 'gpt2'.*no network.*put its config.json"):
        GPT.from_pretrained("gpt2")
