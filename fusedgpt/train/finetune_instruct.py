"""``fusedgpt finetune-instruct``: instruction fine-tuning on Alpaca-style examples.

Each example ``{"instruction", "input" (optional), "output"}`` becomes one token sequence

    prompt tokens (the template filled in)  +  output tokens  +  <|endoftext|>

and the model learns it as a language model: the input is the sequence without its last
token, the target the sequence shifted by one. The end-of-text token teaches the model to
stop. A batch is right-padded to its longest sequence, inputs with ``<|endoftext|>`` and
targets with ``-100`` (ignored by the loss, the model's fused linear + cross-entropy);
with ``--mask-prompt`` the targets that are prompt tokens are ``-100`` too, so only the
response (and its end token) is learned. A sequence longer than ``context_length + 1``
tokens keeps its first ``context_length + 1`` (the command warns with the count).

Prompt templates (``--template``); ``{input}`` parts are left out for an empty input:

``alpaca`` (Stanford Alpaca's)::

    Below is an instruction that describes a task, paired with an input that provides
    further context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    <the output>

(without an input the first sentence is "Below is an instruction that describes a task."
and there is no ``### Input:`` section); ``phi3`` (Phi-3's chat layout, shorter; the tags
are ordinary text to the GPT-2 tokenizer)::

    <|user|>
    {instruction}
    {input}
    <|assistant|>
    <the output>
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fusedgpt.hardware import autocast, resolve_device
from fusedgpt.io import written
from fusedgpt.model.gpt import GPT
from fusedgpt.train import finetune
from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.finetune_data import Instruction
from fusedgpt.train.lora import apply_lora, has_lora, merge_lora
from fusedgpt.train.runlog import RunLog

Tensor = torch.Tensor
TASK = "instruct"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTemplate:
    """Format strings with ``{instruction}`` (and ``{input}`` in ``with_input``)."""

    with_input: str
    without_input: str

    def format(self, example: Instruction) -> str:
        template = self.with_input if example.input else self.without_input
        return template.format(instruction=example.instruction, input=example.input)


TEMPLATES = {
    "alpaca": PromptTemplate(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "phi3": PromptTemplate("<|user|>\n{instruction}\n{input}\n<|assistant|>\n", "<|user|>\n{instruction}\n<|assistant|>\n"),
}


@dataclass(frozen=True)
class EncodedInstruction:
    """``tokens``: prompt + output + end-of-text, at most ``context_length + 1`` of them;
    ``prompt_length``: how many of the untruncated sequence's tokens are the prompt."""

    tokens: list[int]
    prompt_length: int


def encode_instructions(examples: Sequence[Instruction], tokenizer: Any, template: PromptTemplate,
                        context_length: int) -> tuple[list[EncodedInstruction], int]:
    """Token sequences for ``examples`` and how many were truncated to ``context_length + 1``."""
    encoded, truncated = [], 0
    for example in examples:
        prompt = tokenizer.encode_ordinary(template.format(example))
        tokens = prompt + tokenizer.encode_ordinary(example.output) + [tokenizer.eot_token]
        truncated += len(tokens) > context_length + 1
        encoded.append(EncodedInstruction(tokens[: context_length + 1], len(prompt)))
    return encoded, truncated


def collate(batch: Sequence[EncodedInstruction], pad_id: int, mask_prompt: bool) -> tuple[Tensor, Tensor]:
    """inputs, targets: (B, T) int64 with T = the longest sequence minus one.

    ``inputs[i, j] = tokens[j]`` and ``targets[i, j] = tokens[j + 1]``; past a sequence's
    end, inputs are ``pad_id`` and targets ``-100``; with ``mask_prompt``, the targets
    that are prompt tokens (``j + 1 < prompt_length``) are ``-100`` as well.
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    if any(len(e.tokens) < 2 for e in batch):
        raise ValueError("every example needs at least 2 tokens (a prompt and an end token)")
    inputs = finetune.pad_sequences([e.tokens[:-1] for e in batch], pad_id)
    targets = finetune.pad_sequences([e.tokens[1:] for e in batch], IGNORE_INDEX)
    if mask_prompt:
        for row, example in enumerate(batch):
            targets[row, : example.prompt_length - 1] = IGNORE_INDEX
    return inputs, targets


def pack(batch: Sequence[EncodedInstruction], mask_prompt: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's sequences back to back in one row, for variable-length attention: inputs
    and targets (1, total) int64 as :func:`collate` builds them (prompt targets -100 with
    ``mask_prompt``) but with no padding, and ``cu_seqlens`` (N + 1,) int32, where sequence n
    occupies ``cu_seqlens[n] .. cu_seqlens[n + 1]``. The loss is the padded batch's."""
    if not batch or any(len(e.tokens) < 2 for e in batch):
        raise ValueError("pack needs at least one example, each of at least 2 tokens")
    inputs = [token for e in batch for token in e.tokens[:-1]]
    targets = [IGNORE_INDEX if mask_prompt and j < e.prompt_length - 1 else token
               for e in batch for j, token in enumerate(e.tokens[1:])]
    lengths = torch.tensor([len(e.tokens) - 1 for e in batch])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return torch.tensor([inputs]), torch.tensor([targets]), cu_seqlens


def learnable(examples: list[EncodedInstruction], mask_prompt: bool, what: str,
              context_length: int) -> list[EncodedInstruction]:
    """The examples that have a target token. With ``mask_prompt`` an example whose prompt
    fills the context has none -- it would teach nothing and report a loss of 0 -- so those
    are left out, with a warning counting them.

    Raises:
        FinetuneDataError: no example of ``what`` (e.g. ``"train (FILE)"``) has a target token.
    """
    if not mask_prompt:
        return examples  # every sequence of two or more tokens has targets
    kept = [e for e in examples if len(e.tokens) > e.prompt_length]
    if not kept:
        raise fdata.FinetuneDataError(
            f"none of the {len(examples)} {what} examples has a response token within the context "
            f"({context_length} + 1 tokens): with --mask-prompt nothing would be learned. Shorten the prompts, "
            "use a model with a longer context, or train without --mask-prompt")
    if len(kept) < len(examples):
        print(f"warning: {len(examples) - len(kept)} of {len(examples)} {what} examples have no response token "
              f"within the context ({context_length} + 1 tokens) and are left out (--mask-prompt)")
    return kept


@torch.no_grad()
def held_out_loss(model: GPT, data: Sequence[EncodedInstruction], pad_id: int, mask_prompt: bool,
                  batch_size: int, device: torch.device) -> float:
    """Mean loss per target token (those not ignored) over ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        inputs, targets = collate(data[start : start + batch_size], pad_id, mask_prompt)
        kept = int((targets != IGNORE_INDEX).sum())
        if kept:
            with autocast(device):
                total += model(inputs.to(device), targets.to(device)).item() * kept
            count += kept
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def respond(model: GPT, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy responses to ``prompts`` (already formatted), each up to ``max_new_tokens``
    tokens and cut at the first end-of-text."""
    from fusedgpt.model.generate import generate

    responses = []
    for prompt in prompts:
        idx = torch.tensor([tokenizer.encode_ordinary(prompt)], dtype=torch.long, device=device)
        with autocast(device):
            out = generate(model, idx, max_new_tokens, temperature=0.0, eos_id=tokenizer.eot_token,
                           vocab_limit=tokenizer.n_vocab)
        new = out[0, idx.shape[1] :].tolist()
        if tokenizer.eot_token in new:
            new = new[: new.index(tokenizer.eot_token)]
        responses.append(tokenizer.decode(new))
    return responses


def load_instruction_model(path: str, *, backend: str = "auto", device: str = "cpu") -> tuple[GPT, Any, PromptTemplate]:
    """The model saved by ``fusedgpt finetune-instruct`` (adapters included, if unmerged),
    its tokenizer and its prompt template."""
    from fusedgpt.model.tokenizer import get_tokenizer

    checkpoint, model = finetune.open_finetuned(path, TASK, backend=backend)
    checkpoint.load_weights(model)
    meta = checkpoint.meta
    return model.to(resolve_device(device)), get_tokenizer(meta["tokenizer"]), TEMPLATES[meta["template"]]


def load_examples(args: argparse.Namespace, out: Path) -> tuple[dict[str, list[Instruction]], dict[str, str]]:
    """Training and held-out examples, and where each came from. Without ``--data``: the
    bundled instruction set, written to ``OUT/data/{train,val}.jsonl`` first."""
    if args.data is None:
        if args.val:
            raise ValueError("--val goes with --data")
        splits = fdata.instruction_dataset()
        sources = {}
        for name, examples in splits.items():
            sources[name] = str(out / "data" / f"{name}.jsonl")
            fdata.write_jsonl(sources[name], (e.to_dict() for e in examples))
        written.record_written(out, out / "data")
        return splits, sources
    if args.val is not None:
        return ({"train": fdata.read_instructions(args.data), "val": fdata.read_instructions(args.val)},
                {"train": args.data, "val": args.val})
    train, val = fdata.split(fdata.read_instructions(args.data), [args.val_fraction], args.seed)
    if not val:
        raise ValueError("no held-out examples: give --val FILE or a --val-fraction above 0")
    return {"train": train, "val": val}, {"train": args.data, "val": f"{args.data} ({args.val_fraction:.0%} split off)"}


def answer_held_out(model: GPT, tokenizer: Any, template: PromptTemplate, examples: Sequence[Instruction],
                    max_new_tokens: int, out: Path) -> int:
    """Answer ``examples`` greedily into ``OUT/responses.jsonl`` (each beside its reference
    output); returns how many answers match their reference exactly."""
    device = next(model.parameters()).device
    responses = respond(model, tokenizer, [template.format(e) for e in examples], max_new_tokens, device)
    fdata.write_jsonl(out / "responses.jsonl", ({**e.to_dict(), "response": r} for e, r in zip(examples, responses)))
    written.record_written(out, out / "responses.jsonl")
    exact = sum(r.strip() == e.output.strip() for e, r in zip(examples, responses))
    print(f"responses to {len(examples)} held-out instructions: {out / 'responses.jsonl'} "
          f"(beside each reference 'output'); {exact} ({exact / max(len(examples), 1):.0%}) match it exactly")
    return exact


def run(args: argparse.Namespace) -> int:
    """``fusedgpt finetune-instruct``."""
    cfg = finetune.config_from_args(args)
    if args.responses < 0 or args.max_new_tokens < 1:
        raise ValueError(f"need --responses >= 0 and --max-new-tokens >= 1, got {args.responses} and {args.max_new_tokens}")
    out = Path(args.out)
    lock = finetune.check_out(out, "fusedgpt finetune-instruct")
    examples, sources = load_examples(args, out)
    template = TEMPLATES[args.template]

    base = finetune.base_from_args(args)
    model, tokenizer = base.model, base.tokenizer
    device = next(model.parameters()).device
    data = {}
    for name, items in examples.items():
        data[name], truncated = encode_instructions(items, tokenizer, template, model.config.context_length)
        if truncated:
            print(f"warning: {truncated} of {len(items)} {name} examples are longer than the context "
                  f"({model.config.context_length} + 1 tokens) and were truncated")
        data[name] = learnable(data[name], args.mask_prompt, f"{name} ({sources[name]})", model.config.context_length)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    print("training: " + (f"LoRA rank={cfg.lora.rank} alpha={cfg.lora.alpha:g} on {','.join(cfg.lora.targets)}"
                           if cfg.lora else "all weights") + f"; {finetune.describe_parameters(model)}")
    print(f"template {args.template}; loss on " + ("the responses only (--mask-prompt)" if args.mask_prompt
                                                   else "prompt and response"))
    for name in ("train", "val"):
        print(f"{name}: {len(data[name])} examples from {sources[name]}")

    pad_id = tokenizer.eot_token

    def batch_loss(indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        batch = [data["train"][i] for i in indices]
        if args.pack:
            inputs, targets, cu_seqlens = pack(batch, args.mask_prompt)
            loss = model(inputs.to(device), targets.to(device), cu_seqlens=cu_seqlens.to(device))
        else:
            inputs, targets = collate(batch, pad_id, args.mask_prompt)
            loss = model(inputs.to(device), targets.to(device))
        kept = int((targets != IGNORE_INDEX).sum())
        return loss, {"loss": loss.item() * kept, "tokens": kept}

    def end_epoch(epoch: int, sums: dict[str, float], log: RunLog) -> dict[str, float]:
        val_loss = held_out_loss(model, data["val"], pad_id, args.mask_prompt, cfg.batch_size, device)
        train_loss = sums["loss"] / max(sums["tokens"], 1)
        log.print(f"epoch {epoch}: train loss {train_loss:.4f} (running, over the epoch) | held-out loss {val_loss:.4f}")
        return {"epoch_train_loss": train_loss, "val_loss": val_loss}

    steps, epochs = finetune.train(model, cfg, len(data["train"]), batch_loss, end_epoch, device=device, out=out,
                                   title="fusedgpt finetune-instruct", progress=args.progress)

    answered = examples["val"][: args.responses]
    exact = answer_held_out(model, tokenizer, template, answered, args.max_new_tokens, out)

    if cfg.merge:
        merge_lora(model)
    meta = {"task": TASK, "model": model.config.to_dict(), "tokenizer": base.tokenizer_name, "template": args.template,
            "mask_prompt": args.mask_prompt, "base": base.source,
            "lora": cfg.lora.to_dict() if cfg.lora is not None and not cfg.merge else None,
            "finetune": cfg.to_dict(), "results": {"epochs": epochs, "exact_match": exact, "answered": len(answered)}}
    path = finetune.save(out, steps, model, meta)
    print(f"saved the model to {path}")
    if not has_lora(model):
        model.save_pretrained(out / "hf")
        written.record_written(out, out / "hf")
        print(f"Hugging Face export: {out / 'hf'}; fusedgpt generate --checkpoint {out} reads the checkpoint")
    lock.release()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (default: the bundled Shakespeare instruction set)")
    data.add_argument("--data", default=None, help="Alpaca-style .json or .jsonl (instruction, input, output; default: bundled)")
    data.add_argument("--val", default=None, help="held-out examples (default: split off --data)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out")
    data.add_argument("--template", choices=sorted(TEMPLATES), default="alpaca", help="prompt template")
    data.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt tokens, only on the response")
    data.add_argument("--pack", action="store_true",
                      help="train on each batch's examples packed into one row (variable-length attention, no "
                           "padding; positions restart at each example)")
    parser.add_argument("--responses", type=int, default=100, help="held-out instructions to answer at the end")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per response at most")
    finetune.add_arguments(parser, out="runs/instruct", epochs=2, batch_size=8, lr=1e-4)
