"""Memory audit: bytes saved for backward by one GPT-2 block and by the head + loss, eager
vs fused, at GPT-2 124M training shapes.

    python -m bench.memory [--batch 8 --context 1024 --dtype fp32|bf16]

Measured, not modelled: the forward runs under ``FakeTensorMode`` (shapes and dtypes
propagate, nothing is computed or allocated; the fused ops supply their fake
implementations through ``torch.library``) inside ``saved_tensors_hooks``, which sees every
tensor autograd keeps. Tensors are deduplicated by storage, parameters are left out (they
exist either way), and every storage's full size is counted. Eager path: textbook attention
that materialises the T x T probabilities, ``F.layer_norm`` + a separate residual add,
``F.cross_entropy`` on the full logits. Fused path: ``fusedgpt.model.GPT``'s block and loss.
It runs on CPU; the figures are the same on any device for the same shapes and dtypes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from bench import common


def saved_for_backward(run: Callable[[], torch.Tensor], parameters: list) -> list[tuple]:
    """(bytes, shape, dtype) of every storage autograd saves while ``run`` executes,
    once per storage, parameters excluded."""
    parameter_storages = {StorageWeakRef(p.untyped_storage()) for p in parameters}
    seen: dict = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(tensor.untyped_storage())
        if key not in parameter_storages and key not in seen:
            seen[key] = (tensor.untyped_storage().nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return list(seen.values())


def audit(batch: int, context: int, dtype: torch.dtype) -> list[dict]:
    from fusedgpt.model.config import GPTConfig

    config = GPTConfig.from_preset("gpt2", context_length=context, backend="triton")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters and inputs are created in the audited dtype
    try:
        with FakeTensorMode():
            rows = _audit_cases(config, batch, dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    return rows


def _audit_cases(config, batch: int, dtype: torch.dtype) -> list[dict]:
    from bench.plain_gpt import PlainBlock
    from fusedgpt.model.gpt import GPT, Block, language_model_loss

    n, t, c, v = batch * config.context_length, config.context_length, config.n_embd, config.vocab_size
    rows = []
    stream = torch.randn(batch, t, c, dtype=dtype, requires_grad=True)
    branch = torch.randn(batch, t, c, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (batch, t))

    plain = PlainBlock(config, attention="math")
    fused = Block(config, layer=0)
    cases = [
        ("block", "eager (math attention)", lambda: plain(stream), list(plain.parameters())),
        ("block", "fused", lambda: fused(branch, stream, None, None), list(fused.parameters())),
    ]
    model = GPT(config)
    head = model.lm_head.weight
    ln_f = model.transformer.ln_f

    def eager_head():
        normed = F.layer_norm(stream, (c,), ln_f.weight, ln_f.bias)
        return F.cross_entropy(F.linear(normed, head).flatten(0, 1).float(), targets.flatten())

    def fused_head():
        normed, _ = ln_f(branch, stream)
        return language_model_loss(normed.reshape(n, c), head, targets.reshape(n), backend="triton")

    cases += [
        ("head + loss", "eager (full logits)", eager_head, [head, ln_f.weight, ln_f.bias]),
        ("head + loss", "fused", fused_head, [head, ln_f.weight, ln_f.bias]),
    ]
    for part, path, run, parameters in cases:
        saved = saved_for_backward(run, parameters)
        total = sum(size for size, _, _ in saved)
        square = [shape for _, shape, _ in saved if len(shape) >= 2 and shape[-1] == t and shape[-2] == t]
        largest = max(saved, key=lambda item: item[0]) if saved else (0, (), None)
        rows.append(dict(part=part, path=path, saved_MiB=total / 2**20, tensors=len(saved),
                         largest=f"{list(largest[1])} {str(largest[2])[6:]}",
                         TxT_tensors=len(square)))
    return rows


COLUMNS = ["part", "path", "saved_MiB", "tensors", "largest", "TxT_tensors"]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                        help="fp16 gives the byte counts of bf16 too (same sizes)")
    parser.add_argument("--out", default="bench/results/memory", help="where the table and chart go")
    args = parser.parse_args(argv)
    if common.needs_interpreter_restart():
        # The fused path is what the dispatcher picks for these (fake) CPU tensors only
        # under the interpreter; nothing is launched either way.
        common.restart_under_interpreter("bench.memory", argv or sys.argv[1:])
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    rows = audit(args.batch, args.context, dtype)
    fused_txt = [r for r in rows if r["path"] == "fused" and r["TxT_tensors"]]
    for part in ("block", "head + loss"):
        eager, fused = (r for r in rows if r["part"] == part)
        fused["eager/fused"] = eager["saved_MiB"] / fused["saved_MiB"]
    title = f"GPT-2 124M, batch {args.batch}, T={args.context}, {args.dtype}: bytes saved for backward"
    table = common.markdown_table(rows, COLUMNS + ["eager/fused"])
    print(title + "\n\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"memory-{args.dtype}.md"), "w") as handle:
        handle.write(f"{title} (measured with saved_tensors_hooks under FakeTensorMode; "
                     f"`python -m bench.memory --dtype {args.dtype}`)\n\n{table}\n")
    common.bar_chart(os.path.join(args.out, f"memory-{args.dtype}.png"), [f"{r['part']}: {r['path']}" for r in rows],
                     [r["saved_MiB"] for r in rows], title, "MiB saved for backward")
    if fused_txt:
        print(f"FAIL: the fused path saves a T x T tensor: {fused_txt}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
