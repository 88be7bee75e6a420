"""Packed vs padded instruction batches: tokens/s and memory saved for backward.

    python -m bench.packing [--preset llama-tiny --batch-size 8 --batches 8 --backend torch]

The bundled instruction set (``fusedgpt finetune-instruct``'s default data, Alpaca template,
GPT-2 tokens) in the command's batches, each run two ways on the same model: padded to its
longest example (``collate``) and packed into one row with variable-length attention
(``pack``, ``cu_seqlens``). Per batch, forward + backward of the loss (no optimizer step),
the two ways interleaved so that other load on the machine hits both alike.

- tokens/s: the batch's real tokens (padding not counted) over the wall time. On a CPU with
  ``--backend torch`` this is the reference path's speed, a ratio between the two layouts,
  never a kernel's speed.
- memory: bytes autograd saves for backward (``saved_tensors_hooks``; storages counted once,
  parameters left out), the largest batch's; it is what grows with the positions computed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fusedgpt.model import Llama, LlamaConfig
from fusedgpt.model.tokenizer import get_tokenizer
from fusedgpt.train import finetune
from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.finetune_instruct import IGNORE_INDEX, TEMPLATES, collate, encode_instructions, pack


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph."""
    storages: dict = {}

    def keep(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[StorageWeakRef(storage)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        run()
    return sum(storages.values())


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    tokenizer = get_tokenizer("gpt2")
    model = Llama(LlamaConfig.from_preset(args.preset, vocab_size=tokenizer.n_vocab, backend=args.backend))
    examples = fdata.instruction_dataset()["train"]
    data, _ = encode_instructions(examples, tokenizer, TEMPLATES["alpaca"], model.config.context_length)
    batches = finetune.epoch_batches(len(data), args.batch_size, seed=0, epoch=1)[: args.batches]

    def padded(batch):
        inputs, targets = collate(batch, tokenizer.eot_token, mask_prompt=False)
        return lambda: model(inputs, targets), inputs.numel()

    def packed(batch):
        inputs, targets, cu_seqlens = pack(batch, mask_prompt=False)
        return lambda: model(inputs, targets, cu_seqlens=cu_seqlens), inputs.numel()

    totals = {name: dict(seconds=0.0, tokens=0, positions=0, saved=0) for name in ("padded", "packed")}
    for indices in batches:
        batch = [data[i] for i in indices]
        real_tokens = sum(len(e.tokens) - 1 for e in batch)
        for name, layout in (("padded", padded), ("packed", packed)):
            loss_of, positions = layout(batch)
            total = totals[name]
            total["saved"] = max(total["saved"], saved_bytes(loss_of))
            start = time.perf_counter()
            loss_of().backward()
            total["seconds"] += time.perf_counter() - start
            total["tokens"] += real_tokens
            total["positions"] += positions
            model.zero_grad(set_to_none=True)
    return totals


def report(totals: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    rows = [f"{args.preset}, batch {args.batch_size}, {args.batches} batches of the bundled instruction set, "
            f"backend={args.backend}, {torch.get_num_threads()} CPU threads (`python -m bench.packing`)", "",
            "| layout | positions computed | real tokens | tokens/s | saved for backward (largest batch) |",
            "| --- | --- | --- | --- | --- |"]
    for name, t in totals.items():
        rows.append(f"| {name} | {t['positions']:,} | {t['tokens']:,} | {t['tokens'] / t['seconds']:,.0f} | "
                    f"{t['saved'] / 2**20:.2f} MiB |")
    pad, pack_ = totals["padded"], totals["packed"]
    speed = (pack_["tokens"] / pack_["seconds"]) / (pad["tokens"] / pad["seconds"])
    rows += ["", f"packed / padded: tokens/s x{speed:.2f}, positions computed x{pack_['positions'] / pad['positions']:.2f}, "
                 f"memory saved for backward x{pack_['saved'] / pad['saved']:.2f}"]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-tiny", help="a Llama-family preset (GPT-2 vocabulary)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch (finetune-instruct's default)")
    parser.add_argument("--batches", type=int, default=8, help="batches measured")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"))
    args = parser.parse_args(argv)
    print(report(measure(args), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
