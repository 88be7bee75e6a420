"""The models on the fused kernels: configuration (``config``), GPT-2 (``gpt``), the Llama
family — Llama 3 and Qwen3 — (``llama``), generation (``generate``), Hugging Face weights
(``hf`` for GPT-2, ``hf_llama`` for the Llama family) and tokenizers (``tokenizer``).

``generate`` is imported from its module (``from fusedgpt.model.generate import generate``):
re-exporting the function here would hide the module of the same name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from fusedgpt.model.config import (LLAMA_PRESETS, PRESETS, GPTConfig, LlamaConfig, config_class_for,
                                   config_from_preset)
from fusedgpt.model.gpt import GPT, KVCache
from fusedgpt.model.llama import Llama

__all__ = ["GPT", "GPTConfig", "KVCache", "LLAMA_PRESETS", "Llama", "LlamaConfig", "PRESETS", "build_model",
           "config_class_for", "config_from_preset", "from_pretrained"]


def build_model(config: Union[GPTConfig, LlamaConfig]) -> Union[GPT, Llama]:
    """A freshly initialised model of ``config``'s family."""
    return Llama(config) if isinstance(config, LlamaConfig) else GPT(config)


def from_pretrained(path: Union[str, os.PathLike], **overrides: Any) -> Union[GPT, Llama]:
    """The model of a Hugging Face checkpoint directory, chosen by its ``config.json``'s
    ``model_type``: ``gpt2`` -> :class:`GPT`, ``llama`` / ``qwen3`` -> :class:`Llama`; in
    eval mode. ``path`` may also be a GPT-2 Hub name (see ``GPT.from_pretrained``);
    ``overrides`` are config fields that keep the weights' shapes (e.g. ``backend="torch"``).

    Raises:
        FileNotFoundError: no such directory or name.
        ValueError: a ``model_type`` none of these, or what the family's loader refuses.
    """
    from fusedgpt.model.hf import _read_json

    config_path = Path(path) / "config.json"
    model_type = _read_json(config_path).get("model_type", "gpt2") if config_path.is_file() else "gpt2"
    if model_type == "gpt2":
        return GPT.from_pretrained(path, **overrides)
    if model_type in ("llama", "qwen3"):
        return Llama.from_pretrained(path, **overrides)
    raise ValueError(f"{config_path}: model_type={model_type!r} is not supported (gpt2, llama, qwen3)")
