"""The run log shared by training and fine-tuning: records on disk as they come, resumed
logs cut back to the checkpoint, the plot at the end (also after an error)."""

import json

import pytest

from fusedgpt.io import written
from fusedgpt.train.runlog import RunLog


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_on_disk_at_once_and_the_plot_comes_at_the_end(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "train_loss": 1.0}\n')  # an earlier run's
    with RunLog(tmp_path, total_steps=2, progress=False) as log:
        assert lines(tmp_path / "metrics.jsonl") == []
        log.log({"step": 1, "train_loss": 3.0, "lr": 1e-3})
        assert lines(tmp_path / "metrics.jsonl") == [{"step": 1, "train_loss": 3.0, "lr": 1e-3}]
        assert not (tmp_path / "loss.png").exists()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "tr')
    with pytest.warns(UserWarning, match="line 6 is not a whole JSON record"):
        log = RunLog(tmp_path, total_steps=8, initial_step=3, resumed_at=3, progress=False)
    log.log({"step": 4, "train_loss": 0.5})
    log.close()
    assert [r["step"] for r in lines(path)] == [1, 2, 3, 4]


def test_the_plot_is_drawn_after_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="diverged"):
        with RunLog(tmp_path, total_steps=2, progress=False) as log:
            log.log({"step": 1, "train_loss": 3.0})
            raise RuntimeError("diverged")
    assert (tmp_path / "loss.png").is_file()


def test_other_ranks_write_nothing(tmp_path, capsys):
    with RunLog(tmp_path / "run", total_steps=2, enabled=False) as log:
        log.log({"step": 1, "train_loss": 3.0})
        log.print("hello")
        log.advance(loss="3.0")
    assert not (tmp_path / "run").exists() and capsys.readouterr().out == ""


def test_fine_tuning_lists_its_files_as_written(tmp_path):
    with RunLog(tmp_path, total_steps=1, progress=False, record_files=True) as log:
        log.log({"step": 1, "train_loss": 3.0})
        log.log({"step": 1, "epoch": 1, "val_loss": 2.5})
        assert written.foreign_files(tmp_path) == []  # recorded at the evaluation
    assert written.foreign_files(tmp_path) == []
