"""One command for borrowed GPU time: everything that needs CUDA, in priority order, within
a time budget.

    python -m bench.gpu_run --budget-s 480            # on a CUDA machine
    python -m bench.gpu_run --dry-run                 # anywhere: what it would run

Steps, most important first: the ``gpu``-marked tests (bf16 parity, which the interpreter
cannot check), the kernel benchmarks on the GPT-2 workload against torch eager, SDPA
(flash and cuDNN backends where present) and the installed peers (``bench.kernels``), then
end-to-end training tokens/s and MFU for the gpt2 preset with kernels on and off
(``bench.train``). Each step runs as a child process with what is left of the budget as its
time limit; a step that would start with less than ``--min-step-s`` left is skipped, and
one that runs out of time is stopped. Everything goes to ``bench/results/<gpu>-<date>/``:
each step's output, and ``gpu_run.md`` naming the GPU, driver, torch and Triton versions and
what ran, how long, and how it ended.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch

from bench import common

# (name, argv after `python`, share of the budget it may take at most)
STEPS: list[tuple[str, list[str], float]] = [
    ("gpu tests (bf16 parity)", ["-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"], 0.35),
    ("kernel benchmarks, gpt2 shapes, vs eager / SDPA flash+cuDNN / peers",
     ["-m", "bench.kernels", "--op", "all", "--dtype", "bf16", "--shapes", "gpt2", "--mode", "fwd+bwd",
      "--out", "{out}"], 0.4),
    ("end-to-end training, gpt2 preset, kernels on and off", ["-m", "bench.train", "--out", "{out}"], 1.0),
]


def environment() -> dict:
    """GPU, driver, CUDA, torch and Triton versions of this machine."""
    import triton

    found = dict(common.versions(), triton=triton.__version__)
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        try:
            found["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            found["driver"] = "unknown (nvidia-smi unavailable)"
    return found


def plan(budget_s: float, out: str) -> list[tuple[str, list[str], float]]:
    """The steps with their commands and their time caps (a share of the whole budget)."""
    return [(name, [a.replace("{out}", out) for a in argv], share * budget_s) for name, argv, share in STEPS]


def run_steps(steps, budget_s: float, min_step_s: float, out: str) -> list[dict]:
    """Run each step in order within what is left of the budget; never past it."""
    start = time.monotonic()
    done = []
    for name, argv, cap in steps:
        left = budget_s - (time.monotonic() - start)
        if left < min_step_s:
            done.append(dict(step=name, status=f"skipped: {left:.0f} s left of the budget", seconds=0.0))
            continue
        limit = min(cap, left)
        log_path = os.path.join(out, f"step{len(done) + 1}.log")
        began = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT)
            try:
                code = process.wait(timeout=limit)
                status = "passed" if code == 0 else f"exit {code}"
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                status = f"stopped at its {limit:.0f} s limit"
        done.append(dict(step=name, status=status, seconds=round(time.monotonic() - began, 1),
                         log=os.path.basename(log_path)))
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for everything")
    parser.add_argument("--min-step-s", type=float, default=30.0, help="skip a step with less than this left")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<gpu>-<date>)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    label = common.device_label(torch.device("cuda")) if torch.cuda.is_available() else "<gpu>"
    out = args.out or os.path.join("bench", "results", f"{label}-{common.versions()['date']}")
    steps = plan(args.budget_s, out)
    if args.dry_run:
        print(f"would write to {out}/ within {args.budget_s:.0f} s, in this order:")
        for index, (name, step_argv, cap) in enumerate(steps, 1):
            print(f"  {index}. {name} (at most {cap:.0f} s): python {' '.join(step_argv)}")
        return 0
    if not torch.cuda.is_available():
        print("bench.gpu_run needs a CUDA GPU and none is visible to torch; "
              "`python -m bench.gpu_run --dry-run` lists what it would run.", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    env = environment()
    results = run_steps(steps, args.budget_s, args.min_step_s, out)
    lines = [f"# GPU session: {env['gpu']}", "",
             f"Driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, Triton {env['triton']}, "
             f"commit {env['commit']}, {env['date']}; budget {args.budget_s:.0f} s "
             f"(`python -m bench.gpu_run --budget-s {args.budget_s:.0f}`).", "",
             common.markdown_table(results, ["step", "status", "seconds", "log"])]
    with open(os.path.join(out, "gpu_run.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
