"""``fusedgpt finetune-classify`` and ``fusedgpt classify``: a GPT-2 or Llama-family model
as a text classifier.

The language-model head is replaced by a linear layer from the final hidden state to one
logit per class, and a text is classified from the hidden state of its *last real token*.
With causal attention that position has seen the whole text and nothing after it, so a
batch is right-padded to its longest text and no attention mask is needed: the padding
never reaches the positions that are read. Texts longer than ``--max-length`` tokens keep
their first ``max_length`` tokens (and are counted in a warning).

What trains (``--train``): ``head`` (the new head only), ``last-k-blocks`` (the head, the
final norm and the last ``--last-k`` transformer blocks; the default, since a
pretrained model's lower layers already give general features) or ``all``. With
``--lora-rank`` the base weights stay frozen and only the adapters and the head train. The
loss is the fused cross-entropy (``fusedgpt.kernels.cross_entropy``) over the class logits.

Labels are the distinct labels of the training split, sorted; their order is saved with
the classifier. A validation or test example whose label is not among them is an error.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from fusedgpt.hardware import add_device_arguments, autocast, choose_backend, resolve_device
from fusedgpt.io import written
from fusedgpt.kernels import cross_entropy
from fusedgpt.model.gpt import GPT
from fusedgpt.model.llama import Llama
from fusedgpt.train import finetune
from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.lora import LoRAConfig, apply_lora, merge_lora
from fusedgpt.train.runlog import RunLog

Tensor = torch.Tensor
TASK = "classify"
TRAIN_MODES = ("last-k-blocks", "all", "head")
EVAL_BATCH_SIZE = 32


def blocks_and_final_norm(gpt: Union[GPT, Llama]) -> tuple[nn.ModuleList, nn.Module]:
    """The transformer blocks and the norm after them, in either family."""
    if isinstance(gpt, Llama):
        return gpt.model.layers, gpt.model.norm
    return gpt.transformer.h, gpt.transformer.ln_f


class GPTClassifier(nn.Module):
    """A GPT (or Llama-family model) whose output head gives ``num_classes`` logits, read at
    each text's last token.

    The head is a new ``nn.Linear(n_embd, num_classes)`` (GPT-2 initialisation) in place of
    ``gpt.lm_head``; the token embedding it was tied to stays as it is.
    """

    def __init__(self, gpt: Union[GPT, Llama], num_classes: int):
        super().__init__()
        if not isinstance(num_classes, int) or not 2 <= num_classes <= gpt.config.vocab_size:
            # GPT.forward returns the head's outputs cut to vocab_size columns, which keeps
            # all of them only while there are no more classes than tokens.
            raise ValueError(f"num_classes must be an int in [2, {gpt.config.vocab_size}], got {num_classes!r}")
        head = nn.Linear(gpt.config.n_embd, num_classes, device=gpt.lm_head.weight.device)
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(head.bias)
        gpt.lm_head = head
        self.gpt = gpt
        self.num_classes = num_classes

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Class logits (B, num_classes) for idx (B, T) int64 token ids, right-padded, with
        ``lengths`` (B,) int64 in [1, T] real tokens per row."""
        if not isinstance(lengths, Tensor) or lengths.dtype != torch.long or lengths.shape != idx.shape[:1]:
            raise TypeError(f"lengths must be an int64 tensor of shape ({idx.shape[0]},), got "
                            f"{getattr(lengths, 'dtype', type(lengths))} {tuple(getattr(lengths, 'shape', ()))}")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > idx.shape[1]):
            raise ValueError(f"lengths must lie in [1, {idx.shape[1]}], got [{int(lengths.min())}, {int(lengths.max())}]")
        logits = self.gpt(idx)  # (B, T, num_classes): the small head at every position is cheap
        return logits[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


def set_trainable(model: GPTClassifier, mode: str, last_k: int = 1) -> None:
    """Freeze ``model`` but for what ``mode`` trains (see the module docstring)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}")
    blocks, final_norm = blocks_and_final_norm(model.gpt)
    if mode == "last-k-blocks" and not 1 <= last_k <= len(blocks):
        raise ValueError(f"--last-k must be in [1, {len(blocks)}] (the model's blocks), got {last_k}")
    model.requires_grad_(mode == "all")
    if mode == "last-k-blocks":
        for module in (*blocks[len(blocks) - last_k :], final_norm):
            module.requires_grad_(True)
    model.gpt.lm_head.requires_grad_(True)


# --------------------------------------------------------------------------- data


@dataclass
class EncodedTexts:
    """Token ids of each text (at most ``max_length``), class indices, and how many texts
    were cut to ``max_length``."""

    tokens: list[list[int]]
    labels: list[int]
    truncated: int


def encode(tokenizer: Any, pairs: Sequence[tuple[str, str]], classes: Sequence[str], max_length: int,
           source: str) -> EncodedTexts:
    """Tokenise ``(text, label)`` pairs; ``source`` names them in errors.

    Raises:
        FinetuneDataError: a label that is not in ``classes``.
    """
    index = {label: i for i, label in enumerate(classes)}
    tokens, labels, truncated = [], [], 0
    for number, (text, label) in enumerate(pairs, 1):
        if label not in index:
            raise fdata.FinetuneDataError(
                f"{source}, example {number}: label {label!r} is not one of the training labels {list(classes)}")
        ids = tokenizer.encode_ordinary(text)
        truncated += len(ids) > max_length
        tokens.append(ids[:max_length])
        labels.append(index[label])
    return EncodedTexts(tokens, labels, truncated)


def _batch(tokens: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    idx = finetune.pad_sequences(tokens, pad_id).to(device)
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long, device=device)
    return idx, lengths


@torch.no_grad()
def class_logits(model: GPTClassifier, tokens: Sequence[list[int]], pad_id: int, device: torch.device,
                 batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """fp32 logits (N, num_classes) on the CPU for N token lists, in eval mode; batches
    group texts of similar length so that little is padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    out = torch.empty(len(tokens), model.num_classes)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        with autocast(device):
            logits = model(*_batch([tokens[i] for i in chosen], pad_id, device))
        out[chosen] = logits.float().cpu()
    model.train(was_training)
    return out


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    predictions: list[int]


def evaluate(model: GPTClassifier, data: EncodedTexts, pad_id: int, device: torch.device) -> Evaluation:
    logits = class_logits(model, data.tokens, pad_id, device)
    labels = torch.tensor(data.labels, dtype=torch.long)
    loss = cross_entropy(logits, labels, backend=model.gpt.config.backend).item()
    predictions = logits.argmax(dim=-1)
    return Evaluation(loss, (predictions == labels).float().mean().item(), predictions.tolist())


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for true, predicted in zip(labels, predictions):
        matrix[true][predicted] += 1
    return matrix


def format_confusion(matrix: list[list[int]], classes: Sequence[str]) -> str:
    width = max(len("true \\ predicted"), *(len(c) for c in classes))
    cell = max(6, *(len(c) for c in classes))
    lines = ["true \\ predicted".ljust(width) + "".join(c.rjust(cell + 1) for c in classes)]
    lines += [c.ljust(width) + "".join(str(n).rjust(cell + 1) for n in row) for c, row in zip(classes, matrix)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- saved classifiers


@dataclass
class TextClassifier:
    """A fine-tuned classifier with its tokenizer and labels (see :func:`load_classifier`)."""

    model: GPTClassifier
    tokenizer: Any
    classes: list[str]
    max_length: int
    device: torch.device

    def probabilities(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), len(classes)) fp32 class probabilities."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("texts must be a non-empty sequence of non-empty strings")
        tokens = [self.tokenizer.encode_ordinary(t)[: self.max_length] for t in texts]
        return class_logits(self.model, tokens, self.tokenizer.eot_token, self.device).softmax(dim=-1)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.classes[i] for i in self.probabilities(texts).argmax(dim=-1).tolist()]


def load_classifier(path: str, *, backend: str = "auto", device: str = "cpu") -> TextClassifier:
    """The classifier saved by ``fusedgpt finetune-classify`` in ``path`` (its output
    directory or checkpoint directory).

    Raises:
        CheckpointError: not a checkpoint, damaged, or not a classifier.
    """
    from fusedgpt.model.tokenizer import get_tokenizer

    checkpoint, gpt = finetune.open_finetuned(path, TASK, backend=backend)
    meta = checkpoint.meta
    model = GPTClassifier(gpt, len(meta["classes"]))
    checkpoint.load_weights(model)
    target = resolve_device(device)
    return TextClassifier(model.to(target).eval(), get_tokenizer(meta["tokenizer"]), list(meta["classes"]),
                          int(meta["max_length"]), target)


# --------------------------------------------------------------------------- fine-tuning


def load_splits(args: argparse.Namespace, out: Path) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """The (text, label) pairs of train/val/test and a description of where each came from.

    Without ``--data``: the bundled genre dataset, written to ``OUT/data/*.csv`` first.
    With it: ``--val`` / ``--test`` files where given, the rest split off ``--data``.
    """
    data, given, columns = args.data, {"val": args.val, "test": args.test}, (args.text_column, args.label_column)
    if data is None:
        if args.val or args.test:
            raise ValueError("--val and --test go with --data")
        for name, rows in fdata.genre_dataset().items():
            fdata.write_csv(out / "data" / f"{name}.csv", rows, ("text", "label"))
        written.record_written(out, out / "data")
        data, given, columns = str(out / "data" / "train.csv"), {n: str(out / "data" / f"{n}.csv") for n in given}, ("text", "label")
    missing = [name for name, path in given.items() if path is None]
    fractions = {"val": args.val_fraction, "test": args.test_fraction}
    parts = fdata.split(fdata.read_labeled(data, *columns), [fractions[n] for n in missing], args.seed)
    splits = {"train": parts[0], **dict(zip(missing, parts[1:]))}
    sources = {"train": data, **{n: f"{data} ({fractions[n]:.0%} split off)" for n in missing}}
    for name, path in given.items():
        if path is not None:
            splits[name], sources[name] = fdata.read_labeled(path, *columns), path
        if not splits[name]:
            raise ValueError(f"no {name} examples: give --{name} FILE or a --{name}-fraction above 0")
    return splits, sources


def classifier_to_train(gpt: Union[GPT, Llama], num_classes: int, lora: Optional[LoRAConfig], train: Optional[str],
                        last_k: int) -> tuple[GPTClassifier, str]:
    """``gpt`` as a classifier, with what trains set (see the module docstring), and the
    name of that choice (``"lora"`` or a :data:`TRAIN_MODES` one), described on stdout."""
    if lora is not None:
        apply_lora(gpt, lora)
    model = GPTClassifier(gpt, num_classes).to(gpt.lm_head.weight.device)
    mode = "lora" if lora is not None else (train or "last-k-blocks")
    if lora is None:
        set_trainable(model, mode, last_k)
    print(f"training: {mode}" + (f" (k={last_k})" if mode == "last-k-blocks" else "")
          + (f" rank={lora.rank} alpha={lora.alpha:g} on {','.join(lora.targets)}" if lora else "")
          + f"; {finetune.describe_parameters(model)}")
    return model, mode


def held_out_results(model: GPTClassifier, test: EncodedTexts, train_labels: Sequence[int], classes: Sequence[str],
                 pad_id: int, device: torch.device) -> dict[str, Any]:
    """Accuracy, loss and confusion matrix on the test texts, beside the accuracy of always
    answering the training set's most common class; printed and returned."""
    result = evaluate(model, test, pad_id, device)
    majority = Counter(train_labels).most_common(1)[0][0]
    baseline = sum(label == majority for label in test.labels) / len(test.labels)
    matrix = confusion_matrix(test.labels, result.predictions, len(classes))
    print(f"test: accuracy {result.accuracy:.1%} (loss {result.loss:.4f}) on {len(test.labels)} examples; "
          f"majority-class baseline ('{classes[majority]}' always) {baseline:.1%}")
    print(format_confusion(matrix, classes))
    return {"test_accuracy": result.accuracy, "test_loss": result.loss, "majority_baseline": baseline,
            "majority_class": classes[majority], "classes": list(classes), "confusion_matrix": matrix}


def run(args: argparse.Namespace) -> int:
    """``fusedgpt finetune-classify``."""
    cfg = finetune.config_from_args(args)
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length must be a positive number of tokens, got {args.max_length}")
    if cfg.lora is not None and args.train is not None:
        raise ValueError("--train and --lora-rank exclude each other: with LoRA the adapters and the head train")
    out = Path(args.out)
    lock = finetune.check_out(out, "fusedgpt finetune-classify")
    splits, sources = load_splits(args, out)
    classes = sorted({label for _, label in splits["train"]})
    if len(classes) < 2:
        raise fdata.FinetuneDataError(f"{sources['train']}: the training examples have {len(classes)} label(s); "
                                      "a classifier needs at least 2")

    base = finetune.base_from_args(args)
    device = base.model.lm_head.weight.device
    context = base.model.config.context_length
    max_length = context if args.max_length is None else args.max_length
    if max_length > context:
        raise ValueError(f"--max-length must be in [1, {context}] (the model's context length), got {max_length}")
    data = {name: encode(base.tokenizer, pairs, classes, max_length, sources[name]) for name, pairs in splits.items()}
    for name, encoded in data.items():
        if encoded.truncated:
            print(f"warning: {encoded.truncated} of {len(encoded.tokens)} {name} texts are longer than "
                  f"{max_length} tokens and were truncated")

    model, mode = classifier_to_train(base.model, len(classes), cfg.lora, args.train, args.last_k)
    counts = {name: dict(sorted(Counter(classes[i] for i in d.labels).items())) for name, d in data.items()}
    for name in ("train", "val", "test"):
        print(f"{name}: {len(data[name].tokens)} examples from {sources[name]}: {counts[name]}")

    train_data, pad_id = data["train"], base.tokenizer.eot_token

    def batch_loss(indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        idx, lengths = _batch([train_data.tokens[i] for i in indices], pad_id, device)
        labels = torch.tensor([train_data.labels[i] for i in indices], dtype=torch.long, device=device)
        logits = model(idx, lengths)
        loss = cross_entropy(logits, labels, backend=model.gpt.config.backend)
        correct = (logits.argmax(dim=-1) == labels).sum().item()
        return loss, {"loss": loss.item() * len(indices), "correct": correct, "count": len(indices)}

    def end_epoch(epoch: int, sums: dict[str, float], log: RunLog) -> dict[str, float]:
        val = evaluate(model, data["val"], pad_id, device)
        train_loss, train_accuracy = sums["loss"] / sums["count"], sums["correct"] / sums["count"]
        log.print(f"epoch {epoch}: train loss {train_loss:.4f} accuracy {train_accuracy:.1%} "
                  f"(running, over the epoch) | val loss {val.loss:.4f} accuracy {val.accuracy:.1%}")
        return {"epoch_train_loss": train_loss, "epoch_train_accuracy": train_accuracy,
                "val_loss": val.loss, "val_accuracy": val.accuracy}

    steps, epochs = finetune.train(model, cfg, len(train_data.tokens), batch_loss, end_epoch, device=device, out=out,
                                   title=f"fusedgpt finetune-classify ({mode})", progress=args.progress)

    results = {**held_out_results(model, data["test"], train_data.labels, classes, pad_id, device),
               "epochs": epochs, "counts": counts}
    if cfg.merge:
        merge_lora(model.gpt)
    meta = {"task": TASK, "model": base.model.config.to_dict(), "tokenizer": base.tokenizer_name,
            "classes": classes, "max_length": max_length, "base": base.source, "train_mode": mode,
            "lora": cfg.lora.to_dict() if cfg.lora is not None and not cfg.merge else None,
            "finetune": cfg.to_dict(), "results": results}
    path = finetune.save(out, steps, model, meta)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    written.record_written(out, out / "results.json")
    print(f"saved the classifier to {path}; try: fusedgpt classify --checkpoint {out} \"TEXT\"")
    lock.release()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (default: the bundled comedy/history/tragedy speeches)")
    data.add_argument("--data", default=None, help="training examples: .csv, .tsv, .jsonl or .json (default: bundled)")
    data.add_argument("--val", default=None, help="validation examples (default: split off --data)")
    data.add_argument("--test", default=None, help="test examples (default: split off --data)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out for validation")
    data.add_argument("--test-fraction", type=float, default=0.1, help="share of --data held out for testing")
    data.add_argument("--text-column", default="text", help="column (or JSON field) of the texts")
    data.add_argument("--label-column", default="label", help="column (or JSON field) of the labels")
    data.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the context length)")
    parser.add_argument("--train", choices=TRAIN_MODES, default=None,
                        help="what trains besides the new head (default: last-k-blocks; not with LoRA)")
    parser.add_argument("--last-k", type=int, default=1, help="blocks trained by --train last-k-blocks")
    finetune.add_arguments(parser, out="runs/classify", epochs=3, batch_size=16, lr=5e-4)


# --------------------------------------------------------------------------- fusedgpt classify


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the --out directory of fusedgpt finetune-classify")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    add_device_arguments(parser)


def run_predict(args: argparse.Namespace) -> int:
    """``fusedgpt classify``: one line per text, ``label<TAB>probability<TAB>text``."""
    device = resolve_device(args.device)
    classifier = load_classifier(args.checkpoint, backend=choose_backend(device, args.backend), device=str(device))
    probabilities = classifier.probabilities(args.texts)
    for text, row in zip(args.texts, probabilities):
        best = int(row.argmax())
        print(f"{classifier.classes[best]}\t{row[best].item():.3f}\t{text}")
    return 0

