"""Token data: ``fusedgpt prepare`` turns text into uint16 token shards, and memory-mapped
loaders read them back for training and evaluation.

On disk, a prepared directory holds::

    train_0000.bin, train_0001.bin, ...   the training split, in corpus order
    val_0000.bin                          the validation split (the corpus' last tokens)
    meta.json                             tokenizer, vocabulary size, token counts, sources

Each shard is a 64-byte header -- magic ``b"FUSEDGPT"``, format version (uint32), bytes per
token (uint32, always 2), token count (uint64), zero padding -- followed by the tokens as
little-endian uint16. Documents (a text file, or one JSONL record) are separated by the
tokenizer's ``<|endoftext|>`` token. ``meta.json`` is written last, so a directory without
it is an unfinished preparation. The directory is assembled beside its target and renamed into
place (:mod:`fusedgpt.io.atomic`), so preparing again replaces an earlier preparation only
once the new one is complete: bad input leaves the earlier one as it was.

Tokenisation is exact under chunking: long texts are cut only where a newline is followed by
a non-whitespace character and preceded by one, where GPT-2's pre-tokeniser always starts
a new piece,
so encoding the chunks gives the same tokens as encoding the whole text at once. The chunks
are encoded in batches, by worker processes when the input is large.

The training split is sampled as random windows whose positions are a pure function of
``(seed, step, micro-batch index)``: the "data position" of a run is its step count, which
makes resuming exact and lets every distributed rank read its own windows without
coordination. Evaluation reads fixed, non-overlapping windows from the start of the
validation split, so every evaluation sees the same tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import struct
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from fusedgpt.io import atomic

MAGIC = b"FUSEDGPT"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
TOKEN_DTYPE = np.dtype("<u2")
META_FILE = "meta.json"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)

# Text is handed to the tokenizer in chunks of about this many characters.
CHUNK_CHARS = 1 << 20
# Inputs at least this large are encoded by worker processes; below it, process start-up
# costs more than it saves.
PROCESS_THRESHOLD_BYTES = 32 << 20
DEFAULT_SHARD_TOKENS = 100_000_000

# Cutting text after a lone "\n" (non-whitespace on both sides) never changes GPT-2's
# pre-tokenisation: that newline is a piece of its own whether or not the text goes on. (A
# longer whitespace run would not be: at the end of a text it becomes one piece, inside
# the text its last character splits off.)
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """Input that cannot be prepared, or a prepared directory that cannot be read."""


# ---------------------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------------------


def write_shard(path: PathLike, tokens: np.ndarray) -> None:
    """Write ``tokens`` (1-D, values < 65536) as one shard file with its header."""
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, TOKEN_DTYPE.itemsize, tokens.size).ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.tobytes())


def open_shard(path: PathLike) -> np.ndarray:
    """Memory-map a shard's tokens (read-only uint16), checking its header and size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read token shard {path}: {exc.strerror or exc}") from exc
    if len(header) < HEADER_BYTES:
        raise DataError(f"{path} is not a token shard: shorter than its {HEADER_BYTES}-byte header")
    magic, version, itemsize, count = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise DataError(f"{path} is not a token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION or itemsize != TOKEN_DTYPE.itemsize:
        raise DataError(f"{path}: unsupported shard format version {version} with {itemsize}-byte tokens")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise DataError(f"{path} is truncated or damaged: header says {count} tokens ({expected} bytes), file has {size} bytes")
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


# ---------------------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------------------


def collect_inputs(inputs: Sequence[PathLike]) -> list[Path]:
    """The files to prepare, in order, as absolute paths: files as given, directories walked
    recursively in sorted order for ``.txt``/``.text``/``.md``/``.jsonl`` files (hidden
    entries skipped)."""
    if not inputs:
        raise DataError("no input given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            path = path.absolute()
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path.absolute())
        elif path.exists():
            raise DataError(f"input {path} is neither a file nor a directory")
        else:
            raise DataError(f"input {path} does not exist")
    return files


def _split_at_safe_cuts(text: str, chunk_chars: int) -> tuple[list[str], str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` at safe places; the tail after the
    last safe cut is returned separately because more text may still join it."""
    pieces = []
    start = 0
    while len(text) - start > chunk_chars:
        cut = None
        for match in _SAFE_CUT.finditer(text, start + chunk_chars // 2, start + chunk_chars):
            cut = match.end()
        if cut is None:
            # No safe place in the window: take the first one after it, however far.
            match = _SAFE_CUT.search(text, start + chunk_chars)
            if match is None:
                break
            cut = match.end()
        pieces.append(text[start:cut])
        start = cut
    return pieces, text[start:]


def _read_text_file(path: Path, chunk_chars: int) -> Iterator[str]:
    """The pieces of one text file, streamed so that a large file never sits in memory whole."""
    try:
        # utf-8-sig: a byte-order mark some editors put first is not text.
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            pending = ""
            while True:
                block = f.read(chunk_chars)
                if not block:
                    break
                pieces, pending = _split_at_safe_cuts(pending + block, chunk_chars)
                yield from pieces
            if pending:
                yield pending
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_jsonl_file(path: Path) -> Iterator[str]:
    """The ``text`` field of every record of a JSONL file (blank lines skipped)."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{number}: expected an object with a string field 'text'")
                yield record["text"]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


@dataclass
class _Batch:
    """Pieces of text to encode together; ``ends_document[i]`` means an ``<|endoftext|>``
    follows piece ``i``; ``chars`` is their total length, for the progress bar."""

    texts: list[str]
    ends_document: list[bool]
    chars: int


def _batches(files: Sequence[Path], chunk_chars: int) -> Iterator[_Batch]:
    """Group every document's pieces, in order, into batches of about ``4 * chunk_chars``."""
    batch = _Batch([], [], 0)
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            documents: Iterable[Iterable[str]] = ([text] for text in _read_jsonl_file(path) if text)
        else:
            documents = [_read_text_file(path, chunk_chars)]
        for document in documents:
            last = None
            for piece in document:
                if last is not None:
                    batch.texts.append(last)
                    batch.ends_document.append(False)
                    batch.chars += len(last)
                last = piece
            if last is None:
                continue  # an empty file adds nothing, not even a separator
            batch.texts.append(last)
            batch.ends_document.append(True)
            batch.chars += len(last)
            if batch.chars >= 4 * chunk_chars:
                yield batch
                batch = _Batch([], [], 0)
    if batch.texts:
        yield batch


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------

_worker_encoding = None


def _init_worker(tokenizer: str) -> None:
    global _worker_encoding
    from fusedgpt.model.tokenizer import get_tokenizer

    _worker_encoding = get_tokenizer(tokenizer)


def _encode(encoding, batch: _Batch) -> np.ndarray:
    """The batch's tokens, ``<|endoftext|>`` after every finished document, as uint16."""
    encoded = encoding.encode_ordinary_batch(batch.texts, num_threads=1)
    eot = [encoding.eot_token]
    parts = []
    for tokens, ends in zip(encoded, batch.ends_document):
        parts.append(tokens)
        if ends:
            parts.append(eot)
    return np.fromiter((t for part in parts for t in part), dtype=TOKEN_DTYPE)


def _encode_in_worker(batch: _Batch) -> np.ndarray:
    return _encode(_worker_encoding, batch)


def _encoded_batches(
    batches: Iterator[_Batch], encoding, tokenizer: str, workers: int
) -> Iterator[tuple[np.ndarray, int]]:
    """``(tokens, chars)`` for every batch, in input order; with ``workers > 1`` the batches
    are encoded by a process pool, a bounded number of them in flight."""
    if workers <= 1:
        for batch in batches:
            yield _encode(encoding, batch), batch.chars
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        in_flight: collections.deque[tuple[Future, int]] = collections.deque()
        for batch in batches:
            in_flight.append((pool.submit(_encode_in_worker, batch), batch.chars))
            if len(in_flight) >= 2 * workers:
                future, chars = in_flight.popleft()
                yield future.result(), chars
        while in_flight:
            future, chars = in_flight.popleft()
            yield future.result(), chars


# ---------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------


def prepare(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.005,
    workers: Optional[int] = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    chunk_chars: int = CHUNK_CHARS,
    process_threshold_bytes: int = PROCESS_THRESHOLD_BYTES,
) -> dict:
    """Tokenise text files, directories of them and JSONL files (field ``text``) into
    uint16 shards in ``out``, the last ``val_fraction`` of the tokens as the validation split.

    ``tokenizer`` is ``"gpt2"`` (the bundled ranks) or a path that
    :func:`fusedgpt.model.tokenizer.get_tokenizer` accepts; its vocabulary must fit in
    uint16. ``workers`` processes encode inputs of at least ``process_threshold_bytes``
    (default: every CPU); smaller inputs are encoded in this process.

    ``out`` must be new, empty or an earlier preparation, which is replaced only once the
    new shards are complete.

    Returns the metadata written to ``out/meta.json``. Raises :class:`DataError` (a
    ``ValueError``) for missing, unreadable, non-UTF-8 or empty input, and for an ``out``
    that holds other files.
    """
    from fusedgpt.model.tokenizer import get_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    files = collect_inputs(inputs)
    encoding = get_tokenizer(tokenizer)
    if encoding.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"tokenizer {tokenizer!r} has {encoding.n_vocab} tokens; uint16 shards hold at most 65536")
    if "<|endoftext|>" not in encoding.special_tokens_set:
        raise DataError(f"tokenizer {tokenizer!r} has no <|endoftext|> token to separate documents")
    total_bytes = sum(path.stat().st_size for path in files)
    if workers is None:
        workers = os.cpu_count() or 1
    if total_bytes < process_threshold_bytes:
        workers = 1
    out = Path(out).absolute()
    _check_replaceable(out)

    with atomic.replacing(out, marker=META_FILE) as staging:
        meta = _write_prepared(files, total_bytes, staging, encoding, tokenizer, val_fraction, workers, shard_tokens,
                               progress, chunk_chars)
    return meta


def _check_replaceable(out: Path) -> None:
    """Refuse an ``out`` that :func:`prepare` could not replace without losing something:
    anything but a new or empty directory, or an earlier preparation -- judged by content,
    not by file names: its ``meta.json`` a token-shard record, every other file a shard that
    record lists and whose header checks out."""
    atomic.recover(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; it must be a directory (new, empty or an earlier preparation)")
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    ours: set[str] = set()
    try:
        meta = read_meta(out)
        listed = [*meta["train_shards"], *meta["val_shards"]]
        for name in listed:
            open_shard(out / name)
        ours = {META_FILE, *listed}
    except (DataError, KeyError, TypeError):
        pass  # not (wholly) an earlier preparation: then nothing in it is known to be ours
    foreign = [name for name in present if name not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(f"--out {out} holds files that fusedgpt prepare did not write ({shown}); preparing "
                        "replaces the whole directory, so choose a new or empty one")


def _write_prepared(files: Sequence[Path], total_bytes: int, out: Path, encoding, tokenizer: str, val_fraction: float,
                    workers: int, shard_tokens: int, progress: bool, chunk_chars: int) -> dict:
    """Tokenise ``files`` (``total_bytes`` in all) into shards and ``meta.json`` in the empty
    directory ``out`` (see :func:`prepare`)."""
    stream_path = out / ".tokens.tmp"
    count = 0
    from tqdm.auto import tqdm

    with open(stream_path, "wb") as stream, tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress
    ) as bar:
        for tokens, chars in _encoded_batches(_batches(files, chunk_chars), encoding, tokenizer, workers):
            stream.write(tokens.tobytes())
            count += tokens.size
            bar.update(chars)  # characters, not bytes: close enough for ASCII-heavy text
    try:
        if count == 0:
            raise DataError(f"the input ({', '.join(map(str, files))}) holds no text")
        n_val = int(round(count * val_fraction))
        if val_fraction > 0:
            n_val = max(n_val, 1)
        n_train = count - n_val
        if n_train < 1:
            raise DataError(f"only {count} tokens: nothing left for training after a {val_fraction} validation split")
        tokens = np.memmap(stream_path, dtype=TOKEN_DTYPE, mode="r", shape=(count,))
        train_shards = []
        for index, start in enumerate(range(0, n_train, shard_tokens)):
            name = f"train_{index:04d}.bin"
            write_shard(out / name, tokens[start : min(start + shard_tokens, n_train)])
            train_shards.append(name)
        val_shards = []
        if n_val:
            write_shard(out / "val_0000.bin", tokens[n_train:])
            val_shards.append("val_0000.bin")
        del tokens
    finally:
        stream_path.unlink(missing_ok=True)

    meta = {
        "format": "fusedgpt-tokens",
        "version": VERSION,
        "tokenizer": absolute_path(tokenizer),
        "vocab_size": encoding.n_vocab,
        "eot_token": encoding.eot_token,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_shards": train_shards,
        "val_shards": val_shards,
        "val_fraction": val_fraction,
        "sources": [str(path) for path in files],
        "source_bytes": total_bytes,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name in (*train_shards, *val_shards, META_FILE):
        atomic.fsync(out / name)
    return meta


def absolute_path(name: Optional[str]) -> Optional[str]:
    """A data or tokenizer argument as stored in a run's records: an existing file or
    directory as an absolute path, so the run can be resumed or sampled from any working
    directory; ``None`` and the tokenizer name ``"gpt2"`` (which wins over a file of that
    name) as they are."""
    if name is None or name == "gpt2" or not Path(name).exists():
        return name
    return str(Path(name).absolute())


def is_prepared(path: PathLike) -> bool:
    """Whether ``path`` is a finished ``fusedgpt prepare`` directory."""
    atomic.recover(Path(path))
    return (Path(path) / META_FILE).is_file()


def read_meta(path: PathLike) -> dict:
    """The ``meta.json`` of a prepared directory."""
    atomic.recover(Path(path))
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path} is not a prepared data directory (no {META_FILE}; run `fusedgpt prepare`)") from exc
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise DataError(f"cannot read {meta_path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != "fusedgpt-tokens":
        raise DataError(f"{meta_path} does not describe fusedgpt token shards")
    return meta


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


class TokenStream:
    """One split of a prepared directory as a single read-only token sequence over its
    memory-mapped shards.

    Args:
        path: a prepared directory.
        split: ``"train"`` or ``"val"``.
    """

    def __init__(self, path: PathLike, split: str) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.meta = read_meta(path)
        self.split = split
        self.shards = [open_shard(Path(path) / name) for name in self.meta[f"{split}_shards"]]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        if int(self.starts[-1]) != self.meta[f"{split}_tokens"]:
            raise DataError(f"{path}: the {split} shards hold {int(self.starts[-1])} tokens, meta.json says {self.meta[f'{split}_tokens']}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, across shard boundaries if needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the {len(self)}-token {self.split} split")
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[shard])
            part = self.shards[shard][offset : offset + length]
            parts.append(part)
            start += len(part)
            length -= len(part)
            shard += 1
        return np.concatenate(parts).astype(np.int64)

    def check_fits(self, context_length: int) -> None:
        """A clear error when the split is too short for one ``context_length`` window."""
        if len(self) < context_length + 1:
            raise DataError(
                f"the {self.split} split has {len(self)} tokens, fewer than context_length + 1 = {context_length + 1}; "
                + ("prepare more text or use a shorter --context-length" if self.split == "train"
                   else "prepare with a larger --val-fraction or use a shorter --context-length")
            )


def _to_batch(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class RandomWindows:
    """Training batches: ``batch_size`` windows at random positions.

    The positions of micro-batch ``micro`` of step ``step`` depend only on
    ``(seed, step, micro)``, so a run that resumes at step ``s`` reads exactly what it would
    have read, and distributed ranks pick disjoint micro-batch indices.
    """

    def __init__(self, stream: TokenStream, batch_size: int, context_length: int, seed: int) -> None:
        stream.check_fits(context_length)
        self.stream = stream
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = seed

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both ``(batch_size, context_length)`` int64 on the CPU;
        ``targets`` are ``inputs`` shifted left by one token."""
        rng = np.random.default_rng([self.seed, step, micro])
        window = self.context_length + 1
        starts = rng.integers(0, len(self.stream) - window + 1, size=self.batch_size)
        return _to_batch(np.stack([self.stream.read(int(s), window) for s in starts]))


def eval_windows(
    stream: TokenStream, batch_size: int, context_length: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches: consecutive non-overlapping windows from the start of the split,
    at most ``max_batches`` batches of up to ``batch_size`` windows (the last may be short)."""
    stream.check_fits(context_length)
    window = context_length + 1
    starts = list(range(0, len(stream) - window + 1, context_length))[: batch_size * max_batches]
    for i in range(0, len(starts), batch_size):
        yield _to_batch(np.stack([stream.read(s, window) for s in starts[i : i + batch_size]]))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories of them, JSONL files with a 'text' field")
    parser.add_argument("--out", required=True, help="directory for the shards and meta.json")
    parser.add_argument("--tokenizer", default="gpt2", help="'gpt2' (bundled) or the path of a ranks file")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="share of the tokens (the last ones) kept for validation")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes for large inputs (default: CPU count)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per training shard")


def run(args: argparse.Namespace) -> int:
    """The ``fusedgpt prepare`` command."""
    meta = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
    )
    print(
        f"{args.out}: {meta['train_tokens']:,} training tokens in {len(meta['train_shards'])} shard(s), "
        f"{meta['val_tokens']:,} validation tokens ({meta['tokenizer']}, vocabulary {meta['vocab_size']:,})"
    )
    return 0
