"""The ``fusedgpt`` command line (also ``python -m fusedgpt``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedgpt", description="GPT-2 on fused Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)

    kernels = commands.add_parser("kernels", help="kernel tools")
    kernel_commands = kernels.add_subparsers(dest="kernels_command", required=True)
    inspect = kernel_commands.add_parser(
        "inspect", help="ahead-of-time compile report for sm_80/sm_90 (registers, spills, shared memory, MMA)"
    )
    from fusedgpt.kernels import inspect as inspect_module

    inspect_module.add_arguments(inspect)
    inspect.set_defaults(handler=inspect_module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"fusedgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
