"""The training loop: exact resume, Ctrl-C, divergence, configuration, and the command."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import struct

import pytest
import torch
from safetensors.torch import load_file

from fusedgpt.cli import build_parser, main
from fusedgpt.model.config import PRESETS, GPTConfig
from fusedgpt.model.gpt import GPT
from fusedgpt.io import checkpoint as ckpt
from fusedgpt.train.trainer import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    config_from_args,
    resolve_config,
)

from .conftest import tiny_config


def weights(checkpoint_dir):
    return load_file(checkpoint_dir / "model.safetensors")


def records(out, key):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


class InterruptedAfter(Trainer):
    """Sends itself SIGINT (a real Ctrl-C) in the middle of step ``stop_at``."""

    stop_at = 10

    def train_step(self, step):
        result = super().train_step(step)
        if step + 1 == self.stop_at:
            signal.raise_signal(signal.SIGINT)
        return result


def test_ctrl_c_then_resume_is_bitwise_the_uninterrupted_run(corpus_dir, tmp_path):
    # Dropout and gradient accumulation on, so RNG state and micro-batch order matter.
    cfg = tiny_config(corpus_dir, tmp_path / "straight", max_steps=20, grad_accum=2,
                      model={"n_embd": 32, "n_head": 2, "dropout": 0.1}, save_every=10)
    straight = Trainer(cfg).run()
    assert straight.status == "done" and len(straight.train_losses) == 20

    split_out = tmp_path / "split"
    first = InterruptedAfter(dataclasses.replace(cfg, out=str(split_out), save_every=0)).run()
    assert first.status == "interrupted" and first.step == 10
    assert [p.name for p in ckpt.list_checkpoints(split_out)] == ["ckpt_00000010"]
    # Everything else comes from the checkpoint's stored configuration.
    resumed_cfg, checkpoint = resolve_config({"out": str(split_out), "resume": True})
    assert resumed_cfg == dataclasses.replace(cfg, out=str(split_out), save_every=0, resume=True)
    assert checkpoint.path == split_out / "ckpt_00000010"
    second = Trainer(resumed_cfg, resume_from=checkpoint).run()

    assert first.train_losses + second.train_losses == straight.train_losses  # bitwise
    final, split_final = weights(tmp_path / "straight" / "ckpt_00000020"), weights(split_out / "ckpt_00000020")
    assert final.keys() == split_final.keys()
    assert all(torch.equal(final[k], split_final[k]) for k in final)
    assert [s for s, _ in records(split_out, "train_loss")] == list(range(1, 21))
    assert records(split_out, "val_loss") == records(tmp_path / "straight", "val_loss")

    # Resuming a run from its middle drops the metrics it logged after that point.
    (tmp_path / "straight" / "ckpt_00000020").rename(tmp_path / "straight" / "old_20")
    Trainer(dataclasses.replace(cfg, resume=True, max_steps=12)).run()
    assert [s for s, _ in records(tmp_path / "straight", "train_loss")] == list(range(1, 13))


class NanAtStep(Trainer):
    """A loss that turns NaN at optimizer step ``bad_step`` (1-based)."""

    bad_step = 3

    def train_step(self, step):
        self.current = step + 1
        return super().train_step(step)

    def micro_step_loss(self, x, y):
        loss = super().micro_step_loss(x, y)
        return loss * float("nan") if self.current == self.bad_step else loss


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus_dir, tmp_path):
    trainer = NanAtStep(tiny_config(corpus_dir, tmp_path, save_every=2))
    with pytest.raises(TrainingDiverged, match=r"non-finite training loss \(nan\) at step 3.*ckpt_00000002"):
        trainer.run()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000002"]
    assert all(torch.isfinite(t).all() for t in trainer.model.state_dict().values())


def test_config_precedence_defaults_toml_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.5\nbatch_size = 3\n[model]\nn_layer = 3\nn_embd = 64\n')
    args = build_parser().parse_args(["train", "--config", str(toml), "--lr", "0.1", "--n-embd", "48", "--no-progress"])
    cfg, resume_from = config_from_args(args)
    assert (cfg.lr, cfg.batch_size, cfg.progress) == (0.1, 3, False) and resume_from is None
    assert cfg.preset == "mini" and cfg.model == {"n_layer": 3, "n_embd": 48}
    assert cfg.max_steps == TrainConfig().max_steps
    assert resolve_config({"preset": "tiny", "model.n_layer": 1})[0].model == {"n_layer": 1}
    # The embedded job is a named preset, unchanged: 4 layers of width 128 over 128 tokens.
    default = resolve_config({})[0]
    assert (default.preset, default.model) == ("mini", {})
    assert PRESETS["mini"] == {"n_layer": 4, "n_head": 4, "n_embd": 128, "context_length": 128}
    toml.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown training options \\['learning_rate'\\]"):
        resolve_config({}, str(toml))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        resolve_config({"batch_size": 0})


def test_a_named_preset_trains_at_its_own_context_length(corpus_dir, tmp_path):
    """A named preset trains at its own context; the embedded job keeps its 128 tokens."""
    flags = {"data": str(corpus_dir), "progress": False}
    small, _ = resolve_config({**flags, "out": str(tmp_path / "small"), "preset": "small", "model.n_layer": 1,
                               "model.n_embd": 32, "model.n_head": 2})
    assert small.context_length is None
    assert Trainer(small).context_length == PRESETS["small"]["context_length"] == 256
    embedded, _ = resolve_config({**flags, "out": str(tmp_path / "embedded")})
    assert Trainer(embedded).context_length == 128
    assert Trainer(dataclasses.replace(small, out=str(tmp_path / "flag"), context_length=32)).context_length == 32


@pytest.fixture
def two_step_run(corpus_dir, tmp_path):
    """A finished run of 2 steps (checkpoints at steps 1 and 2) to resume."""
    out = tmp_path / "run"
    Trainer(tiny_config(corpus_dir, out, max_steps=2, save_every=1, sample_tokens=0)).run()
    return out


def test_resume_refuses_a_changed_model(two_step_run, capsys):
    cfg, checkpoint = resolve_config({"out": str(two_step_run), "resume": True, "max_steps": 3,
                                      "model.n_layer": 3, "context_length": 32})
    with pytest.raises(ValueError, match=r"context_length 32 \(the checkpoint has 16\); n_layer 3 \(the checkpoint has 2\)"):
        Trainer(cfg, resume_from=checkpoint)
    assert main(["train", "--out", str(two_step_run), "--resume", "--max-steps", "3", "--n-embd", "64",
                 "--no-progress"]) == 2
    assert "n_embd 64 (the checkpoint has 32)" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(two_step_run).name == "ckpt_00000002"  # nothing ran, nothing recorded


def test_resume_verifies_the_checkpoint_once(two_step_run, monkeypatch):
    hashed = []
    real_sha256 = ckpt.atomic.sha256
    monkeypatch.setattr(ckpt.atomic, "sha256", lambda path: hashed.append(path) or real_sha256(path))
    assert main(["train", "--out", str(two_step_run), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    resumed = two_step_run / "ckpt_00000002"
    assert sorted(p.name for p in hashed if p.parent == resumed) == ["model.safetensors", "state.pt"]


def test_resume_falls_back_past_a_damaged_newest_checkpoint(two_step_run, capsys):
    newest = two_step_run / "ckpt_00000002"
    expected = {name: t.clone() for name, t in weights(newest).items()}  # copies: the file is memory-mapped
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["train", "--out", str(two_step_run), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping a newer checkpoint: checkpoint {newest} is damaged: model.safetensors" in captured.err
    assert "resuming at step 1" in captured.out
    # Step 2 ran again from step 1 and replaced the damaged checkpoint with the same weights.
    assert ckpt.open_checkpoint(two_step_run).path == newest
    resaved = weights(newest)
    assert all(torch.equal(resaved[k], expected[k]) for k in expected)


def test_lr_warmup_then_cosine_to_min_lr():
    schedule = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20).optimization()
    lrs = [schedule.lr_at(s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(schedule.lr_at(12), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(schedule.lr_at(20), 0.1)


def test_weight_decay_on_matrices_only():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50, n_embd=16, n_head=2, backend="torch"))
    decay, no_decay = TrainConfig(weight_decay=0.2).optimization().optimizer(model, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2} and {p.dim() for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_train_command_on_a_text_file(tmp_path, corpus_text, capsys):
    (tmp_path / "corpus.txt").write_text(corpus_text)
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--n-embd", "32", "--n-head", "2", "--data", str(tmp_path / "corpus.txt"),
            "--val-fraction", "0.05", "--out", str(out), "--max-steps", "4", "--batch-size", "2",
            "--context-length", "16", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "3", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 0: initial validation loss" in printed and "step 4: final validation loss" in printed
    assert "sample:" in printed
    assert [s for s, _ in records(out, "val_loss")] == [0, 2, 4]
    assert [s for s, _ in records(out, "train_loss")] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for _, v in records(out, "train_loss"))
    assert png_size(out / "loss.png") == (800, 600)  # loss curves over the learning-rate panel
    assert (out / "data" / "meta.json").is_file() and ckpt.latest_checkpoint(out).name == "ckpt_00000004"

    assert main(argv) == 2  # a fresh run must not overwrite a run
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert ckpt.latest_checkpoint(out).name == "ckpt_00000006"
    assert [s for s, _ in records(out, "train_loss")] == list(range(1, 7))
