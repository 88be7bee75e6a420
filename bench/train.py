"""End-to-end training throughput: tokens/s of a whole step (forward, backward, AdamW).

    python -m bench.train                     # CUDA: gpt2 preset, bf16 autocast, kernels on vs off
    python -m bench.train --preset small      # CPU: the reference path vs GPT-2 written the usual way

On CUDA it reports tokens/s and MFU (against the GPU's dense bf16 peak) for fusedgpt with
its Triton kernels, with the reference ops, and for the plain GPT-2 of ``bench/plain_gpt.py``
(SDPA attention, ``F.cross_entropy`` on full logits). On CPU the kernels would run in the
interpreter, which says nothing about speed, so it compares fusedgpt's fallback path
(``backend="torch"``) with the plain model, timed alternately in the same run with the same
weights and batches, and prints the ratio: the fallback must not be slower than the usual way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

import torch

from bench import common
from fusedgpt.cli import HelpFormatter
from fusedgpt.hardware import autocast, bf16_peak_flops, resolve_device


def _step_seconds(model: torch.nn.Module, batches: list, device: torch.device) -> float:
    """Wall seconds of one optimizer step on ``batches`` (the median after a warm-up step),
    under the autocast training uses on ``device``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    times = []
    for index, (idx, targets) in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device):
            loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:  # the first step pays for allocation and autotuning
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: gpt2 on CUDA, small on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="windows per step (default: 8 on CUDA, 4 on CPU)")
    parser.add_argument("--context", type=int, default=None, help="tokens per window (default: the preset's)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per provider (plus one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (CPU noise)")
    parser.add_argument("--out", default=None, help="results directory (default: bench/results/<device>-<date>)")
    args = parser.parse_args(argv)

    from bench.plain_gpt import PlainGPT
    from fusedgpt.model.config import GPTConfig
    from fusedgpt.model.gpt import GPT
    from fusedgpt.train.trainer import flops_per_token

    device = resolve_device("auto")
    cuda = device.type == "cuda"
    preset = args.preset or ("gpt2" if cuda else "small")
    sizes = {"context_length": args.context} if args.context else {}
    config = GPTConfig.from_preset(preset, backend="torch", **sizes)
    batch = args.batch or (8 if cuda else 4)
    t = config.context_length
    torch.manual_seed(0)
    reference_model = GPT(config).to(device)
    providers = {"fusedgpt (reference ops)": reference_model}
    if cuda:
        kernels_model = GPT(GPTConfig.from_preset(preset, backend="triton", **sizes)).to(device)
        kernels_model.load_state_dict(reference_model.state_dict())
        providers = {"fusedgpt (Triton kernels)": kernels_model, **providers}
    plain = PlainGPT(config, attention="sdpa").to(device)
    plain.load_state_dict(reference_model.state_dict())
    providers["plain GPT-2 (SDPA, full logits)"] = plain

    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, config.vocab_size, (batch, t), generator=generator).to(device),
                torch.randint(0, config.vocab_size, (batch, t), generator=generator).to(device))
               for _ in range(args.steps + 1)]
    seconds: dict[str, list] = {name: [] for name in providers}
    for _ in range(args.rounds):
        for name, model in providers.items():
            model.train()
            seconds[name].append(_step_seconds(model, batches, device))

    peak = bf16_peak_flops(device)
    flops = flops_per_token(reference_model, t)
    rows = []
    for name, samples in seconds.items():
        step = statistics.median(samples)
        tokens_per_s = batch * t / step
        row = dict(provider=name, step_ms=step * 1e3, tokens_per_s=tokens_per_s)
        if peak:
            row["MFU_pct"] = 100 * flops * tokens_per_s / peak
        rows.append(row)
    header = (f"{preset} (batch {batch}, T={t}, {'bf16 autocast' if cuda else 'fp32'}) on "
              f"{common.device_label(device)}; " + " ".join(f"{k}={v}" for k, v in common.versions().items()))
    table = common.markdown_table(rows, ["provider", "step_ms", "tokens_per_s", "MFU_pct"])
    print(header + "\n\n" + table)
    ratio = ""
    if not cuda:
        fallback, usual = rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]
        ratio = f"fallback / usual tokens/s = {fallback / usual:.3f} (CPU timings of the reference path, not kernel speed)"
        print("\n" + ratio)
    out = common.results_dir(device, args.out)
    with open(os.path.join(out, "train.md"), "w") as handle:
        handle.write(f"{header}\n\n{table}\n\n{ratio}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
