"""Regenerate docs/compile-report.md: the ahead-of-time compile report of every kernel
config x dtype x arch, with a per-op summary.

    python -m bench.compile_report [--out docs/compile-report.md]
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
    """One line per op x arch: builds, register range, max shared memory, MMA totals."""
    groups: dict = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["arch"])].append(row)
    lines = []
    for (op, arch), group in sorted(groups.items()):
        built = [r for r in group if "error" not in r]
        lines.append(dict(
            op=op, arch=arch, builds=len(group), errors=len(group) - len(built),
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
    args = parser.parse_args(argv)
    if interpreter_on():
        raise SystemExit("run without TRITON_INTERPRET: the report compiles the real kernels")

    from fusedgpt.kernels import compile_report as report

    rows = report.report()
    problems = report.problems(rows)
    versions = common.versions()
    text = "\n\n".join([
        "# Compile report",
        f"Every kernel configuration the dispatcher can launch, compiled ahead of time for sm_80 and "
        f"sm_90 on a machine without a GPU (`fusedgpt kernels inspect`; regenerate with "
        f"`python -m bench.compile_report`). Triton {versions['triton']}, torch {versions['torch']}, "
        f"commit {versions['commit']}, {versions['date']}. How to read it: "
        f"[verification.md](verification.md).",
        f"**{len(rows)} builds, {len(problems)} problem(s)** (a problem is a failed build, a spill, or shared "
        f"memory over the per-block limit)." + "".join(f"\n- {p}" for p in problems),
        "## Summary per op and architecture",
        common.markdown_table(summary(rows), ["op", "arch", "builds", "errors", "registers", "spill_bytes",
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
