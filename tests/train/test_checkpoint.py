"""Checkpoints: round trip, keep-last, atomic saves, and clear errors for damaged files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fusedgpt.cli import main
from fusedgpt.model.config import GPTConfig
from fusedgpt.model.gpt import GPT
from fusedgpt.io import atomic
from fusedgpt.io import checkpoint as ckpt
from fusedgpt.io.checkpoint import CheckpointError


def save(out, step, model, optimizer, meta=None, **kwargs):
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    return ckpt.save_checkpoint(out, step, weights, optimizer.state_dict(), meta or {}, **kwargs)


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=97, n_embd=16, n_head=2, context_length=8, backend="torch"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 97, (2, 8))
    model(idx, idx).backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = model_and_optimizer()
    torch.manual_seed(123)
    path = save(tmp_path, 5, model, optimizer, {"model": model.config.to_dict(), "note": "x"})
    expected_draw = torch.rand(3)
    assert path.name == "ckpt_00000005" and ckpt.latest_checkpoint(tmp_path) == path

    restored, restored_opt = model_and_optimizer(seed=1)
    opened = ckpt.open_checkpoint(tmp_path)  # the run directory resolves to its newest
    assert opened.step == 5 and opened.meta["note"] == "x"
    opened.load_weights(restored)
    state = opened.load_state()
    restored_opt.load_state_dict(state["optimizer"])
    ckpt.set_rng_state(state["rng"])
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name
    assert restored.lm_head.weight is restored.transformer.wte.weight  # still tied
    for a, b in zip(optimizer.state.values(), restored_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(torch.rand(3), expected_draw)


def test_keeps_only_the_last_k(tmp_path):
    model, optimizer = model_and_optimizer()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000003", "ckpt_00000004"]


def test_a_save_behind_a_newer_checkpoint_keeps_both(tmp_path):
    """A run resumed behind a newer (damaged) checkpoint: pruning counts only the steps up
    to the one saved, so neither the new checkpoint nor the newer one is deleted."""
    model, optimizer = model_and_optimizer()
    save(tmp_path, 5, model, optimizer)
    new = save(tmp_path, 3, model, optimizer, keep_last=1)
    assert ckpt.list_checkpoints(tmp_path) == [new, tmp_path / "ckpt_00000005"]
    save(tmp_path, 4, model, optimizer, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000004", "ckpt_00000005"]


def test_saving_a_step_again_never_loses_the_checkpoint(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer()
    target = save(tmp_path, 5, model, optimizer, {"note": "first"})
    real_rename = os.rename

    def fail_into_place(src, dst):
        if os.fspath(dst) == os.fspath(target):
            raise KeyboardInterrupt  # after the old copy moved aside, before the new one arrives
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_into_place)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 5, model, optimizer, {"note": "second"})
    monkeypatch.setattr(os, "rename", real_rename)
    assert ckpt.list_checkpoints(tmp_path) == [target]
    assert ckpt.open_checkpoint(target).meta["note"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]

    save(tmp_path, 5, model, optimizer, {"note": "second"})
    assert ckpt.open_checkpoint(tmp_path).meta["note"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]

    # A process killed between the two renames leaves the old copy at the backup path and a
    # stale temporary: the next save clears the temporary and puts the checkpoint back.
    os.rename(target, atomic.backup_path(target))
    atomic.staging_path(target).mkdir()
    save(tmp_path, 6, model, optimizer, {"note": "third"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, "ckpt_00000006"]
    assert ckpt.open_checkpoint(target).meta["note"] == "second"
    # ... and so does listing the checkpoints (for --resume or generate).
    os.rename(target, atomic.backup_path(target))
    assert ckpt.list_checkpoints(tmp_path) == [target, tmp_path / "ckpt_00000006"]


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer()
    good = save(tmp_path, 1, model, optimizer)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, optimizer)
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no temporary left
    ckpt.open_checkpoint(tmp_path)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors has .* bytes.*truncated"),
        (lambda d: truncate(d / "state.pt"), "state.pt has .* bytes.*truncated"),
        (lambda d: flip_a_byte(d / "model.safetensors"), "model.safetensors does not match its recorded sha256"),
        (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
        (lambda d: (d / "meta.json").write_text("{not json"), "cannot read meta.json"),
        (lambda d: (d / "meta.json").write_text(json.dumps({"step": 1})), "not a fusedgpt checkpoint record"),
    ],
    ids=["truncated-weights", "truncated-state", "flipped-byte", "missing-state", "garbage-meta", "foreign-meta"],
)
def test_damaged_checkpoints_are_clear_errors(tmp_path, damage, message):
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 3, model, optimizer)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        ckpt.open_checkpoint(path)


def test_a_run_directory_falls_back_past_damaged_checkpoints(tmp_path):
    model, optimizer = model_and_optimizer()
    first, second, third = (save(tmp_path, step, model, optimizer, keep_last=3) for step in (1, 2, 3))
    flip_a_byte(third / "model.safetensors")
    truncate(second / "state.pt")
    with pytest.warns(UserWarning) as warned:
        assert ckpt.open_checkpoint(tmp_path).path == first
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2
    assert f"checkpoint {third} is damaged: model.safetensors does not match its recorded sha256" in messages[0]
    assert f"checkpoint {second} is damaged: state.pt has" in messages[1]
    assert all(m.endswith(f"using {first}") for m in messages)
    with pytest.raises(CheckpointError, match="ckpt_00000003 is damaged: model.safetensors"):
        ckpt.open_checkpoint(third)  # a checkpoint named directly must verify
    truncate(first / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path} verifies: .*ckpt_00000003.*ckpt_00000001"):
        ckpt.open_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_model(tmp_path):
    model, optimizer = model_and_optimizer()
    save(tmp_path, 1, model, optimizer)
    other = GPT(GPTConfig.from_preset("tiny", vocab_size=97, n_embd=32, n_head=2, context_length=8, backend="torch"))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        ckpt.open_checkpoint(tmp_path).load_weights(other)


def test_resume_from_a_damaged_checkpoint_is_reported_without_a_traceback(tmp_path, capsys):
    model, optimizer = model_and_optimizer()
    path = save(tmp_path / "run", 4, model, optimizer)
    truncate(path / "model.safetensors")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "model.safetensors" in err and "Traceback" not in err
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
