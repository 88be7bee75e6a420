"""``GPTConfig``: the shape of a GPT-2-family model, its presets, and its dict form for
checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

from fusedgpt.kernels.backend import BACKENDS

# Earlier checkpoints stored ``backend`` under this name; reading them maps it.
LEGACY_BACKEND_KEY = "kernels"


@dataclasses.dataclass
class GPTConfig:
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
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A preset (see ``PRESETS``) with some fields replaced, e.g.
        ``GPTConfig.from_preset("small", vocab_size=4096)``."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        """The inverse of :meth:`to_dict`; unknown keys are an error, missing ones take
        defaults, and a ``kernels`` key (older checkpoints) is read as ``backend``."""
        values = rename_legacy_backend(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**values)


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
