"""Llama 3 and Qwen3 weights in Hugging Face's format: ``config.json`` beside
``model.safetensors`` (or shards with ``model.safetensors.index.json``).

The parameter names of :class:`fusedgpt.model.llama.Llama` are Hugging Face's, so the weights
pass unchanged; a tied head is stored once (as ``model.embed_tokens.weight``). Two layouts of
the rotary settings are read: the Hub checkpoints' top-level ``rope_theta`` / ``rope_scaling``
and newer ``transformers``' ``rope_parameters``. Every setting this model does not implement
(a bias, another activation, another rotary scaling, mixed sliding/full layers) is refused
with the field's name; fields that only describe storage or tokens (``torch_dtype``,
``bos_token_id``, ...) are not the model's concern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fusedgpt.model.config import LlamaConfig
from fusedgpt.model.hf import PathLike, _read_json, read_weights, resolve

Tensor = torch.Tensor

FAMILIES = ("llama", "qwen3")
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Older checkpoints store the rotary frequencies as a buffer; the model computes them.
DERIVED_BUFFERS = ("rotary_emb.inv_freq",)
TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


# --------------------------------------------------------------------------- import


def load(path: PathLike, **overrides: Any) -> tuple[LlamaConfig, dict[str, Tensor]]:
    """The config and state dict of :class:`Llama` from a Hugging Face Llama / Qwen3
    checkpoint directory (see ``Llama.from_pretrained``).

    Raises:
        FileNotFoundError: no such directory, or no weights file in it.
        ValueError: naming the file and field: an unreadable file, a missing key, a setting
            this model does not implement, or weights that do not fit the config.
    """
    directory = resolve(path)
    config_path = directory / "config.json"
    config = config_from_hf(_read_json(config_path), source=str(config_path), **overrides)
    return config, state_from_hf(read_weights(directory), config, source=str(directory))


def config_from_hf(hf_config: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` for a Hugging Face ``LlamaConfig`` / ``Qwen3Config`` dict;
    ``overrides`` replace fields afterwards. ``source`` names the dict's file in errors."""
    family = hf_config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{source}: model_type={family!r} is not a Llama-family model ({', '.join(FAMILIES)})")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf_config]
    if missing:
        raise ValueError(f"{source}: missing key {', '.join(map(repr, missing))}")
    _refuse_unsupported(hf_config, source)
    n_head = hf_config["num_attention_heads"]
    theta, scaling = rope_from_hf(hf_config, source)
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        context_length=hf_config.get("max_position_embeddings", 2048),
        n_layer=hf_config["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf_config.get("num_key_value_heads") or n_head,
        n_embd=hf_config["hidden_size"],
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // n_head,
        intermediate_size=hf_config["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=hf_config.get("rms_norm_eps", 1e-6),
        qk_norm=family == "qwen3",
        tie_weights=hf_config.get("tie_word_embeddings", False),
        sliding_window=_sliding_window(hf_config, source),
    )
    try:
        return LlamaConfig.from_dict({**fields, **overrides})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


def _refuse_unsupported(hf_config: dict[str, Any], source: str) -> None:
    expected = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
    for key, allowed in expected.items():
        value = hf_config.get(key, allowed)
        if value != allowed:
            raise ValueError(f"{source}: {key}={value!r} is not supported (this model implements {allowed!r})")


def rope_from_hf(hf_config: dict[str, Any], source: str) -> tuple[float, "dict[str, Any] | None"]:
    """(theta, scaling for :func:`rotary_cache` or None) from either layout of the rotary
    settings: ``rope_parameters`` (newer transformers) or top-level ``rope_theta`` and
    ``rope_scaling`` (the Hub checkpoints)."""
    field = "rope_parameters" if hf_config.get("rope_parameters") is not None else "rope_scaling"
    params = hf_config.get(field) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: {field} must be an object, got {params!r}")
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{source}: {field} of rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in keys if key not in params]
    if missing:
        raise ValueError(f"{source}: {field} of rope_type 'llama3' lacks {missing}")
    return theta, {"rope_type": "llama3", **{key: params[key] for key in keys}}


def _sliding_window(hf_config: dict[str, Any], source: str) -> "int | None":
    """The window when every layer slides, None when none does; mixed layers are refused."""
    layer_types = hf_config.get("layer_types")
    if layer_types is None:
        sliding = hf_config.get("use_sliding_window", False) and hf_config.get("max_window_layers", 0) == 0
        if hf_config.get("use_sliding_window", False) and not sliding:
            raise ValueError(f"{source}: use_sliding_window with max_window_layers="
                             f"{hf_config.get('max_window_layers')!r} mixes sliding and full layers (not supported)")
    else:
        kinds = set(layer_types)
        if not kinds <= {"full_attention", "sliding_attention"} or len(kinds) > 1:
            raise ValueError(f"{source}: layer_types={sorted(kinds)} is not supported "
                             "(all 'full_attention' or all 'sliding_attention')")
        sliding = kinds == {"sliding_attention"}
    return hf_config.get("sliding_window") if sliding else None


def state_from_hf(hf_state: dict[str, Tensor], config: LlamaConfig, *, source: str) -> dict[str, Tensor]:
    """Hugging Face tensors -> the model's state dict (same names; the tied head filled in)."""
    state = {name: t for name, t in hf_state.items() if not name.endswith(DERIVED_BUFFERS)}
    if EMBEDDING not in state:
        raise ValueError(f"{source}: the weights have no {EMBEDDING}")
    if config.tie_weights:
        state[TIED_HEAD] = state[EMBEDDING]
    elif TIED_HEAD not in state:
        raise ValueError(f"{source}: tie_word_embeddings is false but the weights have no {TIED_HEAD}")
    for name in (EMBEDDING, TIED_HEAD):
        if tuple(state[name].shape) != (config.vocab_size, config.n_embd):
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the config says "
                             f"({config.vocab_size}, {config.n_embd}): config and weights do not belong together")
    return state


# --------------------------------------------------------------------------- export


def save(config: LlamaConfig, state: dict[str, Tensor], path: PathLike, *, max_shard_bytes: int) -> None:
    """Write ``state`` as a Hugging Face checkpoint directory at ``path``: one
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own) with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    hf_state = {name: t.detach().cpu().contiguous() for name, t in state.items()
                if not (name == TIED_HEAD and config.tie_weights)}
    dtype = next(iter(hf_state.values())).dtype
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    shards = _split(hf_state, max_shard_bytes)
    if len(shards) == 1:
        save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _split(state: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def config_to_hf(config: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The Hugging Face config: ``Qwen3ForCausalLM`` with ``qk_norm``, else ``LlamaForCausalLM``
    (which has no sliding window). Rotary settings in the top-level layout, which every
    ``transformers`` version reads."""
    family = "qwen3" if config.qk_norm else "llama"
    if family == "llama" and config.sliding_window is not None:
        raise ValueError("save_pretrained: sliding_window has no place in a Hugging Face Llama config "
                         "(only Qwen3's, i.e. with qk_norm)")
    hf_config = {
        "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_weights,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family == "llama":
        hf_config["mlp_bias"] = False
    else:
        window = config.sliding_window
        hf_config.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                         layer_types=["sliding_attention" if window else "full_attention"] * config.n_layer)
    return hf_config
