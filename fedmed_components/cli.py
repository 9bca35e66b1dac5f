"""The `fedmed` console script: a thin dispatcher over `fedmed_components.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedmed_components.data.document import InputError
from fedmed_components.errors import ModelError

# Each module registers its own subcommands; order is the order shown in --help.
COMMAND_MODULES = [
    "demo",
    "data",
    "eval",
    "train_local",
    "predict",
    "merge",
    "job",
    "poc",
    "experiment",
    "compare",
    "results",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmed",
        description=(
            "Federated QLoRA fine-tuning of LLMs for clinical information extraction (Fed-MedLoRA / Fed-MedLoRA+) on NVIDIA FLARE."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"fedmed_components.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (InputError, ModelError) as exc:  # the user's to fix: one line, no traceback
        print(f"fedmed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
