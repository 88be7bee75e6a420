"""Byte-level BPE trainer speed (a CPU workload: these are CPU timings on purpose).

    python -m bench.bpe                                  # 4096 tokens on the bundled 5 MB corpus
    python -m bench.bpe --vocab-size 8192 --text FILE --save out.tiktoken

The target (issue 5): 4096 tokens on 5 MB of text in under a minute on a 2-core machine.
Reports the training wall time, then encodes the corpus with the result and with GPT-2 and
prints the bytes per token of each, as a check that the merges compress.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from fusedgpt.model.tokenizer import get_tokenizer, save_bpe, shakespeare_path, train_bpe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--text", type=Path, default=shakespeare_path(), help="UTF-8 training text (default: bundled Shakespeare)"
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--save", type=Path, help="write the trained tokenizer here (save_bpe)")
    args = parser.parse_args()

    text = args.text.read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"text: {args.text} ({n_bytes:,} bytes)")

    start = time.perf_counter()
    bpe = train_bpe(text, args.vocab_size)
    seconds = time.perf_counter() - start
    print(f"train_bpe: {bpe.n_vocab:,} tokens ({len(bpe.merges):,} merges) in {seconds:.2f} s")

    for name, encoding in [("trained", bpe.encoding()), ("gpt2", get_tokenizer("gpt2"))]:
        start = time.perf_counter()
        ids = encoding.encode_ordinary(text)
        seconds = time.perf_counter() - start
        assert encoding.decode(ids) == text, f"{name}: decode(encode(text)) != text"
        print(f"{name:>8}: {len(ids):,} tokens, {n_bytes / len(ids):.2f} bytes/token, encoded in {seconds:.2f} s")
    if args.save:
        print(f"saved {save_bpe(bpe, args.save)}")


if __name__ == "__main__":
    main()
