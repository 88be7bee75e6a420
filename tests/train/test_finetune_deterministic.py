"""``--deterministic`` on the fine-tuning commands: the flag, through the real command
line, into the config and the saved options; every step and epoch evaluation under the
strict setting; the caller's setting restored after, also when the run fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedgpt.cli import build_parser, main
from fusedgpt.io.checkpoint import open_checkpoint
from fusedgpt.kernels import attention
from fusedgpt.train import finetune
from fusedgpt.train import finetune_data as fdata
from tests.kernels.launches import record_launches

from .conftest import deterministic_setting

COMMANDS = ("finetune-classify", "finetune-instruct")


def tiny_argv(command: str, root: Path) -> list[str]:
    """A one-epoch run of ``command`` on a few short examples written under ``root``."""
    common = ["--out", str(root / "run"), "--epochs", "1", "--batch-size", "4", "--warmup-steps", "1", "--no-progress"]
    if command == "finetune-classify":
        fdata.write_csv(root / "train.csv", [{"text": f"{word} {i}", "label": word} for i in range(6)
                                             for word in ("apple", "iron")], ("text", "label"))
        return [command, "--data", str(root / "train.csv"), "--max-length", "4", *common]
    examples = [{"instruction": "Which kind of play?", "input": f"line {i}", "output": "comedy"} for i in range(10)]
    fdata.write_jsonl(root / "train.jsonl", examples[:8])
    fdata.write_jsonl(root / "val.jsonl", examples[8:])
    return [command, "--data", str(root / "train.jsonl"), "--val", str(root / "val.jsonl"), "--template", "phi3",
            "--responses", "0", *common]


def record_settings(monkeypatch, fail_at_step: int = 0) -> list[tuple[bool, bool]]:
    """The setting at each training step and epoch evaluation of the commands' runs, noted
    as :func:`finetune.train` calls their ``batch_loss`` and ``end_epoch``; with
    ``fail_at_step``, that step raises ZeroDivisionError instead."""
    seen: list[tuple[bool, bool]] = []
    train = finetune.train

    def recording(model, cfg, num_examples, batch_loss, end_epoch, **kwargs):
        def step(indices):
            seen.append(deterministic_setting())
            if len(seen) == fail_at_step:
                raise ZeroDivisionError
            return batch_loss(indices)

        def epoch(*args):
            seen.append(deterministic_setting())
            return end_epoch(*args)

        return train(model, cfg, num_examples, step, epoch, **kwargs)

    monkeypatch.setattr(finetune, "train", recording)
    return seen


@pytest.mark.parametrize("command", COMMANDS)
def test_the_flag_parses_into_the_config(command):
    on = finetune.config_from_args(build_parser().parse_args([command, "--deterministic"]))
    off = finetune.config_from_args(build_parser().parse_args([command]))
    assert (on.deterministic, off.deterministic) == (True, False)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_deterministic_finetune_is_strict_throughout_stored_and_restores_the_setting(command, tmp_path, monkeypatch,
                                                                                        capsys):
    seen = record_settings(monkeypatch)
    torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own setting
    assert main([*tiny_argv(command, tmp_path), "--deterministic"]) == 0, capsys.readouterr()
    assert len(seen) >= 3 and set(seen) == {(True, False)}  # every step and the evaluation: strict
    assert deterministic_setting() == (True, True)
    assert open_checkpoint(tmp_path / "run").meta["finetune"]["deterministic"] is True


def test_a_failing_deterministic_finetune_restores_the_setting(tmp_path, monkeypatch):
    seen = record_settings(monkeypatch, fail_at_step=2)
    with pytest.raises(ZeroDivisionError):
        main([*tiny_argv("finetune-instruct", tmp_path), "--deterministic"])
    assert seen == [(True, False)] * 2 and deterministic_setting() == (False, False)


def test_without_the_flag_the_callers_setting_stands(tmp_path, monkeypatch):
    seen = record_settings(monkeypatch)
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert main(tiny_argv("finetune-instruct", tmp_path)) == 0
    assert seen and set(seen) == {(True, True)} and deterministic_setting() == (True, True)


def test_the_attention_backward_of_a_deterministic_finetune_adds_no_atomics(tmp_path, monkeypatch):
    # The real kernels (on a CPU through the Triton interpreter, which otherwise takes the
    # fused backward): only the recompute backward's dK/dV kernel, never the fused one.
    monkeypatch.delenv(attention.BACKWARD_ENV, raising=False)
    launched = record_launches(monkeypatch, attention, ("_attn_bwd_fused", "_attn_bwd_dkdv"))
    assert main([*tiny_argv("finetune-classify", tmp_path), "--backend", "triton", "--deterministic"]) == 0
    assert launched and set(launched) == {"_attn_bwd_dkdv"}
