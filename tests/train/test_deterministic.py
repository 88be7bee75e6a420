"""``--deterministic``: the flag, the process-wide setting it turns on for the run and
restores after, the cuBLAS workspace variable, and the option kept on resume."""

from __future__ import annotations

import os

import pytest
import torch

from fusedgpt.cli import build_parser
from fusedgpt.train.trainer import Trainer, config_from_args, deterministic_algorithms, resolve_config

from .conftest import deterministic_setting, tiny_config

CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


class Recording(Trainer):
    """Notes the process's deterministic setting in every step and evaluation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[bool, bool]] = []

    def train_step(self, step):
        self.seen.append(deterministic_setting())
        return super().train_step(step)

    def evaluate(self):
        self.seen.append(deterministic_setting())
        return super().evaluate()


def test_the_flag_parses_into_the_config():
    on, _ = config_from_args(build_parser().parse_args(["train", "--deterministic"]))
    off, _ = config_from_args(build_parser().parse_args(["train"]))
    assert (on.deterministic, off.deterministic) == (True, False)


def test_a_deterministic_run_is_strict_throughout_and_restores_the_setting(corpus_dir, tmp_path):
    torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own setting
    trainer = Recording(tiny_config(corpus_dir, tmp_path, max_steps=2, deterministic=True))
    trainer.run()
    assert trainer.seen and set(trainer.seen) == {(True, False)}  # strict: not warn_only
    assert deterministic_setting() == (True, True)

    torch.use_deterministic_algorithms(False)
    failing = Recording(tiny_config(corpus_dir, tmp_path / "failing", deterministic=True))
    failing.train_step = lambda step: 1 / 0
    with pytest.raises(ZeroDivisionError):
        failing.run()
    assert deterministic_setting() == (False, False)


def test_without_the_option_the_callers_setting_stands(corpus_dir, tmp_path):
    torch.use_deterministic_algorithms(True)
    trainer = Recording(tiny_config(corpus_dir, tmp_path, max_steps=1))
    trainer.run()
    assert set(trainer.seen) == {(True, False)} and deterministic_setting() == (True, False)


def test_the_option_is_stored_and_kept_on_resume(corpus_dir, tmp_path):
    Trainer(tiny_config(corpus_dir, tmp_path, max_steps=2, deterministic=True)).run()
    cfg, checkpoint = resolve_config({"out": str(tmp_path), "resume": True, "max_steps": 3})
    assert checkpoint.meta["train"]["deterministic"] is True and cfg.deterministic
    resumed = Recording(cfg, resume_from=checkpoint)
    resumed.run()
    assert resumed.step == 3 and set(resumed.seen) == {(True, False)}


def test_cuda_gets_a_reproducible_cublas_workspace(monkeypatch):
    before = deterministic_setting()
    monkeypatch.delenv(CUBLAS, raising=False)
    with deterministic_algorithms(True, torch.device("cpu")):
        assert CUBLAS not in os.environ
    with deterministic_algorithms(False, torch.device("cuda")):
        assert CUBLAS not in os.environ
    with deterministic_algorithms(True, torch.device("cuda")):  # setting it needs no GPU
        assert os.environ[CUBLAS] == ":4096:8"
    monkeypatch.setenv(CUBLAS, ":16:8")
    with deterministic_algorithms(True, torch.device("cuda")):
        assert os.environ[CUBLAS] == ":16:8"
    monkeypatch.setenv(CUBLAS, ":0:0")
    with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG unset or one of :4096:8, :16:8; it is ':0:0'"):
        with deterministic_algorithms(True, torch.device("cuda")):
            pass
    assert deterministic_setting() == before
