"""Plots of a run (loss curves and learning-rate schedule) and of benchmark results, drawn
with matplotlib on its Agg canvas: PNG files, with no display and no pyplot global state,
so plotting works on a headless machine and inside any other program."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

PathLike = Union[str, Path]
DPI = 100
# A log scale helps once values span this factor (a loss falling from 10.8 to 2, a sweep of
# throughputs across shapes); below it a linear scale reads more easily.
LOG_SCALE_SPAN = 3.0


def new_figure(width: float, height: float):
    """A matplotlib Figure of ``width`` x ``height`` inches on an Agg canvas, laid out so
    labels do not overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def scale_for(values: Sequence[float]) -> str:
    """``"log"`` for positive values spanning more than :data:`LOG_SCALE_SPAN`, else ``"linear"``."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > LOG_SCALE_SPAN * min(positive):
        return "log"
    return "linear"


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a finite ``key`` and a ``step``."""
    points = [(r["step"], float(r[key])) for r in records
              if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _tokens_per_step(records: Sequence[dict[str, Any]]) -> Optional[float]:
    """Tokens per optimizer step, from the last record that counts both (None if none does)."""
    counted = [r for r in records if r.get("tokens") and r.get("step")]
    return counted[-1]["tokens"] / counted[-1]["step"] if counted else None


def run_figure(records: Sequence[dict[str, Any]], title: str = ""):
    """The figure of a run's metrics records (``metrics.jsonl``): training loss at each
    logged step and validation loss at each evaluation (marked) against the optimizer step,
    log-scaled where they span a wide range; tokens seen on a second x axis on top when the
    records count ``tokens``; and, below, the learning rate when they carry ``lr``.
    Non-finite values are left out."""
    from matplotlib.ticker import EngFormatter

    train = _series(records, "train_loss")
    val = _series(records, "val_loss")
    lr = _series(records, "lr")
    figure = new_figure(8, 6 if lr[0] else 4.5)
    if lr[0]:
        loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        loss_axes, lr_axes = figure.subplots(), None
    loss_axes.plot(*train, color="C0", linewidth=1.2, label="training")
    loss_axes.plot(*val, "o-", color="C1", markersize=4, label="validation")
    loss_axes.set_yscale(scale_for(train[1] + val[1]))
    loss_axes.set_ylabel("loss (cross-entropy, nats/token)")
    loss_axes.grid(True, which="both", alpha=0.3)
    if train[0] or val[0]:
        loss_axes.legend()
    tokens_per_step = _tokens_per_step(records)
    if tokens_per_step:
        tokens_axis = loss_axes.secondary_xaxis(
            "top", functions=(lambda step: step * tokens_per_step, lambda tokens: tokens / tokens_per_step))
        tokens_axis.set_xlabel("tokens seen")
        tokens_axis.xaxis.set_major_formatter(EngFormatter())  # 100k, 1.5M
    if lr_axes is not None:
        lr_axes.plot(*lr, color="C2", linewidth=1.2)
        lr_axes.set_ylabel("learning rate")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_axes.grid(True, alpha=0.3)
    (lr_axes or loss_axes).set_xlabel("optimizer step")
    if title:
        figure.suptitle(title)
    return figure


def plot_run(records: Sequence[dict[str, Any]], path: PathLike, title: str = "") -> None:
    """Write :func:`run_figure` of ``records`` as a PNG at ``path``."""
    run_figure(records, title).savefig(path)


def bar_chart(path: PathLike, labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> None:
    """A PNG bar chart of a benchmark sweep: one bar per label, log-scaled where the values
    span a wide range."""
    figure = new_figure(max(6.0, 0.5 * len(labels)), 4.5)
    axes = figure.subplots()
    axes.bar(range(len(values)), values, color="C0")
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes.set_yscale(scale_for(values))
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, axis="y", which="both", alpha=0.3)
    figure.savefig(path)

