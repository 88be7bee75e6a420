"""Shared fixtures for the training tests: a small prepared corpus, a tiny run config, and
the process's deterministic-algorithms setting restored after every test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fusedgpt.model.tokenizer import shakespeare_path
from fusedgpt.train.data import prepare
from fusedgpt.train.trainer import TrainConfig

# The first ~100 kB of the bundled corpus: enough for windows, quick to tokenise.
CORPUS_CHARS = 100_000


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return shakespeare_path().read_text()[:CORPUS_CHARS]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, corpus_text) -> Path:
    """A prepared directory of the corpus slice (GPT-2 tokens, 5% validation)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(corpus_text)
    prepare([root / "text.txt"], root / "prepared", val_fraction=0.05, progress=False)
    return root / "prepared"


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    """A model and run small enough for a CPU test: 2 layers of width 32, 16-token windows."""
    base = TrainConfig(
        preset="tiny",
        model={"n_embd": 32, "n_head": 2},
        data=str(data),
        out=str(out),
        max_steps=6,
        batch_size=2,
        context_length=16,
        lr=3e-3,
        warmup_steps=2,
        eval_every=1000,
        eval_batches=1,
        sample_tokens=4,
        seed=7,
        progress=False,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when other work shares the
    cores (OpenMP threads then spin against each other)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def deterministic_setting() -> tuple[bool, bool]:
    """torch's deterministic-algorithms setting: (on, warn only)."""
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.fixture(autouse=True)
def keeps_the_deterministic_setting():
    """Whatever a test does (a --deterministic run included), the next one starts with the
    process's setting as it was."""
    before = deterministic_setting()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
