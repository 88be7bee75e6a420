"""``fusedgpt train``: pretraining a GPT on prepared token shards.

One optimizer step = ``grad_accum`` micro-batches per rank of ``batch_size`` random windows
of ``context_length + 1`` tokens; the loss is the mean over all of them. AdamW (fused on
CUDA) decays matrices only; the learning rate warms up linearly for ``warmup_steps`` and
then follows a cosine down to ``min_lr`` at ``max_steps``; gradients are clipped to
``grad_clip``. On CUDA the forward runs under bf16 autocast over fp32 master weights.

Reproducibility: everything a step draws from -- the training windows (a function of the
seed and the step), the weights, the optimizer state and the RNG states -- is in the
checkpoint, and evaluation and sampling use their own generators, so a run resumed from
step ``s`` is bitwise the run that never stopped (on the same machine and software). On a
GPU that takes ``deterministic``: by default the Triton attention backward adds dQ with
atomics, whose last bits vary from run to run (see :func:`deterministic_algorithms`).

Configuration, lowest precedence first: :class:`TrainConfig`'s defaults (the embedded
Shakespeare job), the stored configuration of the run being resumed, a TOML file
(top-level keys are ``TrainConfig`` fields; a ``[model]`` table overrides ``GPTConfig``
fields of the preset), then command-line flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from fusedgpt.hardware import add_device_arguments, autocast, bf16_peak_flops, choose_backend
from fusedgpt.kernels.backend import BACKENDS
from fusedgpt.model import build_model
from fusedgpt.model.config import (LLAMA_PRESETS, PRESETS, GPTConfig, LlamaConfig, config_class_for, config_from_preset,
                                   rename_legacy_backend)
from fusedgpt.model.gpt import GPT
from fusedgpt.model.llama import Llama
from fusedgpt.io import checkpoint as ckpt
from fusedgpt.io.runlock import RunLock
from fusedgpt.train import data as data_mod
from fusedgpt.train import distributed
from fusedgpt.train.optim import Optimization
from fusedgpt.train.runlog import RunLog

# Seeds feed numpy's and torch's generators, which take non-negative integers of bounded size.
MAX_SEED = 2**32


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. The defaults are the embedded job: the
    ``mini`` preset on the bundled Shakespeare, sized to train on a 2-core CPU in under ten
    minutes.

    Attributes:
        preset: a :data:`fusedgpt.model.config.PRESETS` name.
        model: GPTConfig fields that override the preset's.
        data: a prepared directory, a text/JSONL file prepared on the fly into
            ``OUT/data``, or None for the bundled Shakespeare.
        context_length: tokens per window; None = the model's (the preset's, unless
            ``model`` sets it).
        min_lr: end of the cosine; None = ``lr / 10``.
        save_every: 0 = only at the end (and on Ctrl-C).
        backend: None = ``"auto"`` on CUDA, ``"torch"`` (the reference ops) on CPU: the Triton
            interpreter is for verification and far too slow to train with.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (one process only; under
            torchrun every process takes ``cuda:LOCAL_RANK``).
        deterministic: train under :func:`deterministic_algorithms`, bitwise reproducible on
            a GPU too; False leaves the process's setting as it is.
    """

    preset: str = "mini"
    model: dict = dataclasses.field(default_factory=dict)
    data: Optional[str] = None
    out: str = "runs/shakespeare"
    tokenizer: str = "gpt2"
    val_fraction: float = 0.005
    max_steps: int = 300
    batch_size: int = 16
    context_length: Optional[int] = None
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: Optional[float] = None
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0
    keep_last: int = 2
    seed: int = 1337
    backend: Optional[str] = None
    device: str = "auto"
    resume: bool = False
    compile: bool = False
    fsdp: bool = False
    deterministic: bool = False
    sample_tokens: int = 48
    sample_prompt: str = "\n"
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS and self.preset not in LLAMA_PRESETS:
            raise ValueError(f"preset must be one of {', '.join([*PRESETS, *LLAMA_PRESETS])}, got {self.preset!r}")
        if not isinstance(self.model, dict):
            raise TypeError(f"model must be a table of GPTConfig fields, got {type(self.model).__name__}")
        positive = ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "keep_last", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.context_length is not None and (not isinstance(self.context_length, int) or self.context_length < 1):
            raise ValueError(f"context_length must be a positive integer, got {self.context_length!r}")
        check_seed(self.seed)
        self.optimization()  # checks the rates now, not after loading the data and the model
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def optimization(self) -> Optimization:
        """This run's optimizer, learning-rate schedule and clipping."""
        return Optimization(lr=self.lr, max_steps=self.max_steps, warmup_steps=self.warmup_steps, min_lr=self.min_lr,
                            weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2, grad_clip=self.grad_clip)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "configuration") -> "TrainConfig":
        """``values`` as a config; unknown keys are an error, and a ``kernels`` key (the
        configuration stored by older checkpoints) is read as ``backend``."""
        values = rename_legacy_backend(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training options {unknown}; known: {sorted(known)}")
        return cls(**values)


def check_seed(seed: Any) -> None:
    """Raises ValueError unless ``seed`` is an int in [0, 2**32)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def flops_per_token(model: "GPT | Llama", context_length: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward + backward), the output
    head included, plus attention's ``12 * n_layer * T * n_embd`` (PaLM, appendix B)."""
    config = model.config
    matmul_params = model.num_parameters(non_embedding=True)
    if config.tie_weights:  # the head shares the (uncounted) embedding matrix but is a matmul
        matmul_params += config.padded_vocab_size * config.n_embd
    return 6.0 * matmul_params + 12.0 * config.n_layer * context_length * config.n_head * config.head_dim


def model_config(cfg: TrainConfig, vocab_size: int, backend: str) -> "GPTConfig | LlamaConfig":
    """The model ``cfg`` describes: its preset with ``cfg.model`` and ``cfg.context_length``
    applied, for the data's vocabulary, on ``backend``."""
    overrides = {"vocab_size": vocab_size, **cfg.model, "backend": backend}
    if cfg.context_length is not None:
        overrides["context_length"] = cfg.context_length
    return config_from_preset(cfg.preset, **overrides)


def check_resumable(requested: "GPTConfig | LlamaConfig", checkpoint: ckpt.Checkpoint) -> None:
    """Refuse to resume ``checkpoint`` as a model other than the one it holds.

    Raises:
        ValueError: naming every setting in which ``requested`` differs from the checkpoint's model.
    """
    stored = checkpoint.model_config(config_class_for(checkpoint.meta.get("model") or {}), requested.backend)
    if type(stored) is not type(requested):
        raise ValueError(f"--resume continues {checkpoint.path}, a {type(stored).__name__} model, but the "
                         f"configuration asks for a {type(requested).__name__}: start a new run in another --out")
    differences = [
        f"{field.name} {getattr(requested, field.name)!r} (the checkpoint has {getattr(stored, field.name)!r})"
        for field in dataclasses.fields(stored)
        if getattr(requested, field.name) != getattr(stored, field.name)
    ]
    if differences:
        raise ValueError(
            f"--resume continues {checkpoint.path}, but the configuration asks for another model: "
            f"{'; '.join(differences)}. Resume without changing the model (vocab_size comes from the "
            "data's tokenizer), or start a new run in another --out"
        )


# The --deterministic flag of training and fine-tuning.
DETERMINISTIC_HELP = ("bitwise reproducible on a GPU too: torch.use_deterministic_algorithms (no atomics in the "
                      "attention backward; may be slower), and CUBLAS_WORKSPACE_CONFIG=:4096:8 where unset")
# cuBLAS workspace configurations under which its matmuls are reproducible (CUDA >= 10.2);
# PyTorch refuses a cuBLAS matmul in deterministic mode under any other.
DETERMINISTIC_CUBLAS_CONFIGS = (":4096:8", ":16:8")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """With ``enabled``, ``torch.use_deterministic_algorithms(True)`` inside the block and
    the previous setting (and its ``warn_only``) after it; without, nothing changes.

    The setting is process-wide (every thread, every model). It makes the attention
    backward take its recompute path, which sums dQ in a fixed order, instead of the fused
    one, which adds it with atomics; and PyTorch's own ops their deterministic versions
    (the embedding and gather backwards of a GPT-2 or Llama step have them). It is strict,
    not ``warn_only``: an op with no deterministic version raises, naming itself, rather
    than leave a run that claims to be reproducible and is not.

    On CUDA it also sets ``CUBLAS_WORKSPACE_CONFIG`` to ``:4096:8`` where it is unset, and
    leaves it set: cuBLAS reads it when it initialises, so the block must be entered
    before the process's first CUDA matmul (the trainer's first is inside it).

    Raises:
        ValueError: ``CUBLAS_WORKSPACE_CONFIG`` is set to a configuration that is not reproducible.
    """
    if not enabled:
        yield
        return
    if device.type == "cuda":
        config = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_CONFIGS[0])
        if config not in DETERMINISTIC_CUBLAS_CONFIGS:
            raise ValueError(f"--deterministic needs CUBLAS_WORKSPACE_CONFIG unset or one of "
                             f"{', '.join(DETERMINISTIC_CUBLAS_CONFIGS)}; it is {config!r}")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Whole tensors on the CPU: what a checkpoint stores, whatever the run's sharding.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped without taking
    that step, so the weights (and every checkpoint) are finite."""


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, so the checkpoint
    written on the way out holds a whole step. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopRequest"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self  # signals only reach the main thread
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


@dataclasses.dataclass
class RunResult:
    """What :meth:`Trainer.run` did: the step reached, why it stopped (``"done"`` or
    ``"interrupted"``), the training losses of the steps it ran, the validation losses by
    step, and the last checkpoint written."""

    step: int
    status: str
    train_losses: list[float]
    val_losses: dict[int, float]
    checkpoint: Optional[Path]


class Trainer:
    """A training run. ``Trainer(cfg).run()`` trains from scratch, or with ``cfg.resume``
    from the newest checkpoint in ``cfg.out`` that verifies: ``resume_from``, when the
    caller has opened it already (:func:`resolve_config` does), so it is read once."""

    def __init__(self, cfg: TrainConfig, dist: Optional[distributed.DistContext] = None,
                 resume_from: Optional[ckpt.Checkpoint] = None) -> None:
        self.cfg = cfg
        self.dist = dist or distributed.setup(cfg.device)
        self.device = self.dist.device
        self.out = Path(cfg.out)
        # One writer per run directory, from here to the end of run(); rank 0 writes.
        self.lock = RunLock(self.out, "fusedgpt train") if self.dist.is_main else None
        self.resume_from: Optional[ckpt.Checkpoint] = None
        if cfg.resume:
            self.resume_from = resume_from or ckpt.open_checkpoint(self.out, validate=_check_stored_config)
        elif resume_from is not None:
            raise ValueError("resume_from is the checkpoint a run with resume=True continues from; this run does not resume")
        elif ckpt.list_checkpoints(self.out):
            raise ValueError(
                f"{self.out} already holds checkpoints; pass --resume to continue that run, "
                "or choose another --out"
            )

        data_dir = self._data_dir()
        self.meta = data_mod.read_meta(data_dir)
        self.tokenizer_name = self.meta["tokenizer"]
        config = model_config(cfg, self.meta["vocab_size"], choose_backend(self.device, cfg.backend))
        if self.resume_from is not None:
            check_resumable(config, self.resume_from)
        self.context_length = config.context_length
        self.train_windows = data_mod.RandomWindows(
            data_mod.TokenStream(data_dir, "train"), cfg.batch_size, self.context_length, cfg.seed
        )
        self.val_stream = data_mod.TokenStream(data_dir, "val")
        self.val_stream.check_fits(self.context_length)

        torch.manual_seed(cfg.seed)
        self.model = build_model(config).to(self.device)
        if self.resume_from is not None:
            self.resume_from.load_weights(self.model)  # whole weights, before any sharding
        self.train_model: torch.nn.Module = self.model
        self.ddp = None
        if cfg.fsdp:
            if not self.dist.distributed:
                raise ValueError("--fsdp shards over processes: start the run with torchrun --nproc_per_node=N, N > 1")
            from torch.distributed.fsdp import fully_shard

            blocks = self.model.model.layers if isinstance(self.model, Llama) else self.model.transformer.h
            for block in blocks:
                fully_shard(block)
            fully_shard(self.model)  # in place: self.model's parameters become shards
        elif self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.train_model = self.ddp
        self.optimization = cfg.optimization()
        self.optimizer = self.optimization.optimizer(self.model, self.device)
        self.step = 0
        if self.resume_from is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            state = self.resume_from.load_state()
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=_full_state_options())
            ckpt.set_rng_state(state["rng"])
            self.step = self.resume_from.step
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.autocast = autocast(self.device)
        self.tokens_per_step = cfg.batch_size * self.context_length * cfg.grad_accum * self.dist.world_size
        self.flops_per_token = flops_per_token(self.model, self.context_length)
        self.peak_flops = bf16_peak_flops(self.device)
        self.last_checkpoint: Optional[Path] = self.resume_from.path if self.resume_from else None

    # ------------------------------------------------------------------ setup helpers

    def _data_dir(self) -> Path:
        """A prepared directory for ``cfg.data``; text is prepared on the fly into
        ``OUT/data`` by rank 0 (again only when the source or the options changed)."""
        cfg = self.cfg
        if cfg.data is not None and data_mod.is_prepared(cfg.data):
            return Path(cfg.data)
        if cfg.data is None:
            from fusedgpt.model.tokenizer import shakespeare_path

            source = shakespeare_path()
        else:
            source = Path(cfg.data)
            if not source.exists():
                raise ValueError(f"--data {cfg.data} does not exist")
        target = self.out / "data"
        if self.dist.is_main and not self._prepared_from(target, source):
            data_mod.prepare([source], target, tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction,
                             progress=cfg.progress)
        distributed.barrier()
        return target

    def _prepared_from(self, target: Path, source: Path) -> bool:
        if not data_mod.is_prepared(target):
            return False
        meta = data_mod.read_meta(target)
        files = data_mod.collect_inputs([source])
        return (
            meta.get("sources") == [str(p) for p in files]
            and meta.get("source_bytes") == sum(p.stat().st_size for p in files)
            and meta.get("tokenizer") == data_mod.absolute_path(self.cfg.tokenizer)
            and meta.get("val_fraction") == self.cfg.val_fraction
        )

    # ------------------------------------------------------------------ one step

    def micro_step_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch, through the (possibly wrapped) training model."""
        with self.autocast:
            return self.train_model(x, y)

    def train_step(self, step: int) -> tuple[float, float]:
        """Optimizer step ``step`` (0-based); returns the mean training loss over every rank's
        micro-batches and the gradient norm before clipping.

        Raises:
            TrainingDiverged: the loss or the gradient norm was not finite; the weights were
                not updated.
        """
        cfg = self.cfg
        lr = self.optimization.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.train_windows.batch(step, self.dist.rank * cfg.grad_accum + micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == cfg.grad_accum - 1
            # Gradients are only all-reduced on the last micro-batch.
            if self.cfg.fsdp:
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                loss = self.micro_step_loss(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        total = distributed.all_reduce_sum(loss_sum / cfg.grad_accum)
        mean_loss = total.item() / self.dist.world_size
        if not math.isfinite(mean_loss):
            self._diverged(f"non-finite training loss ({mean_loss}) at step {step + 1}")
        norm = self.optimization.clip(self.model.parameters())
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        # A finite loss can still have a NaN/infinite gradient (an overflow in backward):
        # clipping cannot repair it, and the step would write NaN into every weight.
        if not math.isfinite(float(norm)):
            self._diverged(f"non-finite gradient norm ({float(norm)}) at step {step + 1} (training loss {mean_loss:.4f})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, float(norm)

    def _diverged(self, what: str) -> None:
        """Stop the run before the optimizer step: the weights in memory and on disk stay finite."""
        self.optimizer.zero_grad(set_to_none=True)
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        raise TrainingDiverged(f"{what}; stopped without updating the weights; {kept}")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (at most ``eval_batches`` batches)."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in data_mod.eval_windows(self.val_stream, self.cfg.batch_size, self.context_length, self.cfg.eval_batches):
            with self.autocast:
                loss = self.model(x.to(self.device), y.to(self.device))
            total += loss.item() * y.numel()
            count += y.numel()
        self.model.train()
        return total / count

    @torch.no_grad()
    def sample(self) -> str:
        """A short continuation of ``sample_prompt``, drawn with its own seeded generator so
        the training RNG is untouched."""
        from fusedgpt.model.generate import generate
        from fusedgpt.model.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(self.tokenizer_name)
        prompt = tokenizer.encode_ordinary(self.cfg.sample_prompt) or [tokenizer.eot_token]
        idx = torch.tensor([prompt[-self.context_length :]], dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        with self.autocast:
            out = generate(self.model, idx, self.cfg.sample_tokens, temperature=0.8, top_k=200,
                           eos_id=tokenizer.eot_token, generator=generator,
                           vocab_limit=min(tokenizer.n_vocab, self.model.config.vocab_size))
        return tokenizer.decode(out[0].tolist())

    # ------------------------------------------------------------------ bookkeeping

    def save(self) -> Path:
        """Checkpoint the current step (every rank takes part: FSDP gathers the shards;
        rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        cfg = self.cfg
        if not self._weights_finite():  # never a checkpoint that generates "!!!!" or diverges on resume
            self._diverged(f"the weights hold NaN or infinite values at step {self.step}; not saving them")
        weights = get_model_state_dict(self.model, options=_full_state_options())
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=_full_state_options())
        if self.model.config.tie_weights:
            weights.pop("lm_head.weight", None)  # the token embedding, stored once
        meta = {
            "model": self.model.config.to_dict(),
            # Absolute paths, so the run can be resumed from another working directory.
            "train": {**dataclasses.asdict(cfg), "resume": False, "data": data_mod.absolute_path(cfg.data),
                      "tokenizer": data_mod.absolute_path(cfg.tokenizer)},
            "data": {
                "sampler": "random-windows",
                "seed": cfg.seed,
                "step": self.step,
                "micro_batches_per_step": cfg.grad_accum * self.dist.world_size,
                "tokens_seen": self.step * self.tokens_per_step,
            },
            "tokenizer": self.tokenizer_name,
        }
        if self.dist.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(self.out, self.step, weights, optimizer_state, meta, cfg.keep_last)
        distributed.barrier()
        self.last_checkpoint = self.out / ckpt.checkpoint_name(self.step)
        return self.last_checkpoint

    def _weights_finite(self) -> bool:
        """Whether every rank's parameters (its shards, under FSDP) are all finite."""
        local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                    for p in self.model.parameters())
        flag = torch.tensor([float(local)], device=self.device)
        return distributed.all_reduce_sum(flag).item() == self.dist.world_size

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        """Train to ``max_steps``, evaluating every ``eval_every`` steps (and at the start of
        a fresh run and at the end), checkpointing every ``save_every`` steps, at the end
        and on Ctrl-C. Only rank 0 writes files and prints. With ``cfg.deterministic``, under
        :func:`deterministic_algorithms` from start to end."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        result = RunResult(self.step, "done", [], {}, self.last_checkpoint)
        stop = _StopRequest()
        log = RunLog(self.out, total_steps=cfg.max_steps, initial_step=self.step, title=f"fusedgpt train: {cfg.preset}",
                     resumed_at=self.step if self.resume_from is not None else None, progress=cfg.progress,
                     enabled=self.dist.is_main)
        try:
            with log, stop.installed(), deterministic_algorithms(cfg.deterministic, self.device):
                log.print(self._describe())
                if self.resume_from is None:
                    self._evaluate_and_log(log, result, "initial")
                self._window_start, self._window_tokens = time.perf_counter(), 0
                while self.step < cfg.max_steps:
                    loss, norm = self.train_step(self.step)
                    self.step += 1
                    result.train_losses.append(loss)
                    self._log_step(log, loss, norm)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                        self._evaluate_and_log(log, result, "final" if self.step == cfg.max_steps else "")
                    if self.step == cfg.max_steps or (cfg.save_every and self.step % cfg.save_every == 0):
                        self.save()
                    if self._stop_requested(stop):
                        if self.last_checkpoint is None or self.last_checkpoint.name != ckpt.checkpoint_name(self.step):
                            self.save()
                        result.status = "interrupted"
                        break
        finally:
            if self.lock is not None:
                self.lock.release()
        result.step, result.checkpoint = self.step, self.last_checkpoint
        if self.dist.is_main:
            if result.val_losses:
                last = max(result.val_losses)
                print(f"validation loss {result.val_losses[last]:.4f} at step {last}")
            print(f"{result.status} at step {self.step}; checkpoint {self.last_checkpoint}; "
                  f"metrics {log.metrics_path}; plot {log.plot_path}")
        return result

    def _describe(self) -> str:
        config = self.model.config
        return (f"model: {self.model.num_parameters() / 1e6:.2f} M parameters ({config.n_layer} layers, "
                f"width {config.n_embd}, context {self.context_length}, backend={config.backend}); "
                f"{self.tokens_per_step:,} tokens per step on {self.dist.world_size} x {self.device.type}"
                f"{' (FSDP)' if self.cfg.fsdp else ' (DDP)' if self.ddp else ''}; "
                f"out: {self.out}" + (f"; resuming at step {self.step}" if self.resume_from else ""))

    def _log_step(self, log: RunLog, loss: float, norm: float) -> None:
        """Count the step just taken; every ``log_every`` steps and at the last, record it
        with the throughput since the previous record."""
        cfg = self.cfg
        self._window_tokens += self.tokens_per_step
        if self.step % cfg.log_every and self.step != cfg.max_steps:
            log.advance()
            return
        elapsed = time.perf_counter() - self._window_start
        record = {"step": self.step, "train_loss": loss, "lr": self.optimization.lr_at(self.step - 1),
                  "grad_norm": norm, "tokens": self.step * self.tokens_per_step,
                  "tokens_per_s": self._window_tokens / elapsed}
        figures = {"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if self.peak_flops:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.dist.world_size)
            figures["mfu"] = f"{100 * record['mfu']:.1f}%"
        log.log(record)
        log.advance(**figures)
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def _evaluate_and_log(self, log: RunLog, result: RunResult, label: str) -> None:
        loss = self.evaluate()
        result.val_losses[self.step] = loss
        # Sharded weights need every rank in each forward, so under FSDP all ranks sample.
        text = self.sample() if self.cfg.sample_tokens and (self.dist.is_main or self.cfg.fsdp) else ""
        perplexity = math.exp(min(loss, 50.0))
        log.log({"step": self.step, "val_loss": loss, "val_ppl": perplexity, "sample": text})
        log.print(f"step {self.step}: {label + ' ' if label else ''}validation loss {loss:.4f} (perplexity {perplexity:.1f})")
        if text:
            log.print("sample: " + text.replace("\n", "\n        "))

    def _stop_requested(self, stop: _StopRequest) -> bool:
        """Whether any rank was asked to stop (every rank must leave at the same step)."""
        if not self.dist.distributed:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.device)
        return distributed.all_reduce_sum(flag).item() > 0


# ---------------------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------------------

# (field, type, help) for every option with a flag; the flag is --field-with-dashes.
_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("preset", str, f"model preset: {', '.join([*PRESETS, *LLAMA_PRESETS])}"),
    ("data", str, "prepared directory, or a text/JSONL file prepared on the fly (default: bundled Shakespeare)"),
    ("out", str, "run directory: metrics, plot, checkpoints"),
    ("tokenizer", str, "tokenizer for on-the-fly preparation: gpt2 or a ranks file"),
    ("val_fraction", float, "validation share for on-the-fly preparation"),
    ("max_steps", int, "optimizer steps"),
    ("batch_size", int, "windows per micro-batch per process"),
    ("context_length", int, "tokens per window (default: the model's, i.e. the preset's)"),
    ("grad_accum", int, "micro-batches per optimizer step per process"),
    ("lr", float, "peak learning rate"),
    ("min_lr", float, "final learning rate (default lr/10)"),
    ("warmup_steps", int, "linear warmup steps"),
    ("weight_decay", float, "AdamW weight decay on matrices"),
    ("grad_clip", float, "clip the gradient norm to this (0: no clipping)"),
    ("eval_every", int, "evaluate every N steps"),
    ("eval_batches", int, "validation batches per evaluation"),
    ("save_every", int, "checkpoint every N steps (0: only at the end)"),
    ("keep_last", int, "checkpoints kept"),
    ("seed", int, "seed for initialisation, data order and dropout"),
    ("sample_tokens", int, "tokens sampled at each evaluation (0: none)"),
    ("sample_prompt", str, "prompt for those samples"),
    ("log_every", int, "log training metrics every N steps"),
)
_MODEL_FLAGS: tuple[tuple[str, Any], ...] = (("n_layer", int), ("n_head", int), ("n_embd", int), ("dropout", float))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps unset flags out of the namespace, so only what was typed overrides
    # the TOML file and the resumed run.
    suppress = argparse.SUPPRESS
    parser.add_argument("--config", default=None, help="TOML file of options ([model] table: GPTConfig fields; default: none)")
    defaults = TrainConfig()
    for name, kind, help_text in _FLAGS:
        if "default" not in help_text:  # the help says it where TrainConfig's default needs words
            value = getattr(defaults, name)
            help_text += f" (default: {value!r})" if isinstance(value, str) and not value.strip() else f" (default: {value})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=suppress, help=help_text)
    for name, kind in _MODEL_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest="model." + name, type=kind, default=suppress,
                            metavar=name.upper(), help=f"model {name} (default: the preset's)")
    add_device_arguments(parser, keep_unset=True)
    for name, help_text in (("resume", "continue from the newest checkpoint in --out"),
                            ("compile", "torch.compile the model"),
                            ("deterministic", DETERMINISTIC_HELP),
                            ("fsdp", "under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")):
        parser.add_argument("--" + name, dest=name, action="store_true", default=suppress, help=help_text)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=suppress, help="no progress bar")


def resolve_config(flags: dict[str, Any], config_file: Optional[str] = None) -> tuple[TrainConfig, Optional[ckpt.Checkpoint]]:
    """The run's configuration: defaults < the resumed run's < TOML file < flags; and, for
    a run that resumes, the verified checkpoint it continues from (for :class:`Trainer`'s
    ``resume_from``, so the checkpoint is read once).

    ``flags`` maps TrainConfig fields to values, and ``"model.FIELD"`` to GPTConfig overrides;
    model overrides from the TOML ``[model]`` table and flags add to the resumed run's.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            with open(config_file, "rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read --config {config_file}: {exc}") from exc
    model = dict(values.pop("model", {}))
    for key, value in flags.items():
        if key.startswith("model."):
            model[key.removeprefix("model.")] = value
        else:
            values[key] = value
    resume_from = None
    if values.get("resume"):
        out = values.get("out", TrainConfig.out)
        # Not while another process writes the run (opening it may finish an interrupted save).
        # Under torchrun only rank 0 locks, as in Trainer; the process group is not up yet.
        main_process = os.environ.get("RANK", "0") == "0"
        with RunLock(out, "fusedgpt train") if main_process and Path(out).is_dir() else contextlib.nullcontext():
            resume_from = ckpt.open_checkpoint(out, validate=_check_stored_config)
        stored = resume_from.meta["train"]
        model = {**stored.get("model", {}), **model}
        values = {**stored, **values}
    values["model"] = model
    return TrainConfig.from_dict(values, source=config_file or "configuration"), resume_from


def _check_stored_config(checkpoint: ckpt.Checkpoint) -> None:
    """A checkpoint to resume must record a usable training and model configuration; one
    whose record is damaged is passed over like any other damaged checkpoint."""
    stored = checkpoint.meta.get("train")
    if not isinstance(stored, dict):
        raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} records no training configuration")
    try:
        TrainConfig.from_dict(stored)
    except (TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} records an invalid training configuration: {exc}") from exc
    checkpoint.model_config(config_class_for(checkpoint.meta.get("model") or {}), "torch")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Optional[ckpt.Checkpoint]]:
    """What :func:`resolve_config` makes of parsed ``fusedgpt train`` arguments."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "config")}
    return resolve_config(flags, args.config)


def run(args: argparse.Namespace) -> int:
    """The ``fusedgpt train`` command: 0 when done, 130 when interrupted (a checkpoint was
    saved); errors, a diverged loss included, are raised for the CLI to report."""
    cfg, resume_from = config_from_args(args)
    dist = distributed.setup(cfg.device)
    try:
        result = Trainer(cfg, dist, resume_from=resume_from).run()
    finally:
        distributed.teardown()
    return 130 if result.status == "interrupted" else 0
