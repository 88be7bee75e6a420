"""Fault injection: nothing a user made is ever lost or mislabelled.

Each test provokes one failure a real user meets -- a diverging run, a full disk, a second
process on the same run, a torn or damaged file, an output directory holding the user's
own files -- through the real command line or trainer on a tiny model, and checks that it
ends in a clear message with every earlier result intact (docs/guarantees.md lists them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusedgpt.cli import main
from fusedgpt.io import atomic
from fusedgpt.io import checkpoint as ckpt
from fusedgpt.io import jsonl
from fusedgpt.io.runlock import LOCK_FILE, RunDirectoryBusy, RunLock, holder_pid
from fusedgpt.io.written import RECORD_FILE
from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.data import DataError, prepare
from fusedgpt.train.trainer import Trainer, TrainingDiverged

from .conftest import tiny_config


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """``fusedgpt train`` on the tiny model of ``tiny_config`` (2 layers, width 32, 16 tokens)."""
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--n-embd", "32", "--n-head", "2",
            "--context-length", "16", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "0",
            "--warmup-steps", "1", "--seed", "7", "--no-progress", *extra]


def finite_on_disk(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(checkpoint / ckpt.WEIGHTS_FILE).values())


@pytest.fixture
def two_checkpoints(corpus_dir, tmp_path):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path / "run"
    assert main(train_argv(corpus_dir, out, "--max-steps", "2", "--save-every", "1", "--keep-last", "3")) == 0
    return out


# --------------------------------------------------------------------------- 1. divergence


class NaNGradientAt(Trainer):
    """Step ``bad_step`` (1-based) gets a finite loss but NaN gradients, as an overflow in
    backward gives."""

    bad_step = 5

    def train_step(self, step):
        if step + 1 != self.bad_step:
            return super().train_step(step)
        hook = self.model.transformer.wte.weight.register_hook(lambda grad: grad * float("nan"))
        try:
            return super().train_step(step)
        finally:
            hook.remove()


def test_a_nan_gradient_stops_before_the_step_and_names_the_real_last_good_checkpoint(corpus_dir, tmp_path):
    out = tmp_path / "run"
    trainer = NaNGradientAt(tiny_config(corpus_dir, out, save_every=2, keep_last=1))
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient norm \(nan\) at step 5 .*stopped without "
                                               r"updating the weights; the last good checkpoint is .*ckpt_00000004"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt_00000004"]
    assert finite_on_disk(out / "ckpt_00000004")
    # The run goes on from there.
    resumed = Trainer(tiny_config(corpus_dir, out, keep_last=1, resume=True)).run()
    assert resumed.status == "done" and resumed.step == 6 and finite_on_disk(resumed.checkpoint)


def test_non_finite_weights_are_never_saved(corpus_dir, tmp_path):
    trainer = Trainer(tiny_config(corpus_dir, tmp_path / "run"))
    with torch.no_grad():
        trainer.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="the weights hold NaN or infinite values at step 0; not saving them"):
        trainer.save()
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_pruning_keeps_the_newest_finite_checkpoint_and_no_one_calls_nan_weights_good(tmp_path):
    weights = {"w": torch.ones(3)}
    ckpt.save_checkpoint(tmp_path, 1, weights, None, {}, keep_last=1)
    ckpt.save_checkpoint(tmp_path, 2, {"w": torch.tensor([1.0, float("nan"), 0.0])}, None, {}, keep_last=1)
    ckpt.save_checkpoint(tmp_path, 3, {"w": torch.tensor([float("inf"), 0.0, 0.0])}, None, {}, keep_last=1)
    # keep_last=1 would leave only the NaN one; the finite step 1 survives as well.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000001", "ckpt_00000003"]
    assert json.loads((tmp_path / "ckpt_00000003" / "meta.json").read_text())["weights_finite"] is False
    with pytest.warns(UserWarning, match="ckpt_00000003 holds non-finite weights.*using .*ckpt_00000001"):
        assert ckpt.open_checkpoint(tmp_path).step == 1
    with pytest.raises(ckpt.CheckpointError, match="holds non-finite weights"):
        ckpt.open_checkpoint(tmp_path / "ckpt_00000003")
    ckpt.save_checkpoint(tmp_path, 4, weights, None, {}, keep_last=1)  # a finite one: now the old one may go
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000004"]


def test_fine_tuning_stops_at_a_nan_gradient_before_the_step(tmp_path, monkeypatch, capsys):
    from fusedgpt.train import finetune

    real_load_base = finetune.load_base

    def load_base_with_nan_gradients(*args, **kwargs):
        base = real_load_base(*args, **kwargs)
        base.model.transformer.wte.weight.register_hook(lambda grad: grad * float("nan"))
        return base

    monkeypatch.setattr(finetune, "load_base", load_base_with_nan_gradients)
    rows = [{"text": f"{word} {i}", "label": word} for i in range(10) for word in ("apple", "iron")]
    fdata.write_csv(tmp_path / "train.csv", rows, ("text", "label"))
    out = tmp_path / "run"
    assert main(["finetune-classify", "--data", str(tmp_path / "train.csv"), "--out", str(out), "--train", "all",
                 "--epochs", "1", "--max-length", "4", "--no-progress"]) == 2
    assert "error: non-finite gradient norm (nan) at step 1; stopped without updating the weights" in capsys.readouterr().err
    assert ckpt.list_checkpoints(out) == []


# --------------------------------------------------------------------------- 2. user files


def test_finetuning_never_writes_over_a_users_data(tmp_path, capsys):
    out = tmp_path / "run"
    mine = {"data/train.csv": "text,label\nmy own,row\n", "data/train.jsonl": '{"instruction": "mine"}\n'}
    for name, content in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content)
    for command in ("finetune-classify", "finetune-instruct"):
        assert main([command, "--out", str(out), "--epochs", "1", "--no-progress"]) == 2
        assert "holds files that fusedgpt did not write" in capsys.readouterr().err
    assert {name: (out / name).read_text() for name in mine} == mine


def test_an_output_is_judged_by_the_record_of_what_was_written_not_by_names(tmp_path, capsys):
    out = tmp_path / "run"
    # Fails after writing the bundled data (no such starting checkpoint)...
    argv = ["finetune-classify", "--out", str(out), "--checkpoint", str(tmp_path / "nope"), "--no-progress"]
    assert main(argv) == 2
    first = capsys.readouterr().err
    assert (out / "data" / "train.csv").is_file() and (out / RECORD_FILE).is_file()
    # ... so trying again may write there: every file in it is one the command wrote.
    assert main(argv) == 2
    assert capsys.readouterr().err == first
    # A file changed since, though same-named, is the user's now.
    with open(out / "data" / "val.csv", "a") as f:
        f.write("an edit,comedy\n")
    assert main(argv) == 2
    assert "did not write, or that changed since (data/val.csv)" in capsys.readouterr().err


def test_prepare_judges_an_earlier_preparation_by_content(tmp_path, corpus_text):
    (tmp_path / "a.txt").write_text(corpus_text[:3000])
    users = tmp_path / "users"
    users.mkdir()
    (users / "meta.json").write_text('{"my": "notes"}')
    with pytest.raises(DataError, match=r"did not write \(meta.json\)"):
        prepare([tmp_path / "a.txt"], users, progress=False)
    (users / "meta.json").unlink()
    (users / "train_0000.bin").write_bytes(b"my binary data")
    with pytest.raises(DataError, match=r"did not write \(train_0000.bin\)"):
        prepare([tmp_path / "a.txt"], users, progress=False)
    assert (users / "train_0000.bin").read_bytes() == b"my binary data"

    earlier = tmp_path / "earlier"
    prepare([tmp_path / "a.txt"], earlier, val_fraction=0.1, progress=False)
    (earlier / "train_0001.bin").write_bytes((earlier / "train_0000.bin").read_bytes())  # not in meta.json
    with pytest.raises(DataError, match=r"did not write \(train_0001.bin\)"):
        prepare([tmp_path / "a.txt"], earlier, progress=False)
    (earlier / "train_0001.bin").unlink()
    prepare([tmp_path / "a.txt"], earlier, val_fraction=0.2, progress=False)  # an earlier preparation is replaced
    assert json.loads((earlier / "meta.json").read_text())["val_fraction"] == 0.2


# --------------------------------------------------------------------------- 3. torn metrics


def test_resume_survives_a_torn_metrics_line(two_checkpoints, capsys):
    metrics = two_checkpoints / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "train_lo')  # what a full disk or a kill mid-append leaves
    assert main(["train", "--out", str(two_checkpoints), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert f"warning: {metrics}: line" in capsys.readouterr().err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]


def test_a_torn_tail_is_repaired_for_appends(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=f"{log}: line 3 is not a whole JSON record"):
        assert jsonl.read_records(log) == [{"step": 1}, {"step": 2}]
    with pytest.warns(UserWarning, match="dropping it"):
        jsonl.repair_torn_tail(log)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}')  # whole, only the newline was lost
    assert jsonl.repair_torn_tail(log) == [{"step": 1}] and log.read_text() == '{"step": 1}\n'


# --------------------------------------------------------------------------- 4. one writer


HOLD_LOCK = ("import sys; from fusedgpt.io.runlock import RunLock; lock = RunLock(sys.argv[1]); "
             "print('locked', flush=True); sys.stdin.read()")


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_no_obstacle(two_checkpoints, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(two_checkpoints)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = sorted(p.name for p in two_checkpoints.iterdir())
        assert main(["train", "--out", str(two_checkpoints), "--resume", "--max-steps", "3", "--no-progress"]) == 2
        assert f"is in use: process {holder.pid} is writing to it" in capsys.readouterr().err
        with pytest.raises(RunDirectoryBusy, match=f"process {holder.pid}"):
            Trainer(tiny_config("unused", two_checkpoints, resume=True))
        assert sorted(p.name for p in two_checkpoints.iterdir()) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder_pid(two_checkpoints) == holder.pid  # its lock file stays behind, stale
    assert main(["train", "--out", str(two_checkpoints), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    with RunLock(two_checkpoints):
        assert holder_pid(two_checkpoints) == os.getpid()
    assert (two_checkpoints / LOCK_FILE).is_file()


# --------------------------------------------------------------------------- no pickled code runs


class RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: any code could stand there."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_that_runs_code_is_refused_not_run(two_checkpoints, tmp_path, capsys):
    from fusedgpt.model.hf import read_weights

    marker = tmp_path / "pwned"
    checkpoint = two_checkpoints / "ckpt_00000002"
    torch.save({"optimizer": RunsCodeWhenUnpickled(marker), "rng": {}}, checkpoint / ckpt.STATE_FILE)
    meta = json.loads((checkpoint / "meta.json").read_text())  # recorded as if it had been saved so
    meta["files"][ckpt.STATE_FILE] = {"bytes": (checkpoint / ckpt.STATE_FILE).stat().st_size,
                                      "sha256": atomic.sha256(checkpoint / ckpt.STATE_FILE)}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "--out", str(two_checkpoints), "--resume", "--max-steps", "3", "--no-progress"]) == 2
    assert f"cannot load {checkpoint / ckpt.STATE_FILE}" in capsys.readouterr().err
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    torch.save({"wte.weight": RunsCodeWhenUnpickled(marker)}, hf_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot be read as PyTorch weights"):
        read_weights(hf_dir)
    assert not marker.exists()


# --------------------------------------------------------------------------- 5. full disk


def test_a_full_disk_while_saving_is_a_clear_message_and_loses_nothing(corpus_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    class FullDisk:
        """A file on a disk that fills after 1000 bytes."""

        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    def torch_save(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) != 2:  # the first checkpoint saves normally
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as file:
            return real_save(obj, FullDisk(file), *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    assert main(train_argv(corpus_dir, out, "--max-steps", "4", "--save-every", "2")) == 2
    err = capsys.readouterr().err
    assert (f"error: no space left on the device holding {out} while saving step 4; the last checkpoint, step 2, "
            f"is intact ({out / 'ckpt_00000002'})") in err
    assert "Traceback" not in err and "inline_container" not in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt_00000002"]
    assert not list(out.glob(".ckpt_*"))  # nothing half-written left behind
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert ckpt.open_checkpoint(out).step == 4


def test_a_full_disk_while_appending_metrics_loses_no_checkpoint(corpus_dir, tmp_path, monkeypatch, capsys):
    from fusedgpt.train import runlog

    out = tmp_path / "run"

    class FillsUp:
        """The metrics file on a disk that fills after 600 bytes, mid-record."""

        def __init__(self, path, mode):
            self.file, self.room = open(path, mode), 600

        def write(self, text):
            if len(text) > self.room:
                self.file.write(text[: self.room // 2])
                self.file.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(text)
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(runlog, "open", FillsUp, raising=False)
    assert main(train_argv(corpus_dir, out, "--max-steps", "8", "--save-every", "2")) == 2
    assert "No space left on device" in capsys.readouterr().err
    last = ckpt.open_checkpoint(out)
    assert last.step >= 2 and not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--no-progress"]) == 0
    assert f"warning: {out / 'metrics.jsonl'}: line" in capsys.readouterr().err
    steps = [r["step"] for r in jsonl.read_records(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 9))  # every step once: none lost, none twice


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: room for one checkpoint of the tiny test model (~20 MiB), not two.
    Mounting needs privileges; without them the simulated full disks above still run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk_while_saving(corpus_dir, small_disk, capsys):
    out = small_disk / "run"
    assert main(train_argv(corpus_dir, out, "--max-steps", "4", "--save-every", "2", "--keep-last", "1")) == 2
    err = capsys.readouterr().err
    assert f"error: no space left on the device holding {out} while saving step 4; the last checkpoint, step 2" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt_00000002"]
    assert ckpt.open_checkpoint(out).step == 2 and not list(out.glob(".ckpt_*"))


def test_a_full_disk_in_safetensors_is_recognised(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, None, {})

    def full(*args, **kwargs):  # safetensors' own words for ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(ckpt.CheckpointWriteError, match="the last checkpoint, step 1, is intact"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, None, {})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000001"]


# --------------------------------------------------------------------------- 6. vocabularies


def test_a_config_claiming_more_tokens_than_the_weights_is_refused(tmp_path, capsys):
    from fusedgpt.model.config import GPTConfig
    from fusedgpt.model.gpt import GPT

    GPT(GPTConfig.from_preset("tiny", vocab_size=300, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 50257}))
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "says vocab_size=50257, but the weights' transformer.wte.weight has shape (300, 32)" in capsys.readouterr().err


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused_before_generating(tmp_path, capsys):
    from fusedgpt.model.config import GPTConfig
    from fusedgpt.model.gpt import GPT

    GPT(GPTConfig.from_preset("tiny", vocab_size=300, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "5", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "the tokenizer gpt2 has 50257 tokens, more than the model's 300" in captured.err
    assert captured.out == ""


def test_a_tokenizer_with_fewer_tokens_than_the_model_generates_only_its_own_ids(tmp_path, capsys):
    """Qwen3's layout (embedding rows past the tokenizer): the padded rows are made the
    likeliest, yet generation never picks one (it would have no text: KeyError mid-stream)."""
    from fusedgpt.model.config import GPTConfig
    from fusedgpt.model.gpt import GPT

    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50400, n_embd=32, n_head=2, backend="torch"))
    with torch.no_grad():
        model.lm_head.weight[50257:] *= 50.0  # tied: the padded ids' logits dwarf the others
    model.save_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "20", "--seed", "0",
                 "--prompt", "Hello", "--device", "cpu", "--backend", "torch"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


# --------------------------------------------------------------------------- 7. masked prompts


def test_mask_prompt_with_no_response_token_in_the_context_is_an_error_not_a_perfect_fit(tmp_path, capsys):
    long_input = "word " * 200  # the prompt alone fills the tiny preset's 128-token context
    examples = [{"instruction": "Repeat.", "input": long_input, "output": "ok"} for _ in range(6)]
    fdata.write_jsonl(tmp_path / "train.jsonl", examples)
    argv = ["finetune-instruct", "--data", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "train.jsonl"),
            "--mask-prompt", "--epochs", "1", "--batch-size", "2", "--responses", "0", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2
    captured = capsys.readouterr()
    assert "none of the 6 train" in captured.err and "with --mask-prompt nothing would be learned" in captured.err
    assert "loss 0.0000" not in captured.out and not ckpt.list_checkpoints(tmp_path / "none")

    examples[:2] = [{"instruction": "Say ok.", "input": "", "output": "ok"}] * 2
    fdata.write_jsonl(tmp_path / "train.jsonl", examples)
    assert main([*argv, "--out", str(tmp_path / "some")]) == 0
    printed = capsys.readouterr().out
    assert "warning: 4 of 6 train" in printed and "have no response token within the context" in printed
    assert "loss 0.0000" not in printed


# --------------------------------------------------------------------------- 8. damaged meta.json


@pytest.mark.parametrize("damage", [
    {"step": "two"},
    {"files": []},
    {"files": {"model.safetensors": "abc", "state.pt": None}},
    {"train": 5},
    {"train": {"lr": "fast"}},
    {"model": ["n_layer", 2]},
], ids=["step-text", "files-list", "files-entry", "train-number", "train-field", "model-list"])
def test_a_parseable_but_damaged_meta_falls_back_to_the_previous_checkpoint(two_checkpoints, capsys, damage):
    meta_path = two_checkpoints / "ckpt_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    if "train" in damage and isinstance(damage["train"], dict):
        damage = {"train": {**meta["train"], **damage["train"]}}
    meta_path.write_text(json.dumps({**meta, **damage}))
    assert main(["train", "--out", str(two_checkpoints), "--resume", "--max-steps", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"skipping a newer checkpoint: checkpoint {meta_path.parent}" in err
    assert f"using {two_checkpoints / 'ckpt_00000001'}" in err and "Traceback" not in err


# --------------------------------------------------------------------------- 10. smaller ones


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "seed must be an integer in [0, 2**32), got -1"),
    ("--lr", "1e39", "need 0 < lr <= 3.4e+38"),
])
def test_bad_numbers_are_refused_before_anything_runs(tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), flag, value, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing prepared, nothing trained
    assert main(["finetune-classify", "--out", str(out), flag, value, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_prepare_into_an_empty_mount_point_writes_inside_it(tmp_path, corpus_text, monkeypatch):
    (tmp_path / "a.txt").write_text(corpus_text[:3000])
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_rename = os.rename

    def rename(src, dst):  # what the kernel says to renaming a mount point, or across devices
        if Path(src) == mount or Path(dst) == mount:
            raise OSError(errno.EBUSY if Path(src) == mount else errno.EXDEV, "Device or resource busy")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    meta = prepare([tmp_path / "a.txt"], mount, val_fraction=0.1, progress=False)
    assert sorted(p.name for p in mount.iterdir()) == ["meta.json", "train_0000.bin", "val_0000.bin"]
    assert meta["train_shards"] == ["train_0000.bin"] and not list(tmp_path.glob(".mnt*"))
    # Replacing a preparation there cannot be done in one step: a clear error, the old one kept.
    with pytest.raises(OSError, match=f"cannot replace {mount} in one step: it is a mount point"):
        prepare([tmp_path / "a.txt"], mount, val_fraction=0.2, progress=False)
    assert json.loads((mount / "meta.json").read_text())["val_fraction"] == 0.1


def test_csv_with_a_bom_reads_and_latin1_is_named(tmp_path):
    (tmp_path / "bom.csv").write_bytes("text,label\nhello,greeting\n".encode("utf-8-sig"))
    assert fdata.read_labeled(tmp_path / "bom.csv") == [("hello", "greeting")]
    (tmp_path / "latin1.csv").write_bytes("text,label\nhello,greeting\ncaf\u00e9,drink\n".encode("latin-1"))
    with pytest.raises(fdata.FinetuneDataError, match=r"latin1.csv, line 3: not UTF-8 text \(byte 0xe9.*Latin-1"):
        fdata.read_labeled(tmp_path / "latin1.csv")


def test_a_run_started_with_relative_paths_resumes_and_generates_from_another_directory(corpus_text, tmp_path,
                                                                                        monkeypatch, capsys):
    from fusedgpt.model.tokenizer import save_bpe, train_bpe

    work = tmp_path / "work"
    work.mkdir()
    (work / "text.txt").write_text(corpus_text[:6000])
    save_bpe(train_bpe(corpus_text[:3000], 280), work / "tok.tiktoken")
    monkeypatch.chdir(work)
    argv = train_argv(Path("text.txt"), Path("run"), "--tokenizer", "tok.tiktoken", "--val-fraction", "0.1")
    assert main([*argv, "--max-steps", "2"]) == 0
    meta = ckpt.open_checkpoint(work / "run").meta
    assert (meta["train"]["data"], meta["tokenizer"]) == (str(work / "text.txt"), str(work / "tok.tiktoken"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(work / "run"), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(work / "run"), "--prompt", "KING", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("KING")


def test_inspecting_an_unknown_op_fails_listing_the_known_ones(capfd):
    assert main(["kernels", "inspect", "--op", "nope", "--arch", "sm_80"]) != 0
    assert "--op: unknown ['nope']; known: ['attention'" in capfd.readouterr().err
