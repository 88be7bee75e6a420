"""Tokenizers: GPT-2's byte-pair encoding from bundled ranks, and a byte-level BPE trainer.

Every tokenizer here is a :class:`tiktoken.Encoding`, so encoding and decoding always run
through tiktoken's Rust core; this module only supplies the ranks.

- ``get_tokenizer("gpt2")`` builds GPT-2's encoding (GPT-2's split pattern, 50,256
  mergeable ranks, ``<|endoftext|>`` = 50256) from ``fusedgpt/assets/gpt2.tiktoken``,
  never from the network.
- ``train_bpe(text, vocab_size)`` learns a byte-level BPE: the text is cut into chunks by
  the split pattern (merges never cross a chunk boundary, so " the" and "the," stay apart),
  and the most frequent adjacent pair of tokens is merged until the vocabulary is full.
- ``save_bpe(bpe, path)`` writes it; ``get_tokenizer(path)`` reads it back.
- ``get_tokenizer(directory)`` reads a model directory's byte-level BPE (Llama 3's
  ``tokenizer.model`` ranks, or a ``tokenizer.json`` such as Qwen's): see
  :func:`load_model_tokenizer` for exactly what is supported.

File format, as written by :func:`save_bpe`:

- ``PATH`` holds the mergeable ranks in tiktoken's own format, one ``base64(token bytes)
  rank`` per line in rank order, so ``tiktoken.load.load_tiktoken_bpe`` reads it too.
- ``PATH.json`` (:func:`metadata_path`) holds what that format has no room for: the split
  pattern, the special tokens with their ids, and the sha256 of ``PATH`` so that a sidecar
  left beside a different ranks file is caught::

      {"format": "fusedgpt-bpe", "version": 1, "pattern": "...",
       "special_tokens": {"<|endoftext|>": 4095}, "ranks_sha256": "..."}

  Without a sidecar, a ranks file is read with GPT-2's conventions (GPT-2's split pattern,
  ``<|endoftext|>`` as the id after the last rank), so a plain GPT-2 ``.tiktoken`` file
  loads as GPT-2's encoding.

Special token ids always follow the mergeable ranks: with ``n`` ranks, the k-th special
token has id ``n + k``.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

import regex
import tiktoken

# GPT-2's pre-tokenization split pattern, in the equivalent (faster, possessive) form that
# tiktoken's "gpt2" encoding uses: contractions, letter runs, number runs and punctuation
# runs each with an optional leading space, then whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# The bundled ranks are byte for byte tiktoken's r50k_base.tiktoken.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

N_BYTES = 256
METADATA_FORMAT = "fusedgpt-bpe"
METADATA_VERSION = 1

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

PathLike = Union[str, "os.PathLike[str]"]


class TokenizerFileError(ValueError):
    """A tokenizer file (ranks or its ``.json`` sidecar) is malformed or inconsistent."""


def gpt2_ranks_path() -> Path:
    """The bundled GPT-2 ranks file (tiktoken format; provenance in ``assets/README.md``)."""
    return ASSETS_DIR / "gpt2.tiktoken"


def shakespeare_path() -> Path:
    """The bundled public-domain corpus: Shakespeare's works, plain ASCII, 5,056,502 bytes."""
    return ASSETS_DIR / "shakespeare.txt"


def metadata_path(path: PathLike) -> Path:
    """Where :func:`save_bpe` puts the pattern and special tokens of the ranks file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# ---------------------------------------------------------------------------------------
# Loading


def get_tokenizer(name_or_path: PathLike = "gpt2") -> tiktoken.Encoding:
    """A tokenizer by name or by file.

    Args:
        name_or_path: ``"gpt2"`` for GPT-2's encoding, built from the bundled ranks (the
            name wins over a file called ``gpt2`` in the working directory); the path
            of a ranks file written by :func:`save_bpe`, or any tiktoken-format ranks
            file (read with GPT-2's conventions when it has no ``.json`` sidecar); or a model
            directory (Llama 3, Qwen3, ...: see :func:`load_model_tokenizer`).

    Returns:
        A ``tiktoken.Encoding``. For ``"gpt2"`` it has the name, split pattern, ranks and
        special tokens of ``tiktoken.get_encoding("gpt2")``: ``n_vocab`` 50257,
        ``eot_token`` 50256; the same object is returned on every call.

    Raises:
        TypeError: ``name_or_path`` is neither a string nor a path.
        FileNotFoundError: no such file (and the name is not ``"gpt2"``).
        TokenizerFileError: the ranks file or its sidecar is malformed or inconsistent.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"get_tokenizer: name_or_path must be 'gpt2' or a path, got {type(name_or_path).__name__}"
        )
    if name_or_path == "gpt2":
        return _gpt2_encoding()
    path = Path(name_or_path)
    if path.is_dir():
        return load_model_tokenizer(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"get_tokenizer: {str(path)!r} does not exist; pass 'gpt2' for GPT-2's encoding, the path "
            "of a ranks file written by save_bpe, or a model directory with a tokenizer"
        )
    data = path.read_bytes()
    ranks = parse_ranks(data, source=str(path))
    pattern, special_tokens = _read_metadata(path, data, n_ranks=len(ranks))
    return _make_encoding(path.stem, ranks, special_tokens, pattern)


@lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    data = gpt2_ranks_path().read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise TokenizerFileError(
            f"the bundled {gpt2_ranks_path()} does not have the sha256 {GPT2_RANKS_SHA256}; "
            "the installation is damaged, reinstall fusedgpt"
        )
    ranks = parse_ranks(data, source=str(gpt2_ranks_path()))
    return _make_encoding("gpt2", ranks, {ENDOFTEXT: GPT2_EOT_ID}, GPT2_PATTERN)


def parse_ranks(data: bytes, *, source: str = "<bytes>") -> dict[bytes, int]:
    """Read tiktoken's ranks format: one ``base64(token bytes) rank`` per line.

    Stricter than tiktoken's own reader, because encoding would otherwise fail later and
    obscurely: ranks must be exactly ``0 .. n-1``, tokens distinct, and every single byte
    a token (else some text could not be encoded).

    Args:
        data: the file's contents.
        source: how to name the file in error messages.

    Returns:
        token bytes -> rank.

    Raises:
        TokenizerFileError: naming ``source`` and the first bad line.
    """
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if (
            len(fields) != 2
            or not fields[1].isdigit()
            or not (token := _b64decode(fields[0]))
        ):
            shown = line[:80].decode("utf-8", "replace")
            raise TokenizerFileError(
                f"{source}: line {number} is not 'base64(token bytes) rank': {shown!r}"
            )
        rank = int(fields[1])
        if token in ranks:
            raise TokenizerFileError(f"{source}: line {number} repeats the token {token!r}")
        if rank in seen_ranks:
            raise TokenizerFileError(f"{source}: line {number} repeats the rank {rank}")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise TokenizerFileError(f"{source}: no ranks in the file")
    if max(seen_ranks) != len(ranks) - 1:
        raise TokenizerFileError(
            f"{source}: ranks must be 0..{len(ranks) - 1} without gaps, the largest is {max(seen_ranks)}"
        )
    missing = [b for b in range(N_BYTES) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(
            f"{source}: {len(missing)} single bytes are not tokens (first: {missing[0]:#04x}); "
            "a byte-level BPE needs all 256"
        )
    return ranks


def _b64decode(field: bytes) -> bytes:
    """The decoded bytes, or ``b""`` when ``field`` is not strict base64."""
    try:
        return base64.b64decode(field, validate=True)
    except ValueError:  # binascii.Error
        return b""


def _read_metadata(path: Path, data: bytes, *, n_ranks: int) -> tuple[str, dict[str, int]]:
    """(pattern, special tokens) from the sidecar of ``path``, or GPT-2's when there is none."""
    meta_path = metadata_path(path)
    if not meta_path.exists():
        return GPT2_PATTERN, {ENDOFTEXT: n_ranks}
    try:
        meta = json.loads(meta_path.read_bytes())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise TokenizerFileError(f"{meta_path}: not valid JSON ({exc})") from exc
    expected = {"format", "version", "pattern", "special_tokens", "ranks_sha256"}
    if not isinstance(meta, dict) or set(meta) != expected:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise TokenizerFileError(f"{meta_path}: expected an object with keys {sorted(expected)}, got {keys}")
    if meta["format"] != METADATA_FORMAT or meta["version"] != METADATA_VERSION:
        raise TokenizerFileError(
            f"{meta_path}: format {meta['format']!r} version {meta['version']!r} is not "
            f"{METADATA_FORMAT!r} version {METADATA_VERSION}"
        )
    if meta["ranks_sha256"] != hashlib.sha256(data).hexdigest():
        raise TokenizerFileError(
            f"{meta_path} was written for another ranks file than {path} (sha256 differs)"
        )
    pattern, special_tokens = meta["pattern"], meta["special_tokens"]
    if not isinstance(special_tokens, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in special_tokens.items()
    ):
        raise TokenizerFileError(f"{meta_path}: special_tokens must map strings to integer ids")
    try:
        _check_pattern(pattern)
        _check_special_ids(special_tokens, n_ranks)
    except (TypeError, ValueError) as exc:
        raise TokenizerFileError(f"{meta_path}: {exc}") from exc
    return pattern, special_tokens


def _check_pattern(pattern: object) -> regex.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc


def _check_special_ids(special_tokens: dict[str, int], n_ranks: int) -> None:
    expected = list(range(n_ranks, n_ranks + len(special_tokens)))
    if sorted(special_tokens.values()) != expected:
        raise ValueError(
            f"special token ids must be {expected} (right after the {n_ranks} ranks), "
            f"got {special_tokens}"
        )


def _make_encoding(
    name: str, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str
) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name,
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
        explicit_n_vocab=len(ranks) + len(special_tokens),
    )


# ---------------------------------------------------------------------------------------
# Model directories (Llama 3, Qwen, GPT-2 style byte-level BPEs)

# Llama 3's split pattern (its tokenizer.py): case-insensitive contractions, letter runs
# with one leading non-letter, numbers in groups of at most three digits, punctuation runs,
# newlines, then other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
)
LLAMA3_N_SPECIAL_TOKENS = 256


def llama3_special_tokens(n_ranks: int) -> dict[str, int]:
    """The 256 special tokens of Llama 3.1+'s reference tokenizer (meta-llama/llama-models: 11
    named, then reserved 2..246), ids from ``n_ranks`` on. Hugging Face's files name some
    differently; their ``tokenizer_config.json`` wins where present."""
    reserved = (f"<|reserved_special_token_{2 + i}|>"
                for i in range(LLAMA3_N_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS)))
    return {token: n_ranks + i for i, token in enumerate((*LLAMA3_NAMED_SPECIAL_TOKENS, *reserved))}


def load_model_tokenizer(directory: PathLike) -> tiktoken.Encoding:
    """The tokenizer of a model directory, as a ``tiktoken.Encoding``.

    Supported, tried in this order:

    - ``tokenizer.json`` (Hugging Face ``tokenizers``) holding a byte-level BPE: model type
      ``BPE`` without ``byte_fallback``, a ``ByteLevel`` pre-tokenizer without
      ``add_prefix_space`` (alone: GPT-2's split pattern; or after one ``Split`` regex, as
      Llama 3 and Qwen2/Qwen3 have), no normalizer or ``NFC``, and a vocabulary in merge
      order: every token past the 256 bytes is made by a merge, and merges' ids rise with
      their rank (then tiktoken's lowest-rank-first merging is the BPE's). Its
      ``added_tokens`` become special tokens with their ids.
    - ``tokenizer.model`` in tiktoken's base64 ranks format (Llama 3's original files): Llama
      3's split pattern; special tokens from ``tokenizer_config.json``'s
      ``added_tokens_decoder`` when present, else Llama 3.1's 256.

    Not supported: SentencePiece ``tokenizer.model`` files (Llama 1/2, protobuf), WordPiece
    or Unigram models, and any other normalizer. Differences to ``transformers``' tokenizer:
    no BOS token is prepended (add ``<|begin_of_text|>`` yourself where the model wants it);
    added tokens are split out of the text only with ``encode(text, allowed_special="all")``;
    with an ``NFC`` normalizer the text is not normalised here, so ids agree for NFC text.

    Raises:
        FileNotFoundError: neither file is in ``directory``.
        TokenizerFileError: naming the file and what in it is not supported.
    """
    directory = Path(directory)
    hf_path, ranks_path = directory / "tokenizer.json", directory / "tokenizer.model"
    if hf_path.is_file():
        return _hf_byte_level_bpe(hf_path)
    if ranks_path.is_file():
        data = ranks_path.read_bytes()
        if not data[:1].isalnum() and not data.startswith((b"+", b"/")):
            raise TokenizerFileError(f"{ranks_path} is not a tiktoken ranks file (a SentencePiece model? not supported)")
        ranks = parse_ranks(data, source=str(ranks_path))
        special = _added_tokens_decoder(directory / "tokenizer_config.json") or llama3_special_tokens(len(ranks))
        return tiktoken.Encoding(directory.name or "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=special)
    raise FileNotFoundError(f"{directory} has neither tokenizer.json nor tokenizer.model")


def _added_tokens_decoder(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        decoder = json.loads(path.read_bytes()).get("added_tokens_decoder", {})
        return {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise TokenizerFileError(f"{path}: added_tokens_decoder is not an object of {{id: {{'content': ...}}}}") from exc


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(N_BYTES) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(N_BYTES + i) for i, b in enumerate(shifted)}
    return {char: b for b, char in chars.items()}


def _hf_byte_level_bpe(path: Path) -> tiktoken.Encoding:
    try:
        spec = json.loads(path.read_bytes())
        model = spec["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenizerFileError(f"{path}: not a tokenizers JSON file ({exc})") from exc

    def refuse(what: str) -> TokenizerFileError:
        return TokenizerFileError(f"{path}: {what} is not supported (only byte-level BPEs, see load_model_tokenizer)")

    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise refuse(f"model type {model.get('type')!r}" + (" with byte_fallback" if model.get("byte_fallback") else ""))
    if (spec.get("normalizer") or {}).get("type", "NFC") != "NFC":
        raise refuse(f"normalizer {spec['normalizer'].get('type')!r}")
    pattern = _split_pattern(spec.get("pre_tokenizer") or {}, refuse)
    # Added tokens (GPT-2 keeps <|endoftext|> in its vocabulary too) are special, not ranks.
    special = {entry["content"]: entry["id"] for entry in spec.get("added_tokens", [])}
    vocab = {token: rank for token, rank in model["vocab"].items() if token not in special}
    decode = _byte_decoder()
    try:
        ranks = {bytes(decode[c] for c in token): rank for token, rank in vocab.items()}
    except KeyError as exc:
        raise refuse(f"a vocabulary token with the character {exc} outside the byte-level alphabet") from None
    missing = [b for b in range(N_BYTES) if bytes([b]) not in ranks]
    if missing:
        raise refuse(f"a vocabulary without the byte {missing[0]:#04x} as a token")
    _check_merge_order(model.get("merges", []), vocab, path)
    return tiktoken.Encoding(path.parent.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=special)


def _split_pattern(pre_tokenizer: dict, refuse) -> str:
    """The split regex of a ``ByteLevel`` pre-tokenizer, alone or after one ``Split``."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") for step in steps]
    if kinds not in (["ByteLevel"], ["Split", "ByteLevel"]):
        raise refuse(f"pre-tokenizer {kinds}")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise refuse("ByteLevel add_prefix_space")
    if kinds == ["ByteLevel"]:
        if not byte_level.get("use_regex", True):
            raise refuse("ByteLevel without a split regex")
        return GPT2_PATTERN
    split = steps[0]
    if byte_level.get("use_regex") or split.get("behavior") != "Isolated" or split.get("invert"):
        raise refuse(f"Split {split.get('behavior')!r} (invert={split.get('invert')}) before ByteLevel")
    regex_pattern = (split.get("pattern") or {}).get("Regex")
    if not isinstance(regex_pattern, str):
        raise refuse("a Split pattern that is not a regex")
    return regex_pattern


def _check_merge_order(merges: list, vocab: dict[str, int], path: Path) -> None:
    """tiktoken merges the pair whose joined bytes have the lowest rank; that is the BPE's
    merge order when every merge's result has a higher id than the merges before it."""
    previous = -1
    made = set()
    for i, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is None or token_id <= previous:
            raise TokenizerFileError(f"{path}: merges[{i}] = {left!r} + {right!r} makes id {token_id}, not above the "
                                     f"previous merge's {previous}: the vocabulary is not in merge order (not supported)")
        previous = token_id
        made.add(token_id)
    unmade = [t for t, token_id in vocab.items() if len(t) > 1 and token_id not in made]
    if unmade:
        raise TokenizerFileError(f"{path}: {len(unmade)} vocabulary tokens are made by no merge (first {unmade[0]!r}); "
                                 "not supported")


# ---------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class BPE:
    """A byte-level BPE: 256 byte tokens, then one token per merge, then special tokens.

    Attributes:
        merges: ``merges[i] = (left, right)`` made the token ``left + right`` with rank
            ``256 + i``; both parts are tokens made earlier (or single bytes).
        special_tokens: their ids follow the last rank, in this order.
        pattern: the split pattern that cut the training text into chunks; encoding uses it.
    """

    merges: tuple[tuple[bytes, bytes], ...]
    special_tokens: tuple[str, ...] = (ENDOFTEXT,)
    pattern: str = GPT2_PATTERN

    def __post_init__(self) -> None:
        ranks = self.ranks
        for i, (left, right) in enumerate(self.merges):
            if ranks.get(left, N_BYTES + i) >= N_BYTES + i or ranks.get(right, N_BYTES + i) >= N_BYTES + i:
                raise ValueError(f"BPE: merges[{i}] = {(left, right)!r} joins a token not made before it")
        if len(ranks) != N_BYTES + len(self.merges):
            raise ValueError("BPE: two merges make the same token")
        _check_special_tokens(self.special_tokens)
        _check_pattern(self.pattern)

    @property
    def ranks(self) -> dict[bytes, int]:
        """token bytes -> rank, for the 256 bytes and every merge (no special tokens)."""
        ranks = {bytes([b]): b for b in range(N_BYTES)}
        for i, (left, right) in enumerate(self.merges):
            ranks.setdefault(left + right, N_BYTES + i)
        return ranks

    @property
    def special_token_ids(self) -> dict[str, int]:
        first = N_BYTES + len(self.merges)
        return {token: first + k for k, token in enumerate(self.special_tokens)}

    @property
    def n_vocab(self) -> int:
        return N_BYTES + len(self.merges) + len(self.special_tokens)

    def encoding(self, name: str = "bpe") -> tiktoken.Encoding:
        """This BPE as a ``tiktoken.Encoding`` named ``name``."""
        return _make_encoding(name, self.ranks, self.special_token_ids, self.pattern)


def _check_special_tokens(special_tokens: object) -> None:
    if isinstance(special_tokens, str) or not isinstance(special_tokens, (tuple, list)):
        raise TypeError(
            f"special_tokens must be a tuple or list of strings, got {type(special_tokens).__name__}"
        )
    if not all(isinstance(t, str) and t for t in special_tokens):
        raise TypeError(f"special_tokens must be non-empty strings, got {special_tokens!r}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens!r}")


def train_bpe(
    text: str,
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    pattern: str = GPT2_PATTERN,
) -> BPE:
    """Learn a byte-level BPE of ``vocab_size`` tokens from ``text``.

    The text is first split at the special tokens (which are never merged into), then cut
    into chunks by ``pattern``; identical chunks are counted once with their frequency.
    Each step merges the most frequent adjacent pair of tokens within chunks (ties: the pair
    of lowest ranks, so training is deterministic) into a new token. Overlapping
    occurrences count ("aaa" holds "aa" twice) and are merged left to right.

    Args:
        text: the training text. Lone surrogates become U+FFFD, as tiktoken does.
        vocab_size: the size of the whole vocabulary: 256 bytes + merges + special tokens.
        special_tokens: strings that get their own ids after the merged tokens.
        pattern: the split regex. Training cuts chunks with the ``regex`` module, encoding
            with tiktoken's Rust engine; for GPT-2's pattern the two agree (up to their
            Unicode versions' letter and number classes, which would only shift counts).
            It must match every character outside special tokens, as GPT-2's does, since
            tiktoken drops unmatched text when encoding.

    Returns:
        The :class:`BPE`. If the text runs out of pairs first, it has fewer merges than
        asked for, and a warning says so.

    Raises:
        TypeError / ValueError: naming the bad argument.
    """
    if not isinstance(text, str):
        raise TypeError(f"train_bpe: text must be a str, got {type(text).__name__}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"train_bpe: vocab_size must be an int, got {type(vocab_size).__name__}")
    try:
        _check_special_tokens(special_tokens)
        splitter = _check_pattern(pattern)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"train_bpe: {exc}") from exc
    special_tokens = tuple(special_tokens)
    smallest = N_BYTES + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"train_bpe: vocab_size must be at least {smallest} (256 bytes + "
            f"{len(special_tokens)} special tokens), got {vocab_size}"
        )

    chunks = _count_chunks(_without_surrogates(text), special_tokens, splitter)
    n_merges = vocab_size - smallest
    merges = _learn_merges(chunks, n_merges)
    if len(merges) < n_merges:
        warnings.warn(
            f"train_bpe: the text ran out of pairs after {len(merges)} merges; the vocabulary "
            f"has {smallest + len(merges)} tokens, not {vocab_size}",
            stacklevel=2,
        )
    return BPE(merges=tuple(merges), special_tokens=special_tokens, pattern=pattern)


def _without_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _count_chunks(text: str, special_tokens: tuple[str, ...], splitter: regex.Pattern) -> Counter:
    """UTF-8 chunk -> how often the pattern cut it out of the text (special tokens removed)."""
    if special_tokens:
        # Longest first, so a special token that is a prefix of another does not split it.
        alternatives = sorted(special_tokens, key=len, reverse=True)
        pieces = regex.split("|".join(regex.escape(t) for t in alternatives), text)
    else:
        pieces = [text]
    counts: Counter = Counter()
    for piece in pieces:
        counts.update(m.group() for m in splitter.finditer(piece))
    matched = sum(len(chunk) * n for chunk, n in counts.items())
    if matched != sum(map(len, pieces)):
        raise ValueError(
            "train_bpe: pattern leaves characters of the text unmatched; tiktoken would drop "
            "them when encoding"
        )
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items() if chunk})


def _learn_merges(chunks: Counter, n_merges: int) -> list[tuple[bytes, bytes]]:
    """The first ``n_merges`` merges (or fewer, when the pairs run out) over ``chunks``.

    Cost: the pair counts are built once; after that a merge only revisits the chunks that
    hold its pair (``where``), and only the pairs next to a merged position change count.
    The best pair comes from a max-heap with lazy deletion: every count change pushes a
    fresh entry, and a popped entry whose count is no longer current is discarded.
    """
    tokens: list[bytes] = [bytes([b]) for b in range(N_BYTES)]
    token_ids: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
    # Single-byte chunks hold no pair and never change, so they are left out.
    words: list[list[int]] = [list(chunk) for chunk in chunks if len(chunk) > 1]
    freqs: list[int] = [n for chunk, n in chunks.items() if len(chunk) > 1]

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # a superset: stale entries are skipped
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < n_merges and heap:
        negative_count, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -negative_count:
            continue
        joined = tokens[a] + tokens[b]
        new = token_ids.get(joined)
        if new is None:
            new = len(tokens)
            tokens.append(joined)
            token_ids[joined] = new
            merges.append((tokens[a], tokens[b]))
        # else: another split of these bytes was merged before. Merging this pair into that
        # token adds nothing to the vocabulary and matches tiktoken, which ranks a pair by
        # the bytes it makes.
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop((a, b)):
            word = words[i]
            merged = _merge_pair(word, a, b, new)
            if len(merged) == len(word):
                continue
            freq = freqs[i]
            for pair in zip(word, word[1:]):
                delta[pair] -= freq
            for pair in zip(merged, merged[1:]):
                delta[pair] += freq
                where[pair].add(i)
            words[i] = merged
        for pair, change in delta.items():
            if change:
                count = pair_counts[pair] = pair_counts[pair] + change
                if count:
                    heapq.heappush(heap, (-count, *pair))
                else:
                    del pair_counts[pair]
    return merges


def _merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    """``word`` with every occurrence of ``a, b``, left to right, replaced by ``new``."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def save_bpe(bpe: BPE, path: PathLike) -> Path:
    """Write ``bpe`` to ``path`` (tiktoken ranks) and ``path.json`` (pattern, special tokens).

    ``get_tokenizer(path)`` reads both back into a ``tiktoken.Encoding`` equal to
    ``bpe.encoding()``. Existing files are overwritten; the parent folder must exist.

    Returns:
        ``path`` as a ``Path``.
    """
    if not isinstance(bpe, BPE):
        raise TypeError(f"save_bpe: bpe must be a BPE (from train_bpe), got {type(bpe).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_bpe: path must be a str or path, got {type(path).__name__}")
    path = Path(path)
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in bpe.ranks.items())
    data = "".join(lines).encode("ascii")
    path.write_bytes(data)
    meta = {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "pattern": bpe.pattern,
        "special_tokens": bpe.special_token_ids,
        "ranks_sha256": hashlib.sha256(data).hexdigest(),
    }
    metadata_path(path).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return path
