"""Autoregressive generation: greedy, temperature, top-k and nucleus (top-p) sampling, with
a preallocated KV cache, per-row end of sequence, and the ``fusedgpt generate`` command.

With the cache, the prompt is run once (prefill) and then each new token alone attends over
the cached keys and values (the attention op's Tq = 1 < Tk path). The model sees at most
``context_length`` positions: a longer prompt keeps its last ``context_length`` tokens, and
once the cache is full the window slides by re-running the last ``context_length`` tokens,
so the cached and uncached paths compute the same thing.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from fusedgpt.hardware import add_device_arguments, choose_backend, resolve_device
from fusedgpt.io.checkpoint import open_checkpoint
from fusedgpt.model.gpt import GPT, KVCache
from fusedgpt.model.llama import Llama

Tensor = torch.Tensor


def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    vocab_limit: Optional[int] = None,
) -> Tensor:
    """Continue each row of ``idx`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`GPT`; it runs in eval mode for the call (its mode is restored).
        idx: (B, T) int64 prompt token ids, T >= 1.
        max_new_tokens: tokens to add, >= 0.
        temperature: divides the logits; 0 means greedy (argmax).
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of most likely tokens whose probability
            reaches ``top_p`` (nucleus sampling), 0 < top_p <= 1.
        eos_id: a row that produces it is done: it gets ``eos_id`` from then on, and
            generation stops when every row is done.
        use_cache: decode with a KV cache (same tokens as without, far less compute).
        generator: the random source for sampling, on idx's device, for reproducible draws.
        vocab_limit: choose only among ids below it (a tokenizer smaller than the model's
            embedding, e.g. Qwen3's 151,669 tokens on 151,936 rows: the other ids have no
            text); default: the whole vocabulary.

    Returns:
        (B, T + n) int64, the prompt followed by the n <= max_new_tokens new tokens.
    """
    new = list(stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_id=eos_id, use_cache=use_cache, generator=generator, vocab_limit=vocab_limit))
    return torch.cat([idx, *(token[:, None] for token in new)], dim=1)


def stream(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    vocab_limit: Optional[int] = None,
) -> Iterator[Tensor]:
    """:func:`generate` one step at a time: yields each new (B,) int64 token column as soon
    as it is chosen. Arguments are checked here, before the first step; the model is in eval
    mode from the first step until the stream ends or is closed."""
    vocab_limit = model.config.vocab_size if vocab_limit is None else vocab_limit
    _check(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, vocab_limit)
    return _decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, vocab_limit)


def filter_logits(logits: Tensor, *, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Logits (..., V) with every token outside the top-k and outside the nucleus set to -inf.

    The top-k are exactly ``top_k`` tokens; among tokens tied at the k-th value, the ones
    ``torch.topk`` returns stay.

    The nucleus is the smallest set of most likely tokens whose softmax probability sums to at
    least ``top_p``: a token stays when the tokens ranked above it sum to less than top_p.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        # From the indices, not a threshold at the k-th value: ties there would keep more than k.
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = torch.cumsum(probs, dim=-1) - probs >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """One token per row of ``logits`` (B, V): argmax when ``temperature`` is 0, else a draw
    from the filtered, temperature-scaled softmax. Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- internals


def _check(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, vocab_limit) -> None:
    if not isinstance(model, (GPT, Llama)):
        raise TypeError(f"generate: model must be a fusedgpt GPT or Llama, got {type(model).__name__}")
    vocab = model.config.vocab_size
    if not isinstance(idx, Tensor) or idx.dtype != torch.long:
        raise TypeError(f"generate: idx must be an int64 torch.Tensor of token ids, got {getattr(idx, 'dtype', type(idx))}")
    if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"generate: idx must have shape (B, T) with B, T >= 1, got {tuple(idx.shape)}")
    if idx.min().item() < 0 or idx.max().item() >= vocab:
        raise ValueError(f"generate: idx holds token ids outside [0, {vocab})")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    if not _is_int(vocab_limit) or not 1 <= vocab_limit <= vocab:
        raise ValueError(f"generate: vocab_limit must be None or an int in [1, {vocab}] (the model's vocabulary), "
                         f"got {vocab_limit!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vocab_limit):
        raise ValueError(f"generate: eos_id must be None or a token id in [0, {vocab_limit}), got {eos_id!r}")
    if generator is not None and generator.device.type != idx.device.type:
        raise ValueError(f"generate: generator is on {generator.device}, idx on {idx.device}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@torch.no_grad()
def _decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator,
            vocab_limit) -> Iterator[Tensor]:
    was_training = model.training
    model.eval()
    try:
        window = model.config.context_length
        cache = KVCache(window) if use_cache else None
        tokens = idx
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = _next_logits(model, tokens, cache, window)
            logits[:, vocab_limit:] = float("-inf")  # ids past the tokenizer's have no text
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            tokens = torch.cat([tokens[:, -window:], token[:, None]], dim=1)
            yield token
            if eos_id is not None and bool(done.all()):
                return
    finally:
        model.train(was_training)


def _next_logits(model: GPT, tokens: Tensor, cache: Optional[KVCache], window: int) -> Tensor:
    """(B, V) logits for the token after ``tokens``, from at most the last ``window`` of them."""
    if cache is not None and 0 < cache.length < window:
        return model(tokens[:, -1:], cache=cache)[:, -1]
    if cache is not None:  # first step, or the window is full: (re)fill from the last window
        cache.reset()
    return model(tokens[:, -window:], cache=cache, last_only=True)[:, -1]


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training checkpoint (or run directory: its newest checkpoint), a Hugging Face "
                             "GPT-2, Llama 3 or Qwen3 directory (e.g. from save_pretrained), or gpt2 / gpt2-medium / "
                             "gpt2-large / gpt2-xl")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, start from <|endoftext|>)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the likeliest tokens holding probability P (default: all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for reproducible sampling (default: none, a new draw each run)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer name, ranks file or model directory (default: the one the checkpoint was "
                             "trained with, or the Hugging Face directory's own, else gpt2)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Stream the continuation of ``--prompt`` to stdout, token by token."""
    from fusedgpt.model.tokenizer import get_tokenizer

    device = resolve_device(args.device)
    model, trained_tokenizer = load_for_generation(args.checkpoint, backend=choose_backend(device, args.backend))
    model.to(device)
    name = args.tokenizer or trained_tokenizer or "gpt2"
    tokenizer = get_tokenizer(name)
    check_tokenizer_fits(tokenizer, name, model.config.vocab_size)  # fewer tokens: sampled among them only
    eos_id = tokenizer.eot_token if "<|endoftext|>" in tokenizer.special_tokens_set else None
    if not args.prompt and eos_id is None:
        raise ValueError("--prompt is empty and the tokenizer has no <|endoftext|> token to start from")
    prompt = tokenizer.encode(args.prompt, allowed_special="all") if args.prompt else [eos_id]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)

    # A token can end inside a multi-byte character: decode the bytes incrementally.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    for token in stream(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, eos_id=eos_id, generator=generator, vocab_limit=tokenizer.n_vocab):
        if token.item() == eos_id:
            break
        sys.stdout.write(text.decode(tokenizer.decode_single_token_bytes(token.item())))
        sys.stdout.flush()
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    return 0


def check_tokenizer_fits(tokenizer, name: str, vocab_size: int) -> None:
    """Refuse a tokenizer with more tokens than the model's vocabulary: it encodes ids the
    model has no embedding for. One with fewer is fine (Qwen3's Hub checkpoints pad the
    embedding past the tokenizer) as long as generation samples only among its ids
    (``vocab_limit=tokenizer.n_vocab``), so that no id without text is produced.

    Raises:
        ValueError: naming the tokenizer and both sizes.
    """
    if tokenizer.n_vocab > vocab_size:
        raise ValueError(f"the tokenizer {name} has {tokenizer.n_vocab} tokens, more than the model's "
                         f"{vocab_size}: pass the --tokenizer the model was trained with")


def load_for_generation(checkpoint: Union[str, os.PathLike], *,
                        backend: str = "auto") -> tuple[Union[GPT, Llama], Optional[str]]:
    """A model in eval mode, and its tokenizer where the checkpoint says: the one it was
    trained with, or a Hugging Face directory's own tokenizer files.

    ``checkpoint`` is a training checkpoint directory or run directory (``meta.json`` +
    ``model.safetensors``, from ``fusedgpt train``), or anything ``fusedgpt.model.from_pretrained``
    takes (GPT-2, Llama 3 and Qwen3 directories).
    """
    from fusedgpt.model import build_model, config_class_for, from_pretrained

    path = Path(checkpoint)
    if path.is_dir() and not (path / "config.json").is_file():
        trained = open_checkpoint(path)
        model = build_model(trained.model_config(config_class_for(trained.meta.get("model") or {}), backend))
        trained.load_weights(model)
        return model.eval(), trained.meta.get("tokenizer")
    own_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    return from_pretrained(checkpoint, backend=backend), str(path) if own_tokenizer else None
