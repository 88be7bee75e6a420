"""Run and benchmark plots: what the figure shows (axes, curves, scales), read back from
matplotlib's own objects, and that the files are PNGs of the expected size."""

import struct

import pytest

from fusedgpt.train import plot


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pretraining_records(steps=20, tokens_per_step=256):
    records = [{"step": 0, "val_loss": 10.9}]
    for step in range(1, steps + 1):
        records.append({"step": step, "train_loss": 10.9 * 0.9 ** step, "lr": 1e-3 * min(1.0, step / 5),
                        "tokens": step * tokens_per_step})
        if step % 10 == 0:
            records.append({"step": step, "val_loss": 11.0 * 0.9 ** step, "sample": "text"})
    return records


def test_the_run_figure_shows_both_curves_tokens_and_the_schedule():
    records = pretraining_records()
    figure = plot.run_figure(records, title="run")
    loss_axes, lr_axes = figure.axes[0], figure.axes[1]
    train_line, val_line = loss_axes.get_lines()
    assert list(train_line.get_xdata()) == list(range(1, 21))
    assert list(val_line.get_xdata()) == [0, 10, 20] and val_line.get_marker() == "o"
    assert [t.get_text() for t in loss_axes.get_legend().get_texts()] == ["training", "validation"]
    assert loss_axes.get_ylabel().startswith("loss") and loss_axes.get_yscale() == "log"  # 10.9 down to 1.3
    assert lr_axes.get_ylabel() == "learning rate" and lr_axes.get_xlabel() == "optimizer step"
    assert list(lr_axes.get_lines()[0].get_ydata())[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    tokens_axis = [child for child in loss_axes.get_children() if type(child).__name__ == "SecondaryAxis"]
    assert len(tokens_axis) == 1 and tokens_axis[0].get_xlabel() == "tokens seen"
    assert figure._suptitle.get_text() == "run"


def test_a_narrow_loss_range_stays_linear_and_no_rate_means_one_panel():
    records = [{"step": s, "train_loss": 2.0 + 0.01 * s} for s in range(1, 6)] + [{"step": 3, "val_loss": float("nan")}]
    figure = plot.run_figure(records)
    assert len(figure.axes) == 1
    axes = figure.axes[0]
    assert axes.get_yscale() == "linear" and axes.get_xlabel() == "optimizer step"
    assert len(axes.get_lines()[1].get_xdata()) == 0  # the NaN validation loss is left out


def test_plot_run_writes_a_png(tmp_path):
    plot.plot_run(pretraining_records(), tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (800, 600)
    plot.plot_run([], tmp_path / "empty.png")  # a run killed before its first record
    assert png_size(tmp_path / "empty.png") == (800, 450)


def test_bar_chart_log_scales_a_wide_sweep(tmp_path):
    plot.bar_chart(tmp_path / "sweep.png", ["a", "b", "c"], [1.0, 50.0, 900.0], "sweep", "GB/s")
    assert png_size(tmp_path / "sweep.png") == (600, 450)
    assert plot.scale_for([1.0, 50.0, 900.0]) == "log"
    assert plot.scale_for([10.0, 12.0]) == "linear" and plot.scale_for([0.0, 5.0]) == "linear"
