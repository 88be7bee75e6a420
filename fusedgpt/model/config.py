"""``GPTConfig``: the shape of a GPT-2-family model, its presets, and its dict form for
checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fusedgpt.kernels.backend import BACKENDS

# Earlier checkpoints stored ``backend`` under this name; reading them maps it.
LEGACY_BACKEND_KEY = "kernels"


class ConfigDict:
    """What the model configs share: presets, and a dict form for checkpoints and
    ``config.json``. A subclass is a dataclass and names its preset table in ``presets()``."""

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """A preset with some fields replaced, e.g. ``GPTConfig.from_preset("small", vocab_size=4096)``."""
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"{cls.__name__}: unknown preset {name!r}; presets: {', '.join(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """The inverse of :meth:`to_dict`; unknown keys are an error, missing ones take
        defaults, and a ``kernels`` key (older checkpoints) is read as ``backend``."""
        values = rename_legacy_backend(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass
class GPTConfig(ConfigDict):
    """Hyperparameters of a GPT-2-family model (defaults: GPT-2 124M).

    Attributes:
        vocab_size: tokens the model knows; token ids must lie in ``[0, vocab_size)``.
        context_length: the most positions the model can attend over (learned positions).
        n_layer, n_head, n_embd: depth, attention heads, width; ``n_embd % n_head == 0``.
        dropout: on embeddings, attention probabilities and residual branches (training only).
        bias: biases in the linear layers and LayerNorms (GPT-2 has them).
        tie_weights: the output head shares the token embedding matrix (GPT-2 does).
        pad_vocab_multiple: round the embedding/head rows up to a multiple of this (64 gives
            tensor-core-friendly shapes); padded rows are never returned as logits and never
            enter the loss. 1 means no padding.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, passed as ``backend=`` to every
            fused op the model calls (see :mod:`fusedgpt.kernels.backend`).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    pad_vocab_multiple: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GPTConfig: backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: ``vocab_size`` rounded up to ``pad_vocab_multiple``."""
        multiple = self.pad_vocab_multiple
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS

def rename_legacy_backend(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with an older ``kernels`` key renamed ``backend`` (a ``backend`` key, when
    both are there, wins: it is the newer)."""
    if LEGACY_BACKEND_KEY not in values:
        return values
    renamed = {k: v for k, v in values.items() if k != LEGACY_BACKEND_KEY}
    renamed.setdefault("backend", values[LEGACY_BACKEND_KEY])
    return renamed


# The four released GPT-2 sizes (vocabulary 50257, 1024 positions), then small models for CPU
# work: ``tiny`` for tests and smoke runs; ``mini``, the model ``fusedgpt train`` trains by
# default, kept narrow and short because with GPT-2's 50,257-token vocabulary the output head
# is most of the work on a CPU; ``small`` for a longer CPU run (head dim 64, as GPT-2's, so it
# exercises the same attention kernels).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, context_length=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, context_length=128),
    "small": dict(n_layer=6, n_head=4, n_embd=256, context_length=256),
}


@dataclasses.dataclass
class LlamaConfig(ConfigDict):
    """Hyperparameters of a Llama-family model: Llama 3 and Qwen3 (defaults: ``llama-tiny``).

    Attributes:
        vocab_size: tokens the model knows; token ids must lie in ``[0, vocab_size)``.
        context_length: the most positions the model attends over (the rotary table's length).
        n_layer, n_head, n_embd: depth, query heads, width.
        n_kv_head: key/value heads, dividing ``n_head`` (grouped-query attention; 1 is
            multi-query, ``n_head`` is plain multi-head).
        head_dim: features per head; ``n_head * head_dim`` may differ from ``n_embd`` (Qwen3).
        intermediate_size: width of the SwiGLU MLP's hidden layer.
        rope_theta: the rotary frequency base.
        rope_scaling: None, or Hugging Face's ``rope_scaling`` dict of ``rope_type`` "llama3"
            (``factor``, ``low_freq_factor``, ``high_freq_factor``,
            ``original_max_position_embeddings``), see :func:`fusedgpt.kernels.rotary_cache`.
        rms_eps: the RMSNorms' epsilon.
        qk_norm: RMSNorm over each query and key head before the rotation (Qwen3).
        tie_weights: the output head shares the token embedding matrix.
        sliding_window: every layer's query sees only this many most recent keys; None: all.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, passed to every fused op.
    """

    vocab_size: int = 50257
    context_length: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    head_dim: int = 32
    intermediate_size: int = 352
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rms_eps: float = 1e-5
    qk_norm: bool = False
    tie_weights: bool = True
    sliding_window: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig: {name} must be a positive int, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig: n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even (rotary pairs), got {self.head_dim}")
        for name in ("rope_theta", "rms_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig: {name} must be a number > 0, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise TypeError(f"LlamaConfig: rope_scaling must be None or a dict, got {self.rope_scaling!r}")
        for name in ("qk_norm", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LlamaConfig: {name} must be a bool, got {getattr(self, name)!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"LlamaConfig: sliding_window must be None or a positive int, got {window!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"LlamaConfig: backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head (no padding in this family; GPTConfig's name)."""
        return self.vocab_size

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return LLAMA_PRESETS

def _llama3_scaling(factor: float) -> dict[str, Any]:
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


_LLAMA3 = dict(vocab_size=128256, context_length=131072, n_kv_head=8, rope_theta=500000.0, rms_eps=1e-5)
_QWEN3 = dict(vocab_size=151936, context_length=40960, n_layer=28, n_head=16, n_kv_head=8, head_dim=128,
              rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True, tie_weights=True)

# The published shapes (each model's config.json on the Hugging Face Hub), then CPU-sized
# models on GPT-2's BPE (vocabulary 50257) for tests and smoke runs.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(_LLAMA3, n_layer=16, n_head=32, n_embd=2048, head_dim=64, intermediate_size=8192,
                        rope_scaling=_llama3_scaling(32.0), tie_weights=True),
    "llama3.2-3b": dict(_LLAMA3, n_layer=28, n_head=24, n_embd=3072, head_dim=128, intermediate_size=8192,
                        rope_scaling=_llama3_scaling(32.0), tie_weights=True),
    "llama3.1-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_embd=4096, head_dim=128, intermediate_size=14336,
                        rope_scaling=_llama3_scaling(8.0), tie_weights=False),
    "qwen3-0.6b": dict(_QWEN3, n_embd=1024, intermediate_size=3072),
    "qwen3-1.7b": dict(_QWEN3, n_embd=2048, intermediate_size=6144),
    "llama-tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, head_dim=32, intermediate_size=352,
                       context_length=128, rope_theta=500000.0, rms_eps=1e-5, tie_weights=True),
    "qwen3-tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, head_dim=64, intermediate_size=384,
                       context_length=128, rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True, tie_weights=True),
}


def config_from_preset(name: str, **overrides: Any) -> "GPTConfig | LlamaConfig":
    """The config of any preset, GPT-2 (``PRESETS``) or Llama family (``LLAMA_PRESETS``)."""
    if name in LLAMA_PRESETS:
        return LlamaConfig.from_preset(name, **overrides)
    if name in PRESETS:
        return GPTConfig.from_preset(name, **overrides)
    raise ValueError(f"unknown preset {name!r}; presets: {', '.join([*PRESETS, *LLAMA_PRESETS])}")


def config_class_for(values: dict[str, Any]) -> "type[GPTConfig] | type[LlamaConfig]":
    """The config class of a stored ``to_dict()``: only the Llama family has ``n_kv_head``."""
    return LlamaConfig if "n_kv_head" in values else GPTConfig
