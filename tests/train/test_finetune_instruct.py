"""Instruction fine-tuning: templates, the ignore_index mask over prompt and padding,
truncation, and the command end to end (with LoRA merged into a GPT-2 export)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fusedgpt.cli import main
from fusedgpt.model import GPT
from fusedgpt.model.llama import Llama
from fusedgpt.model.tokenizer import get_tokenizer
from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.finetune_data import Instruction
from fusedgpt.train.finetune_instruct import (
    IGNORE_INDEX,
    TEMPLATES,
    EncodedInstruction,
    collate,
    encode_instructions,
    load_instruction_model,
)

PAD = 50256


def test_templates_leave_out_an_empty_input():
    with_input = TEMPLATES["alpaca"].format(Instruction("Add them.", "1 2", "3"))
    assert with_input.endswith("### Instruction:\nAdd them.\n\n### Input:\n1 2\n\n### Response:\n")
    without = TEMPLATES["alpaca"].format(Instruction("Say hi.", "", "Hi"))
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert TEMPLATES["phi3"].format(Instruction("Q", "", "A")) == "<|user|>\nQ\n<|assistant|>\n"


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_ignore_index_sits_exactly_on_padding_and_optionally_the_prompt(mask_prompt):
    batch = [EncodedInstruction([10, 11, 12, 20, 21, PAD], prompt_length=3),
             EncodedInstruction([30, 40, PAD], prompt_length=1),
             EncodedInstruction([50, 51, 52, 53, 60, PAD, 99], prompt_length=4)]
    inputs, targets = collate(batch, PAD, mask_prompt)
    X = IGNORE_INDEX
    assert inputs.tolist() == [[10, 11, 12, 20, 21, PAD], [30, 40, PAD, PAD, PAD, PAD], [50, 51, 52, 53, 60, PAD]]
    if mask_prompt:
        assert targets.tolist() == [[X, X, 20, 21, PAD, X], [40, PAD, X, X, X, X], [X, X, X, 60, PAD, 99]]
    else:
        assert targets.tolist() == [[11, 12, 20, 21, PAD, X], [40, PAD, X, X, X, X], [51, 52, 53, 60, PAD, 99]]


def test_a_prompt_that_fills_the_context_masks_every_target():
    inputs, targets = collate([EncodedInstruction([1, 2, 3, 4], prompt_length=9)], PAD, mask_prompt=True)
    assert inputs.shape == (1, 3) and (targets == IGNORE_INDEX).all()


def test_encoding_appends_the_end_token_and_counts_truncations():
    tokenizer = get_tokenizer("gpt2")
    examples = [Instruction("Hi", "", "Hello"), Instruction("Count", "", " ".join(["one"] * 50))]
    template = TEMPLATES["phi3"]
    encoded, truncated = encode_instructions(examples, tokenizer, template, context_length=20)
    prompt = tokenizer.encode_ordinary(template.format(examples[0]))
    assert encoded[0] == EncodedInstruction(prompt + tokenizer.encode_ordinary("Hello") + [PAD], len(prompt))
    assert truncated == 1 and len(encoded[1].tokens) == 21


def test_finetune_instruct_end_to_end_with_lora_merged(tmp_path, capsys):
    examples = [{"instruction": "Which kind of play is this from?", "input": f"line {i}", "output": "comedy"}
                for i in range(10)]
    examples[3]["output"] = "so " * 200  # longer than the tiny preset's 128-token context
    fdata.write_jsonl(tmp_path / "train.jsonl", examples[:8])
    (tmp_path / "val.json").write_text(json.dumps(examples[8:]))
    out = tmp_path / "run"
    code = main(["finetune-instruct", "--data", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.json"),
                 "--out", str(out), "--template", "phi3", "--mask-prompt", "--epochs", "2", "--batch-size", "4",
                 "--lr", "3e-3", "--lora-rank", "4", "--lora-alpha", "8", "--merge", "--max-new-tokens", "3",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "warning: 1 of 8 train examples are longer than the context (128 + 1 tokens) and were truncated" in printed
    # 2 blocks x rank 4 x (in + out) of c_attn (128, 384), attn.c_proj (128, 128), c_fc (128, 512), mlp.c_proj (512, 128)
    assert re.search(r"LoRA rank=4 alpha=8 on attn,mlp; 16,384 trainable of [\d,]+ parameters", printed)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[1]["val_loss"] < epochs[0]["val_loss"]
    steps = [r for r in records if "train_loss" in r]  # 2 epochs of 2 batches of 4
    assert [(r["step"], r["epoch"]) for r in steps] == [(1, 1), (2, 1), (3, 2), (4, 2)] and epochs[1]["step"] == 4
    assert steps[0]["lr"] == pytest.approx(3e-3 / 4)  # warmup: min(10 steps, all 4)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [(r["input"], r["output"]) for r in responses] == [("line 8", "comedy"), ("line 9", "comedy")]
    assert all(isinstance(r["response"], str) for r in responses)

    # Merged: the checkpoint and the GPT-2 export are plain GPTs with the same weights.
    model, tokenizer, template = load_instruction_model(str(out), backend="torch")
    exported = GPT.from_pretrained(out / "hf", backend="torch")
    idx = torch.tensor([tokenizer.encode_ordinary(template.format(Instruction("Which?", "line 8", "")))])
    with torch.no_grad():
        torch.testing.assert_close(exported(idx), model.eval()(idx))
    assert not any("lora" in name for name in model.state_dict())


def test_bad_instruction_files_give_clear_errors(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "Say hi", "output": "hi"}\n{"input": "x", "output": "y"}\n')
    assert main(["finetune-instruct", "--data", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "data.jsonl, example 2: no 'instruction'" in capsys.readouterr().err
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\nSay hi,hi\n")
    assert main(["finetune-instruct", "--data", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "instructions must be a .json or .jsonl file" in capsys.readouterr().err


# --------------------------------------------------------------------------- packed sequences on GPT-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_gpt2_batch_equals_the_padded_batch_and_each_sequence_alone(backend):
    """Packed (cu_seqlens): learned positions restart at each example and attention stays
    within it, so the loss and every gradient are the padded batch's, and the logits each
    sequence's own."""
    from fusedgpt.model import GPTConfig
    from fusedgpt.train.finetune_instruct import pack

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=PAD + 1, context_length=16, n_layer=1, n_head=2, n_embd=32, backend=backend))
    lengths = (7, 2, 11)  # tokens per example; inputs and targets are one shorter
    batch = [EncodedInstruction(torch.randint(0, PAD, (n,)).tolist(), prompt_length=2) for n in lengths]
    for mask_prompt in (False, True):
        inputs, targets, cu_seqlens = pack(batch, mask_prompt)
        padded_inputs, padded_targets = collate(batch, PAD, mask_prompt)
        assert inputs.shape == (1, sum(lengths) - len(lengths)) and inputs.numel() < padded_inputs.numel()
        packed_loss = model(inputs, targets, cu_seqlens=cu_seqlens)
        padded_loss = model(padded_inputs, padded_targets)
        torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
        packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()))
        padded_grads = torch.autograd.grad(padded_loss, list(model.parameters()))
        for packed, padded in zip(packed_grads, padded_grads):
            torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        packed_logits = model(inputs, cu_seqlens=cu_seqlens)
        starts = cu_seqlens.tolist()
        for start, end in zip(starts[:-1], starts[1:]):
            torch.testing.assert_close(packed_logits[:, start:end], model(inputs[:, start:end]), atol=1e-5, rtol=0)
    # A row longer than the context is fine when each sequence fits; a sequence longer is not.
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 17, dtype=torch.long), cu_seqlens=torch.tensor([0, 17], dtype=torch.int32))


@pytest.mark.parametrize("preset, family", [("tiny", GPT), ("llama-tiny", Llama)])
def test_finetune_instruct_packed_trains_as_padded(tmp_path, capsys, preset, family):
    examples = [{"instruction": "Which kind of play is this from?", "input": f"line {i}" * (1 + i % 4),
                 "output": "comedy"} for i in range(6)]
    fdata.write_jsonl(tmp_path / "train.jsonl", examples[:4])
    fdata.write_jsonl(tmp_path / "val.jsonl", examples[4:])
    argv = ["finetune-instruct", "--preset", preset, "--data", str(tmp_path / "train.jsonl"), "--val",
            str(tmp_path / "val.jsonl"), "--mask-prompt", "--epochs", "2", "--batch-size", "2", "--lr", "3e-3",
            "--max-new-tokens", "1", "--responses", "0", "--backend", "torch", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "packed"), "--pack"]) == 0
    assert main([*argv, "--out", str(tmp_path / "padded")]) == 0
    capsys.readouterr()

    def train_losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]

    packed, padded = train_losses(tmp_path / "packed"), train_losses(tmp_path / "padded")
    assert len(packed) == 4 and packed == pytest.approx(padded, rel=1e-4)  # the same training, without padding
    model, _, _ = load_instruction_model(str(tmp_path / "packed"), backend="torch")
    assert isinstance(model, family)
