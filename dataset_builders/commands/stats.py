"""``stats``: the accounting of a stage from its datatrove logging folder (e.g. after a Slurm run)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats", help="read = kept + dropped (by reason) of a stage, from its logging folder",
        description="Sum the per-task stats datatrove saved under <logging dir>/stats (completed tasks only).",
    )
    parser.add_argument("logging_dir", help="a stage's logging folder, e.g. <output>/.datatrove/score")
    parser.add_argument("--json", action="store_true", help="print json instead of one line")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from datatrove.io import get_datafolder

    from ..accounting import collect

    folder = get_datafolder(args.logging_dir)
    if not folder.isdir("stats") and not folder.isdir("completions"):
        # a mistyped folder would otherwise print "0 completed task(s): read 0 = kept 0" and succeed
        raise SystemExit(f"error: {args.logging_dir} is not a stage's logging folder (no stats/ or completions/ in "
                         "it); stages log under <output>/.datatrove/<stage>")
    accounting = collect(args.logging_dir)
    completed = len(folder.list_files("completions")) if folder.isdir("completions") else 0
    print(json.dumps({**accounting.to_dict(), "completed_tasks": completed}, indent=2) if args.json
          else f"{completed} completed task(s): {accounting.summary()}")
    return 0 if accounting.balanced else 1
