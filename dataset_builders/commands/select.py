"""``select``: keep/drop decisions per sample from score rules, uid lists, image and text rules."""

from __future__ import annotations

import argparse

from .common import add_executor_arguments, executor_config, parse_named, report

EXAMPLES = """examples:
  # DataComp-medium, the paper's DataComp subset: MLM-Filter SU >= 85 united with the DFN uid list
  python -m dataset_builders select --input shards/ --output sel/su85_or_dfn \\
      --scores mlmf=scores/mlm_filter --uids dfn=datacomp_medium_dfn_20m_inds.npy \\
      --where "semantic_understanding_score >= 85 or dfn"
  # the best 30% by CLIP score, basic image and text rules
  python -m dataset_builders select --input shards/ --output sel/clip30 --scores clip=scores/clip \\
      --where "top(clip_score, 0.3)" --min-side 10 --max-aspect-ratio 4 --min-words 2 --drop-boilerplate
  # intersection of two earlier selections
  python -m dataset_builders select --input shards/ --output sel/both \\
      --selection a=sel/su85_or_dfn --selection b=sel/clip30 --where "a and b"
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "select", help="decide which samples to keep (score rules, uid lists, image/text rules, uid de-dup)",
        description="Write one decision parquet per input shard (key, uid, keep, reason) and _manifest.json. Rules "
                    "apply in order: text rules, image rules, --where; then uid de-duplication across all shards "
                    "(first kept occurrence wins). A --where that cannot be decided because a score is missing "
                    "drops the sample as missing_score.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="folder (or fsspec URL) of *.tar shards")
    parser.add_argument("--output", required=True, help="folder for the decision parquets")
    parser.add_argument("--where", default=None,
                        help='boolean rule over score columns, uid lists and selections, e.g. '
                             '"clip_score >= 0.28 and (dfn or semantic_understanding_score >= 85)", '
                             '"top(clip_score, 0.3)"; and/or/not, comparisons, + - * /, width, height')
    parser.add_argument("--scores", action="append", default=[], metavar="NAME=DIR",
                        help="score folder (from `score`); its numeric columns become names in --where")
    parser.add_argument("--uids", action="append", default=[], metavar="NAME=PATH",
                        help="DataComp uid list (.npy of u8,u8, e.g. the DFN release); NAME is true for listed uids")
    parser.add_argument("--selection", action="append", default=[], metavar="NAME=DIR",
                        help="an earlier selection folder; NAME is true where it kept the sample")
    text = parser.add_argument_group("text rules")
    text.add_argument("--keep-empty-captions", action="store_true", help="do not drop empty captions")
    text.add_argument("--min-words", type=int, default=0)
    text.add_argument("--min-chars", type=int, default=0)
    text.add_argument("--max-chars", type=int, default=0)
    text.add_argument("--drop-boilerplate", action="store_true",
                      help='drop placeholder captions ("image", "IMG_1234.jpg", "stock photo", "click to enlarge"...)')
    image = parser.add_argument_group("image rules")
    image.add_argument("--min-side", type=int, default=0, help="drop images whose shorter side is smaller")
    image.add_argument("--max-aspect-ratio", type=float, default=0.0, help="drop images longer/shorter above this")
    parser.add_argument("--no-dedup-uid", action="store_true", help="keep repeated uids")
    parser.add_argument("--metadata", choices=("auto", "parquet", "tar"), default="auto",
                        help="read sample metadata from the img2dataset parquets (fast), the tars, or auto")
    parser.add_argument("--missing-uid", choices=("derive", "drop"), default="derive")
    add_executor_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..pipelines import run_select
    from ..rules import ImageRules, TextRules
    from ..selection import SelectionRules

    rules = SelectionRules(
        where=args.where,
        scores=parse_named(args.scores, "--scores"),
        uid_lists=parse_named(args.uids, "--uids"),
        selections=parse_named(args.selection, "--selection"),
        text=TextRules(drop_empty=not args.keep_empty_captions, min_words=args.min_words, min_chars=args.min_chars,
                       max_chars=args.max_chars, boilerplate=args.drop_boilerplate),
        image=ImageRules(min_side=args.min_side, max_aspect_ratio=args.max_aspect_ratio),
    )
    accounting = run_select(args.input, args.output, rules, executor_config(args), metadata_source=args.metadata,
                            missing_uid=args.missing_uid, dedup_uid=not args.no_dedup_uid)
    return report("select", accounting)
