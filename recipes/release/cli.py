"""Build (and upload) Hugging Face repositories for a kit model or a kit corpus.

    python -m recipes.release model <folder> --repo-id <org/name> [--eval-table table.md] [--dry-run]
    python -m recipes.release dataset <folder> --repo-id <org/name> [--dry-run]

The repository content is first assembled and checked in a staging folder (``--staging``, default
``<folder>-release``; never the released folder or a folder around or inside it, and an existing one is only emptied
when this tool made it): for a model, the safetensors weights (``model.safetensors``, or the index and exactly the
shards it lists; a folder mixing them is refused), ``config.json`` with its ``auto_map``, the remote-code ``.py``
files, the processor and tokenizer files (refused when the processor's ``num_image_tokens`` or image size differs from
the config's), the generation config and a model card (with a Training section generated from what the training
recipes left: TRL's ``training_args.bin`` of an SFT output, ``pretrain_config.yaml`` and ``metrics.jsonl`` around a
pretraining ``final_model``; ``--training-notes`` is appended to it; a converted folder's card from
``convert_prismatic_to_hf`` is kept as its Conversion section, a README.md the user wrote as its Notes section with
its metadata merged (their keys and license kept, tags joined; a ``library_name`` or ``pipeline_tag`` other than the
release's is refused); only a Trainer's draft card, tagged ``generated_from_trainer``, is replaced; a card this tool
released, as a downloaded release holds it, gives back its Notes and Conversion sections, and its Training section
when the folder has no training files of its own); for a dataset, the shards with their per-shard metadata parquets,
the dataset card with its ``configs:`` block (its ``load_dataset`` snippets loading the repo id where they name the
folder or the card writer's ``path/to/this/folder``; the folder's own card is not edited) and the statistics files
the data stages write (``accounting.json``, ``packing_stats.json``). The checks: a model loads with
``AutoModelForImageTextToText`` in a fresh process with every weight matching ``config.json``; a dataset card's
recorded example counts match its files (a config must name files inside the folder); no staged text file holds an
absolute path of this machine (the eval table's model path becomes the repo id); no file is over the hub's 50 GB
limit. Nothing else in the folder is published (notes, TODO.md, checkpoints): the files left
out are named in the listing printed before any upload, and ``--include PATTERN`` (upload_folder's allow_patterns
syntax, repeatable) publishes them. Without ``--dry-run`` the repo id, the token and HF_HUB_OFFLINE are checked before
any staging; then the staging folder is uploaded as one commit with huggingface_hub's ``upload_folder`` (to
``--revision``, a branch created when missing, which the cards' ``from_pretrained``/``load_dataset`` snippets then
name as ``revision=``, on a dry run too); repository files of the kinds the tool writes that the staging folder
does not hold (an earlier release's weights or shards) are deleted in the same commit, other files are kept.
``--private`` creates a private repository and refuses to upload into an existing public one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .dataset_repo import build_dataset_repo
from .errors import ReleaseError
from .hub_upload import check_can_upload, check_file_sizes, check_repo_id, upload
from .listing import release_listing
from .model_repo import build_model_repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["model", "dataset"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--staging", type=Path, help="where to assemble the repository (default <folder>-release)")
    parser.add_argument("--eval-table", type=Path, help="Markdown table for the model card (from recipes/eval.py)")
    parser.add_argument("--training-notes", type=Path,
                        help="Markdown appended to the model card's generated Training section")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN",
                        help="also publish the folder's files matching PATTERN (relative to the folder, fnmatch as "
                             "upload_folder's allow_patterns; repeatable), e.g. --include 'docs/*.md'")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private; an existing public repository is refused")
    parser.add_argument("--revision", help="branch to commit to (created from main when missing; default main); the "
                                           "cards' loading snippets load it")
    parser.add_argument("--dry-run", action="store_true", help="only build the staging folder; upload nothing")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    if not folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    staging = (args.staging or folder.with_name(folder.name + "-release")).resolve()
    try:
        check_repo_id(args.repo_id)  # what can fail cheaply fails before the copy and the load check
        if not args.dry_run:
            check_can_upload()
        if args.kind == "model":
            build_model_repo(folder, staging, args.repo_id, args.eval_table, args.training_notes, args.include,
                             args.revision)
        else:
            build_dataset_repo(folder, staging, args.include, args.revision, args.repo_id)
        print(f"built {args.kind} repository content for {args.repo_id} in {staging}")
        print(release_listing(folder, staging, args.repo_id, args.kind))
        if args.dry_run:
            check_file_sizes(staging)  # upload() checks the sizes itself, before it contacts the hub
        else:
            print(f"uploaded: {upload(staging, args.repo_id, args.kind, args.private, args.revision)}")
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
