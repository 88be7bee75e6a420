"""Shared pieces of the benchmarks: timing, environment labels, output."""

from __future__ import annotations

import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence

import torch

from fusedgpt.kernels.backend import interpreter_on
from fusedgpt.train.plot import bar_chart  # noqa: F401  (the benchmarks plot with the package's helper)

CPU_WARNING = (
    "CPU SMOKE MODE: these timings come from the Triton interpreter / eager PyTorch on a CPU. "
    "They check that the harness runs and the results are correct; they are NOT GPU figures "
    "and say nothing about kernel speed."
)


def needs_interpreter_restart() -> bool:
    """Whether a CPU-only benchmark must start again with Triton's interpreter on: Triton
    decides when the kernels are imported whether they are interpreted."""
    return not interpreter_on() and not torch.cuda.is_available()


def restart_under_interpreter(module: str, argv: Sequence[str]) -> NoReturn:
    """Replace this process by ``python -m module argv`` with ``TRITON_INTERPRET=1``."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def time_ms(fn: Callable[[], object], device: torch.device, smoke: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds. On CUDA: ``triton.testing.do_bench``. In smoke mode:
    a few wall-clock repetitions, for the harness only."""
    if device.type == "cuda" and not smoke:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[0], samples[-1]


def results_dir(device: torch.device, out: Optional[str] = None, root: str = "bench/results") -> str:
    """Where a benchmark writes its results, created: ``out`` when given (``--out``), else
    ``ROOT/DEVICE-DATE``."""
    path = out or os.path.join(root, f"{device_label(device)}-{datetime.date.today().isoformat()}")
    os.makedirs(path, exist_ok=True)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
