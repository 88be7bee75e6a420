"""Low-rank adaptation (LoRA, Hu et al. 2021) of the linear layers of a GPT-2 or a
Llama-family model.

A chosen ``nn.Linear`` with weight ``W`` (out, in) gets two small matrices, ``A`` (r, in)
and ``B`` (out, r), and computes

    y = x W^T + b + (alpha / r) * (x A^T) B^T

with ``W`` and ``b`` frozen. ``B`` starts at zero, so an adapted model starts out as the
model it adapts; ``A`` starts like a default ``nn.Linear`` weight (Kaiming-uniform). Per
adapted layer that is ``r * (in + out)`` trainable numbers instead of ``in * out``.

:class:`LoRALinear` *is* an ``nn.Linear`` holding the original ``weight`` and ``bias``
Parameters under their original names, plus ``lora_A`` and ``lora_B``: a state dict of an
adapted model is the base model's state dict plus ``*.lora_A`` / ``*.lora_B`` entries, and
after :func:`merge_lora` (``W <- W + (alpha / r) B A``) it is exactly a plain model's, so
``save_pretrained`` writes an ordinary GPT-2 (or Llama / Qwen3) directory.

Each family names its layers its own way (:data:`FAMILIES`): GPT-2's targets are
``attn.c_attn`` .. ``mlp.c_proj``, Llama's are Hugging Face's ``q_proj`` .. ``down_proj``;
the groups ``attn`` and ``mlp`` mean the attention's or the MLP's layers in either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and the linear layers LoRA can adapt in each:
    ``layers`` maps a target name to the layer's path within a block, in block order."""

    name: str
    blocks: str
    layers: dict[str, str]

    def groups(self) -> dict[str, tuple[str, ...]]:
        """``attn`` and ``mlp``: the target names of the layers under each branch."""
        return {group: tuple(t for t, path in self.layers.items() if path.split(".")[0] in branches)
                for group, branches in (("attn", ("attn", "self_attn")), ("mlp", ("mlp",)))}


FAMILIES = (
    Family("GPT-2", "transformer.h", {name: name for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}),
    Family("Llama", "model.layers", {name: f"{branch}.{name}" for branch, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for name in names}),
)
# Target names accepted by --lora-targets: a group, or one linear layer (of its family) of every block.
GROUPS = ("attn", "mlp")
LAYERS = tuple(name for family in FAMILIES for name in family.layers)


@dataclass(frozen=True)
class LoRAConfig:
    """Rank ``rank``, scale ``alpha / rank``, on the layers named by ``targets`` (each a
    :data:`GROUPS` entry or a :data:`LAYERS` one of the adapted model's family) in every
    transformer block."""

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

    def layers(self, family: Family) -> tuple[str, ...]:
        """The paths within a block of ``family`` of the targets, groups expanded, in block
        order, each once. Raises ValueError for a layer name of another family."""
        foreign = [t for t in self.targets if t not in GROUPS and t not in family.layers]
        if foreign:
            raise ValueError(f"LoRA targets {foreign} are not layers of a {family.name} model; "
                             f"choose from {', '.join((*GROUPS, *family.layers))}")
        groups = family.groups()
        chosen = {name for t in self.targets for name in groups.get(t, (t,))}
        return tuple(path for name, path in family.layers.items() if name in chosen)

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


def _family(model: nn.Module) -> tuple[Family, nn.ModuleList]:
    """The family of ``model`` and its blocks."""
    for family in FAMILIES:
        try:
            return family, model.get_submodule(family.blocks)
        except AttributeError:
            continue
    raise TypeError(f"LoRA applies to a GPT (blocks at .transformer.h) or a Llama (blocks at .model.layers), "
                    f"got {type(model).__name__}")


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, name = path.split(".")
    setattr(getattr(block, parent_name), name, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model`` (a :class:`fusedgpt.model.gpt.GPT` or a
    :class:`fusedgpt.model.llama.Llama`) and wrap the chosen linear layers of every block in
    a trainable :class:`LoRALinear`, in place.

    Returns the names of the adapted layers (e.g. ``transformer.h.0.attn.c_attn``,
    ``model.layers.0.self_attn.q_proj``). Raises ValueError when a layer is already adapted
    or a target names a layer of another family, TypeError for a model of neither family.
    """
    family, blocks = _family(model)
    paths = config.layers(family)
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for index, block in enumerate(blocks):
        for path in paths:
            layer = block.get_submodule(path)
            name = f"{family.blocks}.{index}.{path}"
            if isinstance(layer, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            _replace(block, path, LoRALinear(layer, config.rank, config.alpha))
            adapted.append(name)
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter of ``model`` into its weight (in place), leaving plain
    ``nn.Linear`` layers; returns how many were merged."""
    family, blocks = _family(model)
    merged = 0
    for block in blocks:
        for path in family.layers.values():
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
