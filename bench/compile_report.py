"""Regenerate docs/compile-report.md: the ahead-of-time compile report of every launch a
workload makes x dtype x arch, with a per-op summary.

    python -m bench.compile_report [--workload gpt2] [--out docs/compile-report.md]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Optional

from bench import common
from fusedgpt.kernels.backend import interpreter_on


def summary(rows: list[dict]) -> list[dict]:
    """One line per op x pass x arch: builds, register range, max shared memory, MMA totals."""
    groups: dict = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["pass"], row["arch"])].append(row)
    lines = []
    for (op, pass_, arch), group in sorted(groups.items()):
        built = [r for r in group if "error" not in r]
        lines.append(dict(
            op=op, **{"pass": pass_}, arch=arch, builds=len(group), errors=len(group) - len(built),
            registers=f"{min(r['registers'] for r in built)}-{max(r['registers'] for r in built)}" if built else "",
            spill_bytes=sum(r["spill_bytes"] for r in built),
            max_shared=max((r["shared_bytes"] for r in built), default=0),
            shared_limit=group[0]["shared_limit"],
            hmma=sum(r["hmma"] for r in built), hgmma=sum(r["hgmma"] for r in built),
        ))
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("docs", "compile-report.md"))
    parser.add_argument("--workload", default="gpt2", help="one of gpt2, gpt2-xl, d128")
    args = parser.parse_args(argv)
    if interpreter_on():
        raise SystemExit("run without TRITON_INTERPRET: the report compiles the real kernels")

    from fusedgpt.kernels import compile_report as report

    workload = report.workload(args.workload)
    rows = report.report(workload_name=workload.name)
    problems = report.problems(rows)
    versions = common.versions()
    text = "\n\n".join([
        "# Compile report",
        f"Every kernel launch a training step of the `{workload.name}` workload makes ({workload}), "
        f"each autotune config the pruner keeps, compiled ahead of time for sm_80 and sm_90 on a machine "
        f"without a GPU as the JIT specialises it (`fusedgpt kernels inspect --workload {workload.name}`; "
        f"regenerate with `python -m bench.compile_report --workload {workload.name}`). Triton "
        f"{versions['triton']}, torch {versions['torch']}, commit {versions['commit']}, {versions['date']}. "
        f"The cost columns (per unit of work, from SASS) and the cycle model are a MODEL, not a "
        f"measurement: see [verification.md](verification.md), \"Static cost\".",
        f"**{len(rows)} builds, {len(problems)} problem(s)** (a problem is a failed build, a spill, or shared "
        f"memory over the per-block limit)." + "".join(f"\n- {p}" for p in problems),
        "## Summary per op and architecture",
        common.markdown_table(summary(rows), ["op", "pass", "arch", "builds", "errors", "registers", "spill_bytes",
                                              "max_shared", "shared_limit", "hmma", "hgmma"]),
        "## Every build",
        report.format_table(rows),
    ]) + "\n"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text)
    print(f"wrote {args.out}: {len(rows)} builds, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
