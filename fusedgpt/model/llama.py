"""The Llama family (Llama 3, Qwen3) on the fused kernels of ``fusedgpt.kernels``.

A pre-norm decoder: token embedding, then blocks of RMSNorm -> attention -> RMSNorm ->
SwiGLU MLP, each branch added to the residual stream, a final RMSNorm and an output head
(tied to the embedding or not). Attention rotates queries and keys by their positions (RoPE,
with Llama 3's frequency scaling where configured) and lets each group of query heads share
one key/value head (grouped-query attention); Qwen3 also RMS-normalises every query and key
head before the rotation. There are no position embeddings, biases or dropout. Parameter
names are Hugging Face's ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` ones, so weights map one
to one (see ``hf_llama.py``) and LoRA targets keep their usual names.

As in ``gpt.py``, each residual add is fused with the norm after it (``add_rms_norm``), the
loss goes through the fused linear + cross-entropy, and the KV cache is :class:`KVCache`
(here it holds ``n_kv_head`` heads, not ``n_head``).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
import torch.nn as nn

from fusedgpt.kernels import add_rms_norm, apply_rotary, flash_attention, rms_norm, rotary_cache, swiglu
from fusedgpt.model.config import LlamaConfig
from fusedgpt.model.gpt import GPT, KVCache, PackedSequences, language_model_loss, matmul_dtype

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm over the last dim that first adds a pending branch output into the residual
    stream: ``forward(x, residual)`` returns ``(rms_norm(x + residual), x + residual)``; with
    ``residual=None``, x itself is the stream. Under autocast the output is written in the
    autocast dtype and the stream stays fp32 (see ``gpt.LayerNorm``)."""

    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        out_dtype = matmul_dtype(x)
        if residual is None:
            return rms_norm(x, self.weight, self.eps, out_dtype=out_dtype, backend=self.backend), x
        return add_rms_norm(x, residual, self.weight, self.eps, out_dtype=out_dtype, backend=self.backend)


class HeadNorm(nn.Module):
    """Qwen3's RMSNorm over each head's features, (B, T, H, D) -> same shape and dtype."""

    def __init__(self, head_dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, q_width, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv_width, bias=False)
        self.v_proj = nn.Linear(config.n_embd, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = HeadNorm(config.head_dim, config.rms_eps, config.backend)
            self.k_norm = HeadNorm(config.head_dim, config.rms_eps, config.backend)
        self.qk_norm = config.qk_norm
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.sliding_window
        self.backend = config.backend
        self.layer = layer

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Optional[Tensor],
                cache: Optional[KVCache], packed: Optional[PackedSequences]) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, *rope, positions=positions, backend=self.backend)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, D) views, read in place
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        varlen = {} if packed is None else packed.attention_arguments()
        y = flash_attention(q, k, v, causal=True, window=self.window, backend=self.backend, **varlen)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.backend = config.backend

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_eps, config.backend)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_eps, config.backend)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, residual: Optional[Tensor], rope: tuple[Tensor, Tensor],
                positions: Optional[Tensor], cache: Optional[KVCache],
                packed: Optional[PackedSequences]) -> tuple[Tensor, Tensor]:
        """x: the previous branch's output, not yet in the residual stream (or the stream
        itself when ``residual`` is None). Returns this block's MLP output and the stream."""
        normed, residual = self.input_layernorm(x, residual)
        x = self.self_attn(normed, rope, positions, cache, packed)
        normed, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(normed), residual


class Llama(nn.Module):
    """A Llama-family language model (see :class:`LlamaConfig`); the interface is
    :class:`fusedgpt.model.gpt.GPT`'s."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.rms_eps, config.backend),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_cache(config.head_dim, config.context_length, config.rope_theta, config.rope_scaling)
        # Derived from the config, so not part of the weights (persistent=False).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Each residual branch's output projection starts smaller (2 branches per layer),
        # as in GPT-2, so the stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: Tensor,
        targets: Optional[Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        last_only: bool = False,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """Logits, or the loss when ``targets`` are given; arguments and results as
        :meth:`fusedgpt.model.gpt.GPT.forward` (idx, targets (B, T) int64; -100 ignored),
        and:

        Args:
            cu_seqlens: packed sequences (no padding): idx is (1, total) holding N sequences
                back to back, sequence n at ``cu_seqlens[n] .. cu_seqlens[n + 1]`` (int32
                (N + 1,) offsets from 0 to total). Each attends only within itself and counts
                its positions from 0, so the result equals running the sequences one by one.
                Not with ``cache``.
        """
        start = cache.length if cache is not None else 0
        packed = None if cu_seqlens is None else PackedSequences.of(cu_seqlens, idx, cache)
        # A packed row may be longer than the context; each of its sequences may not, so
        # GPT's context check sees the row as ending at the longest sequence's length.
        self._check_inputs(idx, targets, start if packed is None else packed.max_seqlen - idx.shape[1])
        B, T = idx.shape
        if packed is not None:
            positions = packed.positions
        else:  # None: token t at position t, the rotary op's default
            positions = torch.arange(start, start + T, device=idx.device) if start else None
        rope = (self.rope_cos, self.rope_sin)
        x, residual = self.model.embed_tokens(idx), None
        for block in self.model.layers:
            x, residual = block(x, residual, rope, positions, cache, packed)
        x, _ = self.model.norm(x, residual)
        if cache is not None:
            cache.advance(T)

        if targets is not None:
            return language_model_loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                       backend=self.config.backend)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    # GPT's checks of idx and targets read only ``config.vocab_size`` and ``context_length``.
    _check_inputs = GPT._check_inputs

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once; ``non_embedding`` leaves out the token
        embedding (and so a tied head)."""
        count = sum(p.numel() for p in self.parameters())
        if non_embedding:
            count -= self.model.embed_tokens.weight.numel()
        return count

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "Llama":
        """A model with Hugging Face Llama / Qwen3 weights from a checkpoint directory, in eval
        mode; ``overrides`` are LlamaConfig fields that keep the weights' shapes (``backend``,
        ``context_length``, ``sliding_window``)."""
        from fusedgpt.model import hf_llama

        config, state = hf_llama.load(path, **overrides)
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()

    def save_pretrained(self, path: Union[str, os.PathLike], *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write Hugging Face's ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with ``qk_norm``)
        layout: ``config.json`` and safetensors, sharded with an index above ``max_shard_bytes``."""
        from fusedgpt.model import hf_llama

        hf_llama.save(self.config, self.state_dict(), path, max_shard_bytes=max_shard_bytes)
