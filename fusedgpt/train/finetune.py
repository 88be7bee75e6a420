"""What both fine-tuning commands share: the starting model, what trains (LoRA or not),
the optimizer and schedule, the epoch loop, and saving and reopening the result.

The starting point (``--checkpoint``) is a ``fusedgpt train`` checkpoint or run directory,
a Hugging Face GPT-2 directory, or a GPT-2 name (see ``fusedgpt generate``); without one,
a randomly initialised ``--preset`` model, which is enough to try the commands out.

Training shares pretraining's optimisation (``fusedgpt.train.optim``): AdamW with weight
decay on matrices only, over the parameters that train; a linear warmup and a cosine decay to
a tenth of the peak rate over all fine-tuning steps; gradient clipping; and its run log
(``fusedgpt.train.runlog``): ``OUT/metrics.jsonl``, a progress bar, ``OUT/loss.png``. The result
is an ordinary training checkpoint (``OUT/ckpt_NNNNNNNN/``, written atomically by
``fusedgpt.io.checkpoint``) whose ``meta.json`` also records the task (``classify`` or
``instruct``), the tokenizer, the options (:class:`FinetuneConfig`) and, for unmerged
adapters, the LoRA configuration.

With ``deterministic`` the training runs under pretraining's
:func:`~fusedgpt.train.trainer.deterministic_algorithms`, which makes a run bitwise
reproducible on a GPU too: by default the Triton attention backward adds dQ with atomics,
whose last bits vary from run to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from fusedgpt.hardware import add_device_arguments, autocast, choose_backend, resolve_device
from fusedgpt.model import build_model
from fusedgpt.model.config import LLAMA_PRESETS, PRESETS, config_class_for, config_from_preset
from fusedgpt.model.gpt import GPT
from fusedgpt.io import checkpoint as ckpt
from fusedgpt.io import written
from fusedgpt.io.runlock import RunLock
from fusedgpt.train.data import absolute_path
from fusedgpt.train.lora import GROUPS, LAYERS, LoRAConfig, apply_lora, parameter_counts
from fusedgpt.train.optim import Optimization
from fusedgpt.train.runlog import RunLog
from fusedgpt.train.trainer import DETERMINISTIC_HELP, TrainingDiverged, check_seed, deterministic_algorithms

PathLike = Union[str, os.PathLike]
# batch_loss(example indices) -> (mean loss to minimise, sums to report for the epoch)
BatchLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
# end_epoch(epoch, the epoch's sums, the run's log) -> the epoch's record (its evaluation)
EndEpoch = Callable[[int, dict[str, float], RunLog], dict[str, Any]]


@dataclass
class FinetuneConfig:
    """The optimisation shared by both commands: ``epochs`` passes over the training set
    in batches of ``batch_size``, reshuffled each epoch from ``seed``; with
    ``deterministic``, under :func:`~fusedgpt.train.trainer.deterministic_algorithms`
    (False leaves the process's setting as it is)."""

    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    lora: Optional[LoRAConfig] = None
    merge: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.merge and self.lora is None:
            raise ValueError("--merge folds LoRA adapters into the weights; it needs --lora-rank")
        check_seed(self.seed)
        self.optimization(1)  # checks the rates now, not after loading the model

    def optimization(self, total_steps: int) -> Optimization:
        """The optimizer, schedule and clipping of a run of ``total_steps`` steps: warmup,
        then a cosine to a tenth of ``lr``."""
        return Optimization(lr=self.lr, max_steps=total_steps, warmup_steps=min(self.warmup_steps, total_steps),
                            weight_decay=self.weight_decay, grad_clip=self.grad_clip)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lora"] = self.lora.to_dict() if self.lora else None
        return values


@dataclass
class Base:
    """A starting model on its device, its tokenizer, and where it came from."""

    model: GPT
    tokenizer: Any  # tiktoken.Encoding
    tokenizer_name: str
    source: str


def load_base(checkpoint: Optional[str], *, preset: str, tokenizer: Optional[str], backend: str,
              device: torch.device, seed: int) -> Base:
    """The model to fine-tune: ``checkpoint`` (see the module docstring), or a fresh
    ``preset`` model initialised from ``seed`` with the tokenizer's vocabulary."""
    from fusedgpt.model.generate import check_tokenizer_fits, load_for_generation
    from fusedgpt.model.tokenizer import get_tokenizer

    torch.manual_seed(seed)
    if checkpoint is None:
        name = tokenizer or "gpt2"
        encoding = get_tokenizer(name)
        model = build_model(config_from_preset(preset, vocab_size=encoding.n_vocab, backend=backend))
        source = f"a randomly initialised {preset!r} model (no --checkpoint)"
    else:
        model, trained_tokenizer = load_for_generation(checkpoint, backend=backend)
        name = tokenizer or trained_tokenizer or "gpt2"
        encoding = get_tokenizer(name)
        source = checkpoint
        check_tokenizer_fits(encoding, name, model.config.vocab_size)
    if "<|endoftext|>" not in encoding.special_tokens_set:
        raise ValueError(f"the tokenizer {name} has no <|endoftext|> token, which fine-tuning pads and ends texts with")
    # Stored with the result: absolute, so the model can be loaded from any working directory.
    return Base(model.to(device).train(), encoding, absolute_path(name), source)


def describe_parameters(model: torch.nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each batch of ``epoch``: a permutation drawn from
    ``(seed, epoch)`` alone, so a run is reproducible batch for batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def train(model: torch.nn.Module, cfg: FinetuneConfig, num_examples: int, batch_loss: BatchLoss,
          end_epoch: EndEpoch, *, device: torch.device, out: Path, title: str = "",
          progress: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Run ``cfg.epochs`` epochs over ``num_examples`` examples, updating the parameters of
    ``model`` that require grad; returns the number of optimizer steps and each epoch's
    record.

    ``batch_loss(indices)`` runs the forward for one batch (under autocast on CUDA) and
    returns its mean loss and sums to report; after each epoch ``end_epoch(epoch, sums,
    log)`` gets those sums added up over the epoch, evaluates (leaving the model in train
    mode or not touching it), may print through ``log`` and returns the epoch's record.
    Every step and every epoch is recorded in ``OUT/metrics.jsonl`` and plotted to
    ``OUT/loss.png`` (:class:`~fusedgpt.train.runlog.RunLog`). With ``cfg.deterministic``,
    every step and evaluation runs under :func:`~fusedgpt.train.trainer.deterministic_algorithms`,
    as a pretraining run does; the commands make no CUDA matmul before it, as cuBLAS's
    workspace setting requires.

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm (the step is not taken).
    """
    optimization = cfg.optimization(cfg.epochs * math.ceil(num_examples / cfg.batch_size))
    optimizer = optimization.optimizer(model, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, epochs = 0, []
    with RunLog(out, total_steps=optimization.max_steps, desc="fine-tuning", title=title, progress=progress,
                record_files=True) as log, deterministic_algorithms(cfg.deterministic, device):
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            sums: dict[str, float] = defaultdict(float)
            for indices in epoch_batches(num_examples, cfg.batch_size, cfg.seed, epoch):
                lr = optimization.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device):
                    loss, stats = batch_loss(indices)
                if not math.isfinite(loss.item()):
                    raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {step + 1}; stopped")
                loss.backward()
                norm = float(optimization.clip(trainable))
                if not math.isfinite(norm):  # the step would write NaN into every weight that trains
                    raise TrainingDiverged(f"non-finite gradient norm ({norm}) at step {step + 1}; stopped "
                                           "without updating the weights")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                for key, value in stats.items():
                    sums[key] += value
                log.log({"step": step, "epoch": epoch, "train_loss": loss.item(), "lr": lr, "grad_norm": norm})
                log.advance(epoch=str(epoch), loss=f"{loss.item():.3f}")
            epochs.append({"step": step, "epoch": epoch, **end_epoch(epoch, dict(sums), log)})
            log.log(epochs[-1])
    return step, epochs


def check_out(out: PathLike, command: str) -> RunLock:
    """Take the output directory for ``command`` (e.g. ``"fusedgpt finetune-classify"``):
    its lock (see :mod:`fusedgpt.io.runlock`), returned to hold for the command's life,
    once it is clear that it holds no checkpoint (as ``fusedgpt train`` refuses to write over
    one) and no file that fusedgpt did not write (see :mod:`fusedgpt.io.written`): the command
    writes its data, metrics and results there."""
    lock = RunLock(out, command)
    if ckpt.list_checkpoints(out):
        raise ValueError(f"{out} already holds a checkpoint; choose another --out or remove it")
    written.check_only_ours(out, command)
    return lock


def save(out: PathLike, step: int, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write the fine-tuned model as ``OUT/ckpt_{step}`` (atomically; no optimizer state).
    ``named_parameters`` lists a tied weight once, under its first name; non-persistent
    buffers (Llama's rotary tables) are derived from the config, not weights."""
    persistent = model.state_dict().keys()
    weights = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}
    if not ckpt.weights_finite(weights):
        raise TrainingDiverged("the fine-tuned weights hold NaN or infinite values; not saving them")
    path = ckpt.save_checkpoint(out, step, weights, None, meta, keep_last=1)
    written.record_written(out, path)
    return path


def open_finetuned(path: PathLike, task: str, *, backend: str) -> tuple[ckpt.Checkpoint, GPT]:
    """A verified fine-tuning checkpoint of ``task`` and an empty GPT of its shape (with
    its LoRA adapters, if it kept them unmerged), ready for ``load_weights``.

    Raises:
        CheckpointError: not a checkpoint, or one of another task.
    """
    checkpoint = ckpt.open_checkpoint(path)
    found = checkpoint.meta.get("task")
    if found != task:
        what = f"a fine-tuning checkpoint of task {found!r}" if found else "a pretraining checkpoint"
        raise ckpt.CheckpointError(f"{checkpoint.path} is {what}, not of task {task!r}")
    model = build_model(checkpoint.model_config(config_class_for(checkpoint.meta.get("model") or {}), backend))
    if checkpoint.meta.get("lora"):
        apply_lora(model, LoRAConfig.from_dict(checkpoint.meta["lora"]))
    return checkpoint, model.eval()


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, *, out: str, epochs: int, batch_size: int, lr: float) -> None:
    """The options both fine-tuning commands take (defaults differ per command)."""
    start = parser.add_argument_group("starting model")
    start.add_argument("--checkpoint", default=None,
                       help="a fusedgpt train checkpoint or run directory, a Hugging Face GPT-2 directory, or "
                            "gpt2/gpt2-medium/...; default: a randomly initialised --preset model")
    start.add_argument("--preset", default="tiny", choices=[*PRESETS, *LLAMA_PRESETS],
                       help="model preset without --checkpoint")
    start.add_argument("--tokenizer", default=None,
                       help="tokenizer name or ranks file (default: the checkpoint's, else gpt2)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--out", default=out, help="output directory (checkpoint, metrics, data)")
    opt.add_argument("--epochs", type=int, default=epochs, help="passes over the training examples")
    opt.add_argument("--batch-size", type=int, default=batch_size, help="examples per optimizer step")
    opt.add_argument("--lr", type=float, default=lr, help="peak learning rate (warmup, then cosine to lr/10)")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    opt.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    opt.add_argument("--seed", type=int, default=0, help="seed for the head/adapters, batch order and splits")
    opt.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    opt.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_device_arguments(parser)
    lora = parser.add_argument_group("LoRA (low-rank adapters; the base weights stay frozen)")
    lora.add_argument("--lora-rank", type=int, default=None, help="adapter rank r; enables LoRA (default: none, no LoRA)")
    lora.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha (update * alpha/r); default r")
    lora.add_argument("--lora-targets", default="attn,mlp",
                      help=f"comma-separated layers of every block: {', '.join((*GROUPS, *LAYERS))}")
    lora.add_argument("--merge", action="store_true", help="fold the adapters into the weights before saving")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    lora = None
    if args.lora_rank is not None:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        alpha = float(args.lora_rank) if args.lora_alpha is None else args.lora_alpha
        lora = LoRAConfig(args.lora_rank, alpha, targets)
    elif args.lora_alpha is not None:
        raise ValueError("--lora-alpha needs --lora-rank")
    return FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, seed=args.seed, lora=lora,
                          merge=args.merge, deterministic=args.deterministic)


def base_from_args(args: argparse.Namespace) -> Base:
    device = resolve_device(args.device)
    base = load_base(args.checkpoint, preset=args.preset, tokenizer=args.tokenizer,
                     backend=choose_backend(device, args.backend), device=device, seed=args.seed)
    print(f"start: {base.source}; tokenizer {base.tokenizer_name}; backend={base.model.config.backend}; "
          f"device {next(base.model.parameters()).device}")
    return base


def pad_sequences(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(B, T) int64: row ``i`` holds ``rows[i]`` then ``value`` up to the longest row's length."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
