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


def main(argv: list[str] | None = None) -> int:
    """Run one stage; errors propagate (``python -m dataset_builders`` turns user errors into one line)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
