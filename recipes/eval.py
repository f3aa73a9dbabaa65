"""Evaluate an Open-Qwen2VL model on the paper's benchmarks, batched, with the original harness's prompts and scoring.

    python recipes/eval.py --model <folder or hub id> \\
        --benchmarks mmbench,seedbench,mmstar,mathvista,ai2d,textvqa,pope,mmmu \\
        [--data-dir <local copies>] [--limit N] [--batch-size B] [--prompt raw|chat] --output <folder>

Several devices: ``accelerate launch --num_processes N recipes/eval.py ...`` (rows are split across processes; on a
CPU-only machine use ``torchrun --nproc_per_node N recipes/eval.py ...``).
Offline demo benchmark: ``--benchmarks easy_vqa`` (data from the easy-vqa package). ``--list-benchmarks`` shows
every benchmark with its Hub dataset. Outputs (see ``recipes/evaluation/report.py``): ``samples/<name>.jsonl``,
``summary.json`` and ``results.md`` in ``--output``. ``--download-to <dir>`` saves the evaluation splits once (network
needed) so that later runs with ``--data-dir <dir>`` need no network. Predictions are kept in ``<output>/.partial`` as
they are made: after an interruption, the same command with ``--resume`` predicts only the rows still missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing the kit

from recipes.evaluation.original_settings import ORIGINAL_MAX_NEW_TOKENS  # noqa: E402
from recipes.process_exit import destroy_process_group_if_any  # noqa: E402
from recipes.evaluation.registry import (  # noqa: E402
    UnknownBenchmarkError, get_benchmark, known_benchmarks, parse_benchmark_list,
)

PAPER_BENCHMARKS = "mmbench,seedbench,mmstar,mathvista,ai2d,textvqa,pope,mmmu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipes/eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder or Hub id (loaded with trust_remote_code)")
    parser.add_argument(
        "--benchmarks", default=PAPER_BENCHMARKS,
        help=f"comma-separated benchmark names, or 'all' (default: the paper's eight: {PAPER_BENCHMARKS})",
    )
    parser.add_argument("--output", type=Path, help="folder for samples/*.jsonl, summary.json, results.md")
    parser.add_argument("--data-dir", type=Path, default=None, help="local copies: <data-dir>/<benchmark name>")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each benchmark")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (the original used 1)")
    parser.add_argument(
        "--prompt", choices=["raw", "chat"], default="raw",
        help="raw: '<s>' + the original harness's prompt (default); chat: the processor's chat template",
    )
    parser.add_argument(
        "--chat-template", default=None,
        help="template name for --prompt chat, one of the processor's (chatml, compat); default: its default",
    )
    parser.add_argument("--max-new-tokens", type=int, default=ORIGINAL_MAX_NEW_TOKENS)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    parser.add_argument(
        "--paper-column", choices=["auto", "always", "never"], default="auto",
        help="add the paper's scores to the table (auto: when the model is an Open-Qwen2VL release)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the predictions an interrupted run with the same settings left in <output>/.partial",
    )
    parser.add_argument("--list-benchmarks", action="store_true", help="list the known benchmarks and exit")
    parser.add_argument(
        "--download-to", type=Path, default=None,
        help="save the evaluation split of each benchmark under this folder (for --data-dir later) and exit",
    )
    return parser


def list_benchmarks() -> str:
    lines = []
    for name in known_benchmarks():
        b = get_benchmark(name)
        source = f"{b.hub_id} (split {b.split})" if b.hub_id else "the easy-vqa PyPI package"
        lines.append(f"{name:12s} {b.title:34s} {source}")
    return "\n".join(lines)


def hide_library_progress_bars() -> None:
    """--no-progress covers the bars of datasets (loading, filtering a split) and transformers (loading weights)."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_progress:
        hide_library_progress_bars()
    if args.list_benchmarks:
        print(list_benchmarks())
        return 0
    try:  # empty entries ("mmbench,") are skipped and repeated names run once, as evaluate_model does
        benchmarks = parse_benchmark_list(known_benchmarks() if args.benchmarks.strip() == "all" else args.benchmarks)
    except UnknownBenchmarkError as err:
        parser.error(str(err))
    names = [benchmark.name for benchmark in benchmarks]
    if args.download_to:
        from recipes.evaluation.loading import save_local_copy

        for benchmark in benchmarks:
            where = save_local_copy(benchmark, args.download_to)
            print(f"{benchmark.name}: {where or 'no Hub dataset (read from its package)'}")
        return 0
    if not args.model or not args.output:
        parser.error("--model and --output are required")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be positive")
    if args.max_new_tokens < 1:  # otherwise every generated benchmark fails only after the model has loaded
        parser.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.chat_template is not None and args.prompt != "chat":
        parser.error("--chat-template applies to --prompt chat only (the raw prompt uses no template)")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from recipes.evaluation.model_loading import load_model_and_processor
    from recipes.evaluation.paper_scores import is_release
    from recipes.evaluation.prompts import PromptFormatter, PromptOptionError
    from recipes.evaluation.report import write_reports
    from recipes.evaluation.resume import close_spool, model_fingerprint, open_spool
    from recipes.evaluation.runner import EvalOptions, evaluate_model, process_state, stop_token_ids

    state = process_state()
    try:  # the template name is checked against the processor's before the model loads
        model, processor = load_model_and_processor(
            args.model, device=state.device, dtype=args.dtype,
            check_processor=lambda processor: PromptFormatter(args.prompt, processor, args.chat_template),
        )
    except PromptOptionError as err:
        parser.error(f"--chat-template: {err}")
    # What the predictions depend on: a resumed run reuses earlier ones only when all of it is unchanged.
    prediction_settings = {
        **model_fingerprint(args.model), "data_dir": args.data_dir and args.data_dir.resolve(), "limit": args.limit,
        "prompt_format": args.prompt, "chat_template": args.chat_template, "max_new_tokens": args.max_new_tokens,
        "dtype": str(model.dtype),
        "num_image_tokens": getattr(processor, "num_image_tokens", None),
    }
    spool = open_spool(args.output, prediction_settings, args.resume, state)
    options = EvalOptions(
        data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size, prompt_format=args.prompt,
        chat_template=args.chat_template, max_new_tokens=args.max_new_tokens, show_progress=not args.no_progress,
        spool=spool,
    )
    results = evaluate_model(model, processor, names, options, state)
    # Kept while a benchmark failed: a rerun with --resume then redoes only what is missing.
    finished = all(result.error is None for result in results)
    if not state.is_main_process:
        if finished:
            close_spool(spool, state)
        return 0
    with_paper = args.paper_column == "always" or (
        args.paper_column == "auto" and is_release(args.model, model.config)
    )
    settings = {
        "benchmarks": [r.benchmark.name for r in results],
        "prompt_format": args.prompt,
        "chat_template": args.chat_template,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "stop_token_ids": stop_token_ids(args.prompt, processor.tokenizer),
        "dtype": str(model.dtype),
        "device": str(state.device),
        "num_processes": state.num_processes,
        "num_image_tokens": getattr(processor, "num_image_tokens", None),
    }
    summary = write_reports(args.output, args.model, settings, results, with_paper)
    if finished:
        close_spool(spool, state)
    print((args.output / "results.md").read_text())
    for name, bench in summary["benchmarks"].items():
        if bench["dropped"]["total"]:
            print(f"{name}: dropped {bench['dropped']['total']} row(s): {bench['dropped']['by_reason']}")
    failed = [name for name, bench in summary["benchmarks"].items() if bench["error"]]
    if failed:
        print(f"could not evaluate: {', '.join(failed)} (see the log above and summary.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Data-quoting text (drop reasons, answers) must not crash a finished run under a non-UTF-8 locale.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    try:
        code = main()
    finally:  # see recipes/process_exit.py
        destroy_process_group_if_any()
    sys.exit(code)
