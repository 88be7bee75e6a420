"""torchrun: two CPU processes with gloo -- replicated (DDP) or sharded (FSDP2) -- follow
the same loss trajectory as one process with twice the gradient accumulation (same
windows, same mean loss, same update)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fusedgpt.train.trainer import Trainer, resolve_config

from .conftest import tiny_config

STEPS = 4


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_double_accumulation(corpus_dir, tmp_path, sharding):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "fusedgpt", "train", "--preset", "tiny", "--n-embd", "32", "--n-head", "2",
        "--data", str(corpus_dir), "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "2",
        "--grad-accum", "1", "--context-length", "16", "--lr", "3e-3", "--warmup-steps", "2",
        "--eval-every", "1000", "--eval-batches", "1", "--sample-tokens", "0", "--seed", "7",
        "--device", "cpu", "--no-progress", *sharding,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ("on 2 x cpu (FSDP)" if sharding else "on 2 x cpu (DDP)") in done.stdout
    assert done.stdout.count("final validation loss") == 1  # only rank 0 prints

    single = Trainer(tiny_config(corpus_dir, tmp_path / "single", max_steps=STEPS, grad_accum=2)).run()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [r["train_loss"] for r in lines if "train_loss" in r]
    assert len(ddp_losses) == STEPS  # one record per step: only rank 0 logs
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single.train_losses), rtol=1e-5, atol=1e-5)
    ddp_weights = load_file(out / f"ckpt_{STEPS:08d}" / "model.safetensors")
    single_weights = load_file(tmp_path / "single" / f"ckpt_{STEPS:08d}" / "model.safetensors")
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # The checkpoint holds whole tensors, so one process can carry the run on.
    cfg, checkpoint = resolve_config({"out": str(out), "resume": True, "fsdp": False, "max_steps": STEPS + 1})
    resumed = Trainer(cfg, resume_from=checkpoint).run()
    assert resumed.step == STEPS + 1 and all(map(math.isfinite, resumed.train_losses))


def test_setup_takes_an_indexed_device_in_one_process_only(monkeypatch):
    from fusedgpt.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun every process takes cuda:LOCAL_RANK; use --device cuda"):
        distributed.setup("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        distributed.setup("cuda:1")
