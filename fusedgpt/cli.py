"""The ``fusedgpt`` command line (also ``python -m fusedgpt``)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Optional, Sequence

from fusedgpt.kernels.backend import BackendUnavailableError
from fusedgpt.train.trainer import TrainingDiverged


# (name, help, module, its function that adds the arguments, its function that runs)
COMMANDS = (
    ("prepare", "tokenise text into uint16 shards with a train/val split",
     "fusedgpt.train.data", "add_arguments", "run"),
    ("train", "pretrain a GPT (no arguments: a small model on the bundled Shakespeare)",
     "fusedgpt.train.trainer", "add_arguments", "run"),
    ("generate", "continue a prompt, streaming the text to stdout",
     "fusedgpt.model.generate", "add_arguments", "run"),
    ("finetune-classify", "fine-tune a GPT as a text classifier (no --data: comedy/history/tragedy speeches)",
     "fusedgpt.train.finetune_classify", "add_arguments", "run"),
    ("classify", "label texts with a classifier from finetune-classify",
     "fusedgpt.train.finetune_classify", "add_predict_arguments", "run_predict"),
    ("finetune-instruct", "instruction fine-tuning on Alpaca-style data (no --data: a Shakespeare set)",
     "fusedgpt.train.finetune_instruct", "add_arguments", "run"),
)
KERNEL_COMMANDS = (
    ("inspect", "ahead-of-time compile report for sm_80/sm_90 (registers, spills, shared memory, MMA)",
     "fusedgpt.kernels.compile_report", "add_arguments", "run"),
)


# What the commands raise on purpose, with a message written for the user: bad options and
# input (ValueError, and the project's errors derived from it: CheckpointError, DataError,
# FinetuneDataError, TokenizerFileError), files that cannot be read or written (OSError), a
# diverged run, and --backend triton where the kernels cannot run. Anything else is a bug,
# and its traceback is kept.
USER_ERRORS = (ValueError, OSError, TrainingDiverged, BackendUnavailableError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help says it in words
    (``default: ...``) or there is nothing to show (a flag, a required option, a positional)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default in (None, argparse.SUPPRESS) or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def _register(subcommands, name: str, help: str, module_name: str, add_arguments: str, run: str) -> None:
    module = importlib.import_module(module_name)
    command = subcommands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    getattr(module, add_arguments)(command)
    command.set_defaults(handler=getattr(module, run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedgpt", description="GPT-2 on fused Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    kernels = commands.add_parser("kernels", help="kernel tools")
    kernel_commands = kernels.add_subparsers(dest="kernels_command", required=True)
    for spec in KERNEL_COMMANDS:
        _register(kernel_commands, *spec)
    for spec in COMMANDS:
        _register(commands, *spec)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # Warnings are meant for the user here, not for a developer reading a source line.
        print(f"fusedgpt {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return int(args.handler(args) or 0)
        except USER_ERRORS as exc:
            print(f"fusedgpt {args.command}: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
