"""Low-rank adaptation (LoRA, Hu et al. 2021) of the GPT's linear layers.

A chosen ``nn.Linear`` with weight ``W`` (out, in) gets two small matrices, ``A`` (r, in)
and ``B`` (out, r), and computes

    y = x W^T + b + (alpha / r) * (x A^T) B^T

with ``W`` and ``b`` frozen. ``B`` starts at zero, so an adapted model starts out as the
model it adapts; ``A`` starts like a default ``nn.Linear`` weight (Kaiming-uniform). Per
adapted layer that is ``r * (in + out)`` trainable numbers instead of ``in * out``.

:class:`LoRALinear` *is* an ``nn.Linear`` holding the original ``weight`` and ``bias``
Parameters under their original names, plus ``lora_A`` and ``lora_B``: a state dict of an
adapted model is the base model's state dict plus ``*.lora_A`` / ``*.lora_B`` entries, and
after :func:`merge_lora` (``W <- W + (alpha / r) B A``) it is exactly a plain GPT's, so
``GPT.save_pretrained`` writes an ordinary GPT-2 directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

# Target names accepted by --lora-targets: a group, or one linear layer of every block.
LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GROUPS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}


@dataclass(frozen=True)
class LoRAConfig:
    """Rank ``rank``, scale ``alpha / rank``, on the layers named by ``targets`` (each a
    :data:`GROUPS` key or a :data:`LAYERS` entry) in every transformer block."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("attn", "mlp")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one layer")
        unknown = [t for t in self.targets if t not in GROUPS and t not in LAYERS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {', '.join((*GROUPS, *LAYERS))}")

    @property
    def layers(self) -> tuple[str, ...]:
        """The targets with groups expanded, in block order, each once."""
        chosen = {layer for t in self.targets for layer in GROUPS.get(t, (t,))}
        return tuple(layer for layer in LAYERS if layer in chosen)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        return cls(int(values["rank"]), float(values["alpha"]), tuple(values["targets"]))


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``rank`` update scaled by ``alpha / rank``.

    Input (..., in_features) -> output (..., out_features), in the input's dtype (or the
    autocast dtype). ``weight`` and ``bias`` are the adapted layer's own Parameters (shared,
    not copied).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        # nn.Linear.__init__ would allocate and initialise a weight only to drop it.
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function, with ``W + scaling * B A``
        (summed in fp32, stored in the weight's dtype)."""
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
            weight = (self.weight.float() + delta).to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _blocks(model: nn.Module) -> Iterable[nn.Module]:
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(transformer, "h"):
        raise TypeError(f"LoRA applies to a GPT (with .transformer.h blocks), got {type(model).__name__}")
    return transformer.h


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, name = path.split(".")
    setattr(getattr(block, parent_name), name, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model`` (a :class:`fusedgpt.model.gpt.GPT`) and wrap the
    chosen linear layers of every block in a trainable :class:`LoRALinear`, in place.

    Returns the names of the adapted layers (e.g. ``transformer.h.0.attn.c_attn``).
    Raises ValueError when a layer is already adapted.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for index, block in enumerate(_blocks(model)):
        for path in config.layers:
            layer = block.get_submodule(path)
            name = f"transformer.h.{index}.{path}"
            if isinstance(layer, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            _replace(block, path, LoRALinear(layer, config.rank, config.alpha))
            adapted.append(name)
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter of ``model`` into its weight (in place), leaving plain
    ``nn.Linear`` layers; returns how many were merged."""
    merged = 0
    for block in _blocks(model):
        for path in LAYERS:
            layer = block.get_submodule(path)
            if isinstance(layer, LoRALinear):
                _replace(block, path, layer.merged())
                merged += 1
    return merged


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
