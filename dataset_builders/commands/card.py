"""``card``: (re)write a corpus folder's README.md with one `configs:` entry per subset folder."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "card", help="write the dataset card (README.md with configs:) of a corpus folder",
        description="Discover the subset folders (*_webdataset/ with tars) of a corpus root and write README.md so "
                    "that load_dataset(root, '<subset>') and streaming=True work.",
    )
    parser.add_argument("root", help="corpus folder (local or fsspec URL)")
    parser.add_argument("--path-hint", default=None, help="path or repo id to show in the card's examples")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..cards import write_dataset_card

    text = write_dataset_card(args.root, path_hint=args.path_hint)
    print(text.split("---", 2)[1].strip())
    return 0
