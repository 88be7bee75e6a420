"""The ``fusedgpt`` command line: help with defaults, the shared device options, and which
errors become a one-line message (exit 2) and which keep their traceback."""

import argparse

import pytest
import torch

from fusedgpt import cli
from fusedgpt.train import trainer

MODEL_COMMANDS = ("train", "generate", "finetune-classify", "classify", "finetune-instruct")


def subcommand_parsers(parser: argparse.ArgumentParser, prefix: str = "fusedgpt"):
    """(name, parser) of every leaf command under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommand_parsers(sub, f"{prefix} {name}") if sub._subparsers else [(f"{prefix} {name}", sub)]


def options_needing_a_default(parser: argparse.ArgumentParser):
    """Options that take a value and may be left out: their help must say what they default to."""
    return [a for a in parser._actions if a.option_strings and not a.required and a.nargs != 0]


@pytest.mark.parametrize("name, parser", list(subcommand_parsers(cli.build_parser())), ids=lambda v: str(v)[:40])
def test_help_shows_every_options_default(name, parser):
    text = parser.format_help()
    missing = []
    for action in options_needing_a_default(parser):
        shown = parser._get_formatter()._get_help_string(action) if action.help else ""
        if "default" not in shown:
            missing.append(action.option_strings[0])
    assert missing == [], f"{name}: no default in the help of {missing}"
    assert "(default: " in text


def test_every_model_command_takes_the_same_device_options():
    commands = dict(subcommand_parsers(cli.build_parser()))
    for name in MODEL_COMMANDS:
        options = {s for a in commands[f"fusedgpt {name}"]._actions for s in a.option_strings}
        assert {"--device", "--backend"} <= options, name


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_an_indexed_cuda_device_parses_for_every_command(command):
    required = {"generate": ["--checkpoint", "x"], "classify": ["--checkpoint", "x", "some text"]}.get(command, [])
    args = cli.build_parser().parse_args([command, "--device", "cuda:1", *required])
    assert args.device == "cuda:1"


def test_a_malformed_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["train", "--device", "gpu1"])
    assert exit_info.value.code == 2
    assert "expected auto|cpu|cuda|cuda:N, got 'gpu1'" in capsys.readouterr().err


def test_train_rejects_a_missing_cuda_device_with_a_message(tmp_path, capsys):
    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has a cuda:1")
    code = cli.main(["train", "--device", "cuda:1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fusedgpt train: error: device 'cuda:1' was asked for") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_names_the_gpus_there_are(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["train", "--device", "cuda:1", "--out", str(tmp_path / "run")]) == 2
    assert "this machine has 1 CUDA device(s) (cuda:0 to cuda:0)" in capsys.readouterr().err


def test_a_deliberate_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--max-steps", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "fusedgpt train: error: max_steps must be a positive integer, got 0\n"


@pytest.mark.parametrize("bug", [TypeError("f() takes 1 argument"), RuntimeError("shape mismatch"), KeyError("x")])
def test_an_internal_bug_keeps_its_traceback(monkeypatch, bug):
    def broken(args):
        raise bug

    monkeypatch.setattr(trainer, "run", broken)
    with pytest.raises(type(bug)):
        cli.main(["train"])


def test_options_stored_before_the_backend_rename_still_read():
    # Runs saved before "kernels" was renamed "backend" store it in their training options.
    assert trainer.TrainConfig.from_dict({"kernels": "torch"}).backend == "torch"
    assert trainer.TrainConfig.from_dict({"kernels": "torch", "backend": "auto"}).backend == "auto"
