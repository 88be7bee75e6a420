"""The golden loss curve: a tiny model trained for a few steps on the CPU with the
reference kernels and a fixed seed must reproduce the stored trajectory, so a change to
the model, an op's reference, the data pipeline, the optimizer or the schedule cannot
change training unnoticed.

After an intended change, rewrite the curve with
``FUSEDGPT_UPDATE_GOLDEN=1 pytest tests/train/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fusedgpt.train.trainer import Trainer

from .conftest import tiny_config

GOLDEN = Path(__file__).with_name("golden_tiny.json")
STEPS = 16
# Far below what any real change moves (the curve is bitwise stable across thread counts
# here); the slack is for other CPUs and BLAS builds.
ATOL = 1e-4


def test_golden_loss_curve(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path, max_steps=STEPS, backend="torch", sample_tokens=0)
    result = Trainer(cfg).run()
    curve = {"train_loss": result.train_losses, "final_val_loss": result.val_losses[STEPS]}
    if os.environ.get("FUSEDGPT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"steps": STEPS, **curve}, indent=1) + "\n")
        pytest.skip(f"golden curve rewritten to {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert len(curve["train_loss"]) == golden["steps"] == STEPS
    for step, (got, want) in enumerate(zip(curve["train_loss"], golden["train_loss"]), start=1):
        assert abs(got - want) <= ATOL, f"step {step}: training loss {got!r}, golden {want!r}"
    assert abs(curve["final_val_loss"] - golden["final_val_loss"]) <= ATOL
    # The curve must show learning, or a broken optimizer could be frozen in as golden.
    assert golden["train_loss"][-1] < golden["train_loss"][0] - 0.5
