"""``reshard``: the selected samples, copied into new shards of N samples in a deterministic order."""

from __future__ import annotations

import argparse

from .common import add_executor_arguments, executor_config, report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reshard", help="write the selected samples into new shards of N samples (+ dataset card)",
        description="Copy the samples a selection keeps into shards of --shard-size samples (img2dataset layout, "
                    "tar + parquet). The order is global and deterministic (input shard order, then tar order), "
                    "independent of --tasks/--workers. With --subset, shards go to <output>/<subset folder> and "
                    "<output>/README.md is regenerated so load_dataset(<output>, <subset>) works.",
    )
    parser.add_argument("--input", required=True, help="folder (or fsspec URL) of the input *.tar shards")
    parser.add_argument("--selection", required=True, help="selection folder written by `select`")
    parser.add_argument("--output", required=True, help="corpus root with --subset, else the shard folder itself")
    parser.add_argument("--subset", default=None,
                        help="subset name (ccs, datacomp_dfn, datacomp_mlmf_su85, datacomp_mlmf_su85_union_dfn, "
                             "laion or your own): writes <output>/<its folder> and the dataset card")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per output shard (default 10000)")
    parser.add_argument("--verify-images", choices=("quick", "full"), default="full",
                        help="full (default): decode every image, so the corpus is guaranteed to load; quick: "
                             "header + truncation check only (faster, but JPEGs with corrupt scan data get through "
                             "and make load_dataset fail on them)")
    parser.add_argument("--missing-uid", choices=("derive", "drop"), default="derive")
    add_executor_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..cards import subset_folder, write_dataset_card
    from ..pipelines import run_reshard

    shards = f"{args.output.rstrip('/')}/{subset_folder(args.subset)}" if args.subset else args.output
    accounting = run_reshard(args.input, args.selection, shards, executor_config(args), shard_size=args.shard_size,
                             verify_images=args.verify_images, missing_uid=args.missing_uid)
    if args.subset and accounting is not None:
        write_dataset_card(args.output)
        print(f"dataset card: {args.output.rstrip('/')}/README.md")
    return report("reshard", accounting)
