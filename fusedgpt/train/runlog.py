"""What a training or fine-tuning run reports while it runs, in one object: its records in
``OUT/metrics.jsonl``, the same figures in TensorBoard (``OUT/tensorboard``) when it is
installed, a progress bar with messages printed above it, and at the end the loss plot
``OUT/loss.png`` of every record (see :mod:`fusedgpt.train.plot`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from fusedgpt.io import jsonl, written

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """The reporting of one run, in ``out``. Use it as a context manager (or call
    :meth:`close`): closing draws the plot, also after an error.

    Args:
        total_steps: the steps the progress bar counts to; ``initial_step`` where it starts.
        resumed_at: for a run that continues from the checkpoint of this step, keep the
            records up to it (a run that went on past its last checkpoint logged steps
            that will now be run again); None starts the log empty.
        enabled: False for the processes of a distributed run other than the first: then
            nothing is written or shown.
        record_files: list the log and the plot among the files the command wrote
            (:mod:`fusedgpt.io.written`), at the start, at each evaluation and at the end.
    """

    def __init__(self, out: Path, *, total_steps: int, initial_step: int = 0, resumed_at: Optional[int] = None,
                 desc: str = "training", title: str = "", progress: bool = True, enabled: bool = True,
                 record_files: bool = False) -> None:
        from tqdm.auto import tqdm

        self.out = Path(out)
        self.metrics_path = self.out / METRICS_FILE
        self.plot_path = self.out / PLOT_FILE
        self.title = title
        self.enabled = enabled
        self.record_files = record_files and enabled
        self._file = None
        self._tensorboard = None
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            # read_records leaves out a line torn by a kill or a full disk, with a warning.
            kept = [] if resumed_at is None else [
                r for r in jsonl.read_records(self.metrics_path) if isinstance(r.get("step"), int) and r["step"] <= resumed_at]
            jsonl.rewrite(self.metrics_path, kept)
            self._file = open(self.metrics_path, "a")
            self._tensorboard = _tensorboard_writer(self.out)
            self._record_files(self.metrics_path)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not (enabled and progress))

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (which has a ``step``) to the metrics file, flushed so that a
        crash loses no record, and its numbers to TensorBoard."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(key, value, record["step"])
        if "val_loss" in record:
            self._record_files(self.metrics_path)

    def print(self, text: str) -> None:
        """Print ``text`` above the progress bar."""
        if not self.enabled:
            return
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def advance(self, **figures: str) -> None:
        """Count one step on the progress bar, showing ``figures`` (e.g. ``loss="3.21"``) beside it."""
        if figures:
            self.bar.set_postfix(figures, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Close the bar, the metrics file and TensorBoard, and plot every record."""
        from fusedgpt.train.plot import plot_run

        self.bar.close()
        if not self.enabled or self._file is None:
            return
        self._file.close()
        self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
        plot_run(jsonl.read_records(self.metrics_path), self.plot_path, self.title)
        self._record_files(self.metrics_path, self.plot_path,
                           *([self.out / TENSORBOARD_DIR] if self._tensorboard is not None else []))

    def _record_files(self, *paths: Path) -> None:
        if self.record_files:
            written.record_written(self.out, *paths)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _tensorboard_writer(out: Path):
    """A TensorBoard writer into ``OUT/tensorboard`` when TensorBoard is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / TENSORBOARD_DIR))
