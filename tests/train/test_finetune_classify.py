"""Classification fine-tuning: the head reads each text's last real token, what trains,
beating the majority baseline on a separable set, and a saved classifier that reloads to
the same predictions."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from fusedgpt.cli import main
from fusedgpt.model import GPT, GPTConfig
from fusedgpt.train import finetune
from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.finetune_classify import GPTClassifier, load_classifier, set_trainable
from fusedgpt.train.lora import LoRAConfig, apply_lora

VOCAB = 101


def tiny_classifier(num_classes: int = 3, backend: str = "torch") -> GPTClassifier:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, context_length=24, n_layer=2, n_head=2, n_embd=32, backend=backend)
    return GPTClassifier(GPT(config), num_classes).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_head_reads_the_last_real_token_whatever_the_padding(backend):
    model = tiny_classifier(backend=backend)
    texts = [torch.randint(0, VOCAB, (n,)) for n in (7, 1, 12)]
    with torch.no_grad():
        alone = torch.cat([model(t[None], torch.tensor([len(t)])) for t in texts])
        for pad in (0, VOCAB - 1):
            idx = torch.full((3, 12), pad)
            for row, t in enumerate(texts):
                idx[row, : len(t)] = t
            batched = model(idx, torch.tensor([len(t) for t in texts]))
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        # ...and not some other position: the text's first token gives other logits.
        first = model(texts[0][None], torch.tensor([1]))
    assert not torch.allclose(first, alone[:1], atol=1e-4)


def test_lengths_outside_the_batch_are_refused():
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.tensor([5, 0]))
    with pytest.raises(TypeError, match="lengths must be an int64 tensor"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize(
    "mode, trains",
    [("head", {"gpt.lm_head"}), ("last-k-blocks", {"gpt.lm_head", "gpt.transformer.ln_f", "gpt.transformer.h.1"}),
     ("all", None)],
)
def test_train_modes_freeze_the_rest(mode, trains):
    model = tiny_classifier()
    set_trainable(model, mode, last_k=1)
    for name, param in model.named_parameters():
        expected = trains is None or any(name.startswith(prefix + ".") for prefix in trains)
        assert param.requires_grad == expected, name


def toy_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Two separable classes, 60/40: fruit words or metal words."""
    rng = random.Random(seed)
    words = {"fruit": "apple pear plum fig grape".split(), "metal": "iron steel copper tin lead".split()}
    rows = []
    for i in range(count):
        label = "fruit" if i % 5 < 3 else "metal"
        rows.append({"text": " ".join(rng.choice(words[label]) for _ in range(rng.randint(2, 6))), "label": label})
    return rows


def test_finetune_classify_beats_the_majority_baseline_and_the_saved_classifier_agrees(tmp_path, capsys):
    fdata.write_csv(tmp_path / "train.csv", toy_rows(60, 0), ("text", "label"))
    fdata.write_jsonl(tmp_path / "test.jsonl", toy_rows(20, 1))
    out = tmp_path / "run"
    code = main(["finetune-classify", "--data", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.jsonl"),
                 "--val-fraction", "0.2", "--out", str(out), "--train", "all", "--epochs", "2", "--lr", "2e-3",
                 "--batch-size", "8", "--warmup-steps", "2", "--max-length", "4", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert results["majority_baseline"] == pytest.approx(0.6)
    assert results["test_accuracy"] >= 0.9
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
    assert sum(map(sum, results["confusion_matrix"])) == 20
    assert re.search(r"warning: \d+ of 48 train texts are longer than 4 tokens and were truncated", printed)
    assert "epoch 2: train loss" in printed and "majority-class baseline ('fruit' always) 60.0%" in printed

    classifier = load_classifier(str(out), backend="torch")
    test = toy_rows(20, 1)
    predicted = classifier.predict([r["text"] for r in test])
    accuracy = sum(p == r["label"] for p, r in zip(predicted, test)) / len(test)
    assert accuracy == pytest.approx(results["test_accuracy"])

    assert main(["classify", "--checkpoint", str(out), "apple fig pear", "iron tin"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == classifier.predict(["apple fig pear", "iron tin"])


def test_a_saved_lora_classifier_reloads_to_the_same_probabilities(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=2, n_embd=16, backend="torch"))
    lora = LoRAConfig(2, 4.0, ("attn",))
    apply_lora(gpt, lora)
    model = GPTClassifier(gpt, 2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    meta = {"task": "classify", "model": gpt.config.to_dict(), "tokenizer": "gpt2", "classes": ["no", "yes"],
            "max_length": 16, "lora": lora.to_dict()}
    finetune.save(tmp_path, 3, model, meta)
    reloaded = load_classifier(str(tmp_path), backend="torch")
    texts = ["To be, or not to be", "that is the question"]
    from fusedgpt.model.tokenizer import get_tokenizer

    tokens = [get_tokenizer("gpt2").encode_ordinary(t) for t in texts]
    with torch.no_grad():
        model.eval()
        expected = torch.cat([model(torch.tensor([t]), torch.tensor([len(t)])) for t in tokens]).softmax(-1)
    assert torch.equal(reloaded.probabilities(texts), expected)


THREE = "text,label\nx,a\ny,b\nz,a\n"


@pytest.mark.parametrize(
    "files, extra, message",
    [
        ({"train.csv": "sentence,label\nx,a\n"}, [], "no column 'text'"),
        ({"train.csv": ""}, [], "is empty: no examples"),
        ({"train.csv": THREE, "val.csv": "text,label\nw,a\n", "test.csv": "text,label\nw,c\n"},
         ["--val", "val.csv", "--test", "test.csv"], r"example 1: label 'c' is not one of the training labels \['a', 'b'\]"),
        ({"train.csv": "text,label\nx,a\ny,a\nz,a\n"}, ["--val-fraction", "0.34", "--test-fraction", "0.34"],
         "the training examples have 1 label"),
        ({"train.csv": THREE, "val.csv": THREE}, ["--val", "val.csv", "--test-fraction", "0"], "no test examples"),
        ({"train.csv": THREE}, ["--lora-rank", "2", "--train", "all"], "exclude each other"),
        ({"train.csv": THREE}, ["--merge"], "needs --lora-rank"),
        ({"train.csv": THREE}, ["--max-length", "0"], "--max-length must be a positive number of tokens, got 0"),
        ({"train.csv": "text,label\n" + "w,a\nv,b\n" * 10}, ["--max-length", "129"],
         r"--max-length must be in \[1, 128\] \(the model's context length\), got 129"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, capsys, files, extra, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    extra = [str(tmp_path / a) if a.endswith(".csv") else a for a in extra]
    code = main(["finetune-classify", "--data", str(tmp_path / "train.csv"), "--out", str(tmp_path / "run"), *extra,
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedgpt finetune-classify: error:")
    assert re.search(message, err), err


def test_classify_refuses_a_checkpoint_that_is_not_a_classifier(tmp_path, capsys):
    gpt = GPT(GPTConfig(vocab_size=VOCAB, context_length=8, n_layer=1, n_head=1, n_embd=8, backend="torch"))
    finetune.save(tmp_path, 1, gpt, {"task": "instruct", "model": gpt.config.to_dict(), "tokenizer": "gpt2"})
    assert main(["classify", "--checkpoint", str(tmp_path), "some text"]) == 2
    assert "is a fine-tuning checkpoint of task 'instruct', not of task 'classify'" in capsys.readouterr().err


def test_finetuning_starts_from_a_gpt2_directory(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=2, n_embd=16)).save_pretrained(tmp_path / "base")
    fdata.write_csv(tmp_path / "train.csv", toy_rows(30, 0), ("text", "label"))
    out = tmp_path / "run"
    code = main(["finetune-classify", "--checkpoint", str(tmp_path / "base"), "--data", str(tmp_path / "train.csv"),
                 "--val-fraction", "0.2", "--test-fraction", "0.2", "--out", str(out), "--epochs", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"start: {tmp_path / 'base'}" in printed
    assert "training: last-k-blocks (k=1); " in printed
    meta = json.loads(next(out.glob("ckpt_*/meta.json")).read_text())
    assert meta["model"]["n_embd"] == 16 and meta["train_mode"] == "last-k-blocks"
    assert main(["finetune-classify", "--data", str(tmp_path / "train.csv"), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- Llama family


def tiny_llama_classifier(num_classes: int = 3) -> GPTClassifier:
    from fusedgpt.model import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig.from_preset("llama-tiny", vocab_size=VOCAB, context_length=24, backend="torch")
    return GPTClassifier(Llama(config), num_classes).eval()


def test_a_llama_classifier_reads_the_last_real_token_and_trains_its_last_block():
    model = tiny_llama_classifier()
    texts = [torch.randint(0, VOCAB, (n,)) for n in (7, 1, 12)]
    with torch.no_grad():
        alone = torch.cat([model(t[None], torch.tensor([len(t)])) for t in texts])
        idx = torch.full((3, 12), VOCAB - 1)
        for row, t in enumerate(texts):
            idx[row, : len(t)] = t
        torch.testing.assert_close(model(idx, torch.tensor([len(t) for t in texts])), alone, atol=1e-5, rtol=1e-5)
    set_trainable(model, "last-k-blocks", last_k=1)
    trains = ("gpt.lm_head.", "gpt.model.norm.", "gpt.model.layers.1.")
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith(trains), name


def test_finetune_classify_with_lora_on_llama_tiny_and_the_saved_classifier_agrees(tmp_path, capsys):
    fdata.write_csv(tmp_path / "train.csv", toy_rows(40, 0), ("text", "label"))
    fdata.write_jsonl(tmp_path / "test.jsonl", toy_rows(10, 1))
    out = tmp_path / "run"
    code = main(["finetune-classify", "--preset", "llama-tiny", "--data", str(tmp_path / "train.csv"),
                 "--test", str(tmp_path / "test.jsonl"), "--val-fraction", "0.2", "--out", str(out),
                 "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--epochs", "1", "--batch-size", "8",
                 "--max-length", "6", "--backend", "torch", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "training: lora rank=2 alpha=2 on q_proj,v_proj" in printed
    results = json.loads((out / "results.json").read_text())
    classifier = load_classifier(str(out), backend="torch")
    assert classifier.model.gpt.model.layers[0].self_attn.q_proj.rank == 2  # the adapters came back
    test = toy_rows(10, 1)
    predicted = classifier.predict([r["text"] for r in test])
    accuracy = sum(p == r["label"] for p, r in zip(predicted, test)) / len(test)
    assert accuracy == pytest.approx(results["test_accuracy"])
