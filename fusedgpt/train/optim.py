"""The optimisation pretraining and fine-tuning share: AdamW with weight decay on matrices
only, a linear warmup then a cosine decay of the learning rate, and gradient clipping."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import torch

# Rates are applied to float32 weights: a larger one is infinite there.
MAX_RATE = float(torch.finfo(torch.float32).max)


@dataclasses.dataclass(frozen=True)
class Optimization:
    """How a run updates its weights over ``max_steps`` optimizer steps.

    Attributes:
        lr: the peak learning rate, reached after ``warmup_steps`` steps.
        min_lr: where the cosine ends at ``max_steps``; None = ``lr / 10``.
        weight_decay: AdamW's, on matrices (dim >= 2) only.
        grad_clip: the largest gradient norm a step applies; 0 = no clipping.
    """

    lr: float
    max_steps: int
    warmup_steps: int = 0
    min_lr: Optional[float] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name, least in (("max_steps", 1), ("warmup_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not 0 < self.lr <= MAX_RATE or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need 0 < lr <= {MAX_RATE:.3g} (the optimizer applies it in float32) and "
                             f"0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.grad_clip <= math.inf or not 0 <= self.weight_decay <= MAX_RATE:
            raise ValueError(f"grad_clip and weight_decay must be non-negative numbers, got grad_clip={self.grad_clip}, "
                             f"weight_decay={self.weight_decay}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``
        over ``warmup_steps`` steps, then a cosine to ``min_lr`` at ``max_steps``."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)

    def optimizer(self, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
        """AdamW over the parameters of ``model`` that train, with weight decay on matrices
        (linear weights, embeddings) only -- biases and LayerNorm gains keep their scale --
        fused on CUDA."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        extra = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=self.lr, betas=(self.beta1, self.beta2), **extra)

    def clip(self, params: Iterable[torch.Tensor]) -> torch.Tensor:
        """Scale the gradients of ``params`` down to norm ``grad_clip`` (when clipping);
        returns their norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
