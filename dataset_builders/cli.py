"""Command-line entry for the data stages.

Each stage lives in its own module under ``dataset_builders/commands/`` and exposes
``register(subparsers) -> None``, which adds its subparser and sets ``func`` (called with the parsed args, returns an
exit code). Add a stage by adding its module name to ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib

COMMAND_MODULES: list[str] = ["score", "select", "reshard", "card", "stats", "pack"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataset_builders",
        description="Open-Qwen2VL data stages on datatrove: score, select, reshard and pack WebDataset corpora.",
    )
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dataset_builders.commands.{name}").register(subparsers)
    return parser


# Mistakes in the command (a missing folder, a bad rule, a changed output) end with one clear line, not a traceback.
USER_ERRORS = (FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        parser.exit(2, f"{parser.prog} {args.stage}: error: {error}\n")
