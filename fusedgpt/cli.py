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

    from fusedgpt.train import data as data_module
    from fusedgpt.train import trainer as trainer_module

    prepare = commands.add_parser("prepare", help="tokenise text into uint16 shards with a train/val split")
    data_module.add_arguments(prepare)
    prepare.set_defaults(handler=data_module.run)
    train = commands.add_parser(
        "train", help="pretrain a GPT (no arguments: a small model on the bundled Shakespeare)"
    )
    trainer_module.add_arguments(train)
    train.set_defaults(handler=trainer_module.run)

    from fusedgpt.model import generate as generate_module

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    generate_module.add_arguments(generate)
    generate.set_defaults(handler=generate_module.run)

    from fusedgpt.train import finetune_classify, finetune_instruct

    classify_tune = commands.add_parser(
        "finetune-classify", help="fine-tune a GPT as a text classifier (no --data: comedy/history/tragedy speeches)"
    )
    finetune_classify.add_arguments(classify_tune)
    classify_tune.set_defaults(handler=finetune_classify.run)
    classify = commands.add_parser("classify", help="label texts with a classifier from finetune-classify")
    finetune_classify.add_predict_arguments(classify)
    classify.set_defaults(handler=finetune_classify.run_predict)
    instruct = commands.add_parser(
        "finetune-instruct", help="instruction fine-tuning on Alpaca-style data (no --data: a Shakespeare set)"
    )
    finetune_instruct.add_arguments(instruct)
    instruct.set_defaults(handler=finetune_instruct.run)
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
