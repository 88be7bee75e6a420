"""The GPT-2 language model, on the fused kernels of ``fusedgpt.kernels``.

The architecture is GPT-2's: learned token and position embeddings, pre-LN transformer
blocks (causal self-attention, then a GELU-tanh MLP, each added to the residual stream), a
final LayerNorm and an output head tied to the token embedding. Parameter names follow
Hugging Face's ``GPT2LMHeadModel`` so weights map one to one (see ``hf.py``).

Each residual add is fused with the LayerNorm that follows it (``add_layer_norm``): a block
takes the previous branch's output and the residual stream separately, and returns its own
MLP output still un-added, so the next block (or the final LayerNorm) does add + normalise
in one pass. The loss goes through the fused linear + cross-entropy, so training never
materialises the (B, T, vocab) logits.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedgpt.kernels import (
    add_layer_norm, flash_attention, flash_attention_qkvpacked, layer_norm, linear_cross_entropy,
)
from fusedgpt.model import hf
from fusedgpt.model.config import GPTConfig

Tensor = torch.Tensor


def causal_attention(qkv: Tensor, cache: Optional[KVCache], layer: int, *, dropout_p: float, backend: str,
                     packed: Optional[PackedSequences] = None) -> Tensor:
    """Causal softmax attention of the heads of qkv (B, T, 3, H, D) -> (B, H, T, D).

    With a KV cache, this step's keys and values are appended to the layer's cached ones,
    and the mask is bottom-right aligned: the last query sees every key. With ``packed``
    (B = 1), each sequence attends only within itself.
    """
    if cache is None:
        # One packed tensor in and one packed gradient out: the backward writes dq, dk, dv
        # in place, where three separate ones would be stacked into qkv's gradient.
        varlen = {} if packed is None else dict(cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
        return flash_attention_qkvpacked(qkv, causal=True, dropout_p=dropout_p, backend=backend, **varlen)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    k, v = cache.update(layer, k, v)
    return flash_attention(q, k, v, causal=True, dropout_p=dropout_p, backend=backend)


def language_model_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor, *, backend: str) -> Tensor:
    """Mean cross-entropy of ``hidden @ head_weight.T`` (never built in full) against
    ``targets``; hidden (N, C), head_weight (V, C), targets (N,) int64, -100 = ignored."""
    dtype = matmul_dtype(hidden)
    if dtype is not None:
        # The head matmul in the autocast dtype, as autocast would run an nn.Linear. An fp32
        # (master) weight goes in as it is: the op casts it once for its matmuls and returns
        # its gradient in fp32 from its fp32 accumulator, where a cast here would round that
        # gradient to the autocast dtype on the way back and cast it up again.
        hidden = hidden.to(dtype)
        if head_weight.dtype != torch.float32:
            head_weight = head_weight.to(dtype)
    return linear_cross_entropy(hidden, head_weight, targets, ignore_index=-100, backend=backend)


def matmul_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype the next matmul takes under autocast (None outside it). Under autocast the
    residual stream stays fp32 and a branch comes out in the autocast dtype; the norms add
    them in fp32, keep the sum fp32 and write their output directly in this dtype, so
    nothing is cast around them."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class LayerNorm(nn.Module):
    """LayerNorm over the last dim that first adds a pending branch output into the residual
    stream. ``forward(x, residual)`` returns ``(layer_norm(x + residual), x + residual)``;
    with ``residual=None``, x itself is the stream."""

    def __init__(self, n_embd: int, bias: bool, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.backend = backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        out_dtype = matmul_dtype(x)
        if residual is None:
            return layer_norm(x, self.weight, self.bias, out_dtype=out_dtype, backend=self.backend), x
        return add_layer_norm(x, residual, self.weight, self.bias, out_dtype=out_dtype, backend=self.backend)


class KVCache:
    """Keys and values of the positions seen so far, for decoding a few tokens at a time.

    Per layer, (B, H, max_length, D) buffers are allocated on first use in the keys' dtype
    (bf16 under autocast) and filled in place; ``length`` positions hold values. The model
    writes through :meth:`update` and moves ``length`` on once per forward.
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0
        self._keys: dict[int, Tensor] = {}
        self._values: dict[int, Tensor] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, D) at positions ``[length, length + T)`` of ``layer``; return
        the keys and values of every position so far, (B, H, length + T, D)."""
        end = self.length + k.shape[2]
        if layer not in self._keys:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self._keys[layer], self._values[layer] = k.new_empty(shape), v.new_empty(shape)
        keys, values = self._keys[layer], self._values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def reset(self) -> None:
        self.length = 0


class PackedSequences:
    """Sequences packed back to back in one row: their offsets for the attention's
    variable-length path and each token's position within its own sequence."""

    def __init__(self, cu_seqlens: Tensor, positions: Tensor, max_seqlen: int):
        self.cu_seqlens, self.positions, self.max_seqlen = cu_seqlens, positions, max_seqlen

    @classmethod
    def of(cls, cu_seqlens: Tensor, idx: Tensor, cache: Optional[KVCache]) -> "PackedSequences":
        if cache is not None:
            raise ValueError("cu_seqlens (packed sequences) cannot be used with a KV cache")
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            raise ValueError(f"packed sequences need idx of shape (1, total), got {getattr(idx, 'shape', idx)!r}")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError(f"cu_seqlens must be an int32 (N + 1,) tensor, got "
                            f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
        if idx.shape[0] != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 \
                or int(cu_seqlens[-1]) != idx.shape[1]:
            raise ValueError(f"packed sequences need idx of shape (1, total) and cu_seqlens rising from 0 "
                             f"to total; got idx {tuple(idx.shape)}, cu_seqlens {cu_seqlens.tolist()}")
        lengths = cu_seqlens.diff()
        if bool((lengths < 1).any()):
            raise ValueError(f"cu_seqlens must rise strictly (no empty sequence), got {cu_seqlens.tolist()}")
        cu_seqlens = cu_seqlens.to(idx.device)
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.to(idx.device).long())
        positions = torch.arange(idx.shape[1], device=idx.device) - starts
        return cls(cu_seqlens, positions, int(lengths.max()))

    def attention_arguments(self) -> dict:
        """``flash_attention``'s variable-length arguments (queries and keys alike)."""
        return dict(cu_seqlens_q=self.cu_seqlens, cu_seqlens_k=self.cu_seqlens,
                    max_seqlen_q=self.max_seqlen, max_seqlen_k=self.max_seqlen)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.backend = config.backend
        self.layer = layer

    def forward(self, x: Tensor, cache: Optional[KVCache], packed: Optional[PackedSequences]) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        y = causal_attention(qkv, cache, self.layer, dropout_p=self.dropout if self.training else 0.0,
                             backend=self.backend, packed=packed)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.backend)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.backend)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, residual: Optional[Tensor], cache: Optional[KVCache], packed: Optional[PackedSequences]
    ) -> tuple[Tensor, Tensor]:
        """x: the previous branch's output, not yet in the residual stream (or the stream
        itself when ``residual`` is None). Returns this block's MLP output and the stream."""
        normed, residual = self.ln_1(x, residual)
        x = self.attn(normed, cache, packed)
        normed, residual = self.ln_2(x, residual)
        return self.mlp(normed), residual


class GPT(nn.Module):
    """A GPT-2-family language model (see :class:`GPTConfig`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.context_length, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, config.bias, config.backend),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection starts smaller, so the stream's
        # variance does not grow with depth (2 branches per layer).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: Tensor,
        targets: Optional[Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        last_only: bool = False,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """Logits, or the loss when ``targets`` are given.

        Args:
            idx: (B, T) int64 token ids in ``[0, vocab_size)``; ``T`` plus the positions
                already in ``cache`` at most ``context_length``.
            targets: (B, T) int64, the token that should follow each position, -100 where
                no loss is wanted; or None.
            cache: a :class:`KVCache`: ``idx`` continues the sequence it holds, and its keys
                and values are appended.
            last_only: return only the last position's logits (what decoding needs).
            cu_seqlens: packed sequences (no padding): idx is (1, total) holding N sequences
                back to back, sequence n at ``cu_seqlens[n] .. cu_seqlens[n + 1]`` (int32
                (N + 1,) offsets from 0 to total). Each attends only within itself and counts
                its positions from 0, so the result equals running the sequences one by one.
                Not with ``cache``.

        Returns:
            Without targets: logits (B, T, vocab_size) (T = 1 with ``last_only``), in the
            head's compute dtype; padded vocabulary rows are never included. With targets:
            the scalar mean cross-entropy over the positions not ignored, fp32.
        """
        start = cache.length if cache is not None else 0
        packed = None if cu_seqlens is None else PackedSequences.of(cu_seqlens, idx, cache)
        # A packed row may be longer than the context; each of its sequences may not, so the
        # context check sees the row as ending at the longest sequence's length.
        self._check_inputs(idx, targets, start if packed is None else packed.max_seqlen - idx.shape[1])
        B, T = idx.shape
        positions = torch.arange(start, start + T, device=idx.device) if packed is None else packed.positions
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        residual = None
        for block in self.transformer.h:
            x, residual = block(x, residual, cache, packed)
        x, _ = self.transformer.ln_f(x, residual)
        if cache is not None:
            cache.advance(T)

        vocab = self.config.vocab_size
        if targets is not None:
            head = self.lm_head.weight
            if head.shape[0] != vocab:
                # Padded rows stay out of the softmax. Only then: the slice's backward writes
                # a whole (padded V) x C gradient, zeros and all.
                head = head[:vocab]
            return language_model_loss(x.reshape(B * T, -1), head, targets.reshape(B * T), backend=self.config.backend)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)[..., :vocab]

    def _check_inputs(self, idx: Tensor, targets: Optional[Tensor], start: int) -> None:
        if not isinstance(idx, Tensor):
            raise TypeError(f"GPT: idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype != torch.long:
            raise TypeError(f"GPT: idx must be int64 (torch.long) token ids, got {idx.dtype}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"GPT: idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if start + idx.shape[1] > self.config.context_length:
            raise ValueError(
                f"GPT: idx has {idx.shape[1]} positions after {start} cached ones, more than the "
                f"context length {self.config.context_length}"
            )
        # A data-dependent check would break a torch.compile graph; compiled training runs
        # on data that the loader already checked.
        if not torch.compiler.is_compiling() and idx.numel():
            low, high = idx.min().item(), idx.max().item()
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"GPT: idx holds token ids in [{low}, {high}], outside [0, {self.config.vocab_size})"
                )
        if targets is not None:
            if not isinstance(targets, Tensor) or targets.dtype != torch.long:
                raise TypeError(f"GPT: targets must be an int64 torch.Tensor, got {getattr(targets, 'dtype', type(targets))}")
            if targets.shape != idx.shape:
                raise ValueError(f"GPT: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once. ``non_embedding`` leaves out the token
        and position embedding tables (and so the tied head), as in scaling-law counts."""
        count = sum(p.numel() for p in self.parameters())
        if non_embedding:
            count -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return count

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "GPT":
        """A model with Hugging Face GPT-2 weights, in eval mode.

        Args:
            path: a directory holding ``config.json`` and ``model.safetensors`` (or sharded
                safetensors, or ``pytorch_model.bin``), or one of the names ``gpt2``,
                ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, fetched through
                ``huggingface_hub`` where it is installed and the network allows.
            overrides: GPTConfig fields that do not change the weights' shapes, e.g.
                ``backend="torch"``, ``dropout=0.1``, ``pad_vocab_multiple=64``.
        """
        config, state = hf.load(path, **overrides)
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` and ``model.safetensors`` in Hugging Face's GPT-2 format, which
        ``transformers.GPT2LMHeadModel.from_pretrained(path)`` loads to the same logits."""
        hf.save(self.config, self.state_dict(), path)
