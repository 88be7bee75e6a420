"""GPT-2 weights in Hugging Face's format: a directory with ``config.json`` and
``model.safetensors`` (or shards with an index, or ``pytorch_model.bin``).

Parameter names are the same on both sides (``transformer.h.0.attn.c_attn.weight``, ...),
with two differences: Hugging Face's GPT-2 stores its linear layers as ``Conv1D``, whose
weight is (in, out), the transpose of ``nn.Linear``'s; and the model here may pad its
vocabulary rows (``pad_vocab_multiple``), which are cut off on export and zero-filled on
import. Old checkpoints (the ones on the Hub) also lack the ``transformer.`` prefix and carry
attention-mask buffers, which are dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch

from fusedgpt.model.config import GPTConfig

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
REQUIRED_CONFIG_KEYS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
LAYER_NORM_EPS = 1e-5  # what the model's LayerNorms use
GPT2_EOS_ID = 50256


# --------------------------------------------------------------------------- import


def load(path: PathLike, **overrides: Any) -> tuple[GPTConfig, dict[str, Tensor]]:
    """The config and a state dict for :class:`fusedgpt.model.gpt.GPT` from a Hugging Face
    GPT-2 checkpoint (see ``GPT.from_pretrained``).

    Raises:
        FileNotFoundError: no such directory or Hub name, or no weights file in it.
        ValueError: naming the file: a ``config.json`` or weights file that cannot be read,
            a missing config key, or a GPT-2 variant this model does not implement.
    """
    directory = resolve(path)
    config_path = directory / "config.json"
    config = config_from_hf(_read_json(config_path), source=str(config_path), **overrides)
    weights = read_weights(directory)
    _check_vocab_rows(weights, config, config_path)
    return config, state_from_hf(weights, config)


def _check_vocab_rows(hf_state: dict[str, Tensor], config: GPTConfig, config_path: Path) -> None:
    """The embedding (and an untied head) must have one row per token of ``vocab_size``:
    rows the config claims but the weights lack would be zero-filled, and sampling them
    gives ids no tokenizer of that model can decode."""
    for name, tensor in hf_state.items():
        if name.endswith("wte.weight") or name == "lm_head.weight":
            if tensor.dim() != 2 or tensor.shape[0] != config.vocab_size:
                raise ValueError(f"{config_path} says vocab_size={config.vocab_size}, but the weights' {name} has "
                                 f"shape {tuple(tensor.shape)}: config and weights do not belong together")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a JSON object")
    return values


def resolve(path: PathLike) -> Path:
    """A checkpoint directory: ``path`` itself, or a Hub download for a GPT-2 name."""
    directory = Path(path)
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
        return directory
    if str(path) in HUB_NAMES:
        return _download(str(path))
    raise FileNotFoundError(
        f"{path!r} is not a directory (a Hugging Face checkpoint directory, or one of the names {HUB_NAMES})"
    )


def _download(name: str) -> Path:
    hint = (
        f"to use {name} offline, put its config.json and model.safetensors in a directory "
        f"(e.g. `hf download openai-community/{name} config.json model.safetensors --local-dir {name}`) "
        f"and pass that directory's path"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name!r} is not a local directory and huggingface_hub is not installed; {hint}") from None
    try:
        return Path(snapshot_download(f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"]))
    except Exception as exc:  # offline, blocked or refused: the hub's own message says which
        raise FileNotFoundError(f"could not fetch {name!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); {hint}") from exc


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint in ``directory``, on the CPU, as stored.

    Raises:
        FileNotFoundError: no weights file, or a shard the index names is missing.
        ValueError: a weights file or index that cannot be read, naming it.
    """
    single, index, pickled = (directory / n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        return {name: t for shard in shards for name, t in _read_safetensors(directory / shard).items()}
    if pickled.is_file():
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler raises many types for a damaged file
            raise ValueError(f"{pickled} cannot be read as PyTorch weights ({type(exc).__name__}: {exc})") from exc
    raise FileNotFoundError(f"{directory} has none of model.safetensors, model.safetensors.index.json, pytorch_model.bin")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file (damaged or truncated?): {exc}") from exc


def config_from_hf(hf_config: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` for a Hugging Face ``GPT2Config`` dict; refuses the variants this
    model does not implement. Dropout is 0 unless overridden (the model is for inference
    or fine-tuning, where GPT-2's 0.1 is a choice to make, not a property of the weights).
    ``source`` names the dict's file in errors."""
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf_config]
    if missing:
        raise ValueError(f"{source}: missing key {', '.join(map(repr, missing))} (a GPT-2 config has "
                         f"{', '.join(REQUIRED_CONFIG_KEYS)})")
    n_embd = hf_config["n_embd"]
    unsupported = {
        "model_type": (hf_config.get("model_type", "gpt2"), "gpt2"),
        "activation_function": (hf_config.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS),
        "n_inner": (hf_config.get("n_inner") or 4 * n_embd, 4 * n_embd),
        "scale_attn_weights": (hf_config.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf_config.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (hf_config.get("add_cross_attention", False), False),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise ValueError(f"{source}: {key}={value!r} is not supported (expected {allowed!r})")
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        context_length=hf_config["n_positions"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=n_embd,
        tie_weights=hf_config.get("tie_word_embeddings", True),
    )
    return GPTConfig.from_dict({**fields, **overrides})


def state_from_hf(hf_state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Hugging Face GPT-2 tensors -> the model's state dict (Linear layout, padded vocab)."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name in VOCAB_ROWS:
            tensor = _pad_rows(tensor, config.padded_vocab_size)
        state[name] = tensor.contiguous()
    if config.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


# --------------------------------------------------------------------------- export


def save(config: GPTConfig, state: dict[str, Tensor], path: PathLike) -> None:
    """Write the model's state as a Hugging Face GPT-2 checkpoint directory at ``path``."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    hf_state = state_to_hf(state, config)
    dtype = next(iter(hf_state.values())).dtype
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def state_to_hf(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """The model's state dict -> Hugging Face GPT-2 tensors (Conv1D layout, real vocab rows,
    the tied head stored once, zero biases where the model has none)."""
    hf_state = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_weights:
            continue
        tensor = tensor.detach().cpu()
        if name in VOCAB_ROWS:
            tensor = tensor[: config.vocab_size]
        if not config.bias and _has_hf_bias(name):
            hf_state[name.removesuffix("weight") + "bias"] = tensor.new_zeros(tensor.shape[0])
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        hf_state[name] = tensor.contiguous()
    return hf_state


def _has_hf_bias(name: str) -> bool:
    """Whether Hugging Face's GPT-2 has a bias beside this weight (every linear and LayerNorm)."""
    return name.endswith(CONV1D_WEIGHTS + ("ln_1.weight", "ln_2.weight", "ln_f.weight"))


def config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_weights,
        # GPT-2's <|endoftext|>; meaningless for another vocabulary, where it is left unset.
        "bos_token_id": GPT2_EOS_ID if config.vocab_size > GPT2_EOS_ID else None,
        "eos_token_id": GPT2_EOS_ID if config.vocab_size > GPT2_EOS_ID else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
