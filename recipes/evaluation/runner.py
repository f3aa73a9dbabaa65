"""Evaluate a model on benchmarks: load -> build prompts -> predict in batches -> score -> report.

Rows are read, predicted and released in chunks, so a full benchmark never sits in memory as decoded images. Under
``accelerate launch`` each process takes every n-th row; predictions are gathered on the main process, which scores
and writes the reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .generation import Predictor
from .loading import select_rows
from .original_settings import ORIGINAL_MAX_NEW_TOKENS, ORIGINAL_STOP_TOKEN_IDS
from .prompts import PromptFormatter
from .registry import CANDIDATES, GENERATE, LETTER_PROBS, Benchmark, Scores, parse_benchmark_list
from .resume import PredictionSpool, sample_key
from .samples import DropLog, EvalSample, SampleError

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """How a run evaluates (everything except which model and which benchmarks)."""

    data_dir: Path | None = None
    limit: int | None = None
    batch_size: int = 8
    prompt_format: str = "raw"
    chat_template: str | None = None
    max_new_tokens: int = ORIGINAL_MAX_NEW_TOKENS
    show_progress: bool = True
    spool: PredictionSpool | None = None  # predictions kept as they are made, for --resume


@dataclass
class BenchmarkResult:
    """One benchmark's run: scored samples (images released) in row order, their outputs, the scores (main process
    only), the dropped rows, how many rows were read and the wall time (loading included)."""

    benchmark: Benchmark
    samples: list[EvalSample]
    outputs: list
    scores: Scores | None
    drops: DropLog
    num_rows: int
    seconds: float
    error: str | None = None  # set when the benchmark could not run at all (e.g. its data is not available)


def process_state():
    """accelerate's ``PartialState``. On a machine without CUDA, a multi-process launch (``torchrun``) needs
    ``cpu=True`` to become a gloo process group; without it every process would silently run the whole job."""
    import os

    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available())


def stop_token_ids(prompt_format: str, tokenizer) -> list[int]:
    """The original's stop list; the chat format also stops at the end of the assistant turn."""
    ids = list(ORIGINAL_STOP_TOKEN_IDS)
    if prompt_format == "chat" and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def predict(benchmark: Benchmark, predictor: Predictor, samples: list[EvalSample], options: EvalOptions) -> list:
    """Model outputs for ``samples``: texts, letter probabilities or candidate log-likelihoods (per ``method``)."""
    prompts = [s.prompt for s in samples]
    images = [s.images for s in samples]
    if benchmark.method == GENERATE:
        stops = stop_token_ids(options.prompt_format, predictor.tokenizer)
        return predictor.generate(prompts, images, options.max_new_tokens, stops)
    if benchmark.method == LETTER_PROBS:
        return predictor.letter_probabilities(prompts, images, benchmark.probability_letters)
    if benchmark.method == CANDIDATES:
        continuations = [benchmark.candidates(s, options.prompt_format) for s in samples]
        scored = predictor.continuation_scores(prompts, images, continuations)
        return [[log_likelihood for log_likelihood, _ in row] for row in scored]
    raise ValueError(f"{benchmark.name}: unknown method {benchmark.method!r}")


def build_sample(benchmark: Benchmark, dataset, index: int, formatter: PromptFormatter, drops: DropLog):
    """The sample of row ``index`` with its prompt, or None (counted in ``drops``) when the row cannot be used."""
    try:
        row = dataset[index]
    except Exception as err:  # noqa: BLE001 - a corrupt row (undecodable image, bad bytes) is dropped, not fatal
        # Counted under the error's type (messages name a file or an object address, different for every row) and
        # named by the row's own id, read without the columns that failed to decode.
        row_id = benchmark.row_id(_undecoded_row(dataset, index), index)
        drops.drop(row_id, f"unreadable row: {type(err).__name__}", detail=str(err))
        return None
    try:
        sample = benchmark.to_sample(row, index)
    except SampleError as err:
        drops.drop(benchmark.row_id(row, index), str(err), err.detail)
        return None
    sample.prompt = formatter(sample.text, sample.chat_text)
    sample.meta["row_index"] = index
    return sample


def _undecoded_row(dataset, index: int) -> dict:
    """Row ``index`` without its image (and other decoded) columns, for its id; {} when even that cannot be read."""
    from datasets.features.features import require_decoding

    try:
        plain = [name for name, feature in dataset.features.items() if not require_decoding(feature)]
        return dataset.select_columns(plain)[index]
    except Exception:  # noqa: BLE001 - only used to name the dropped row
        return {}


def evaluate_benchmark(
    benchmark: Benchmark, predictor: Predictor, options: EvalOptions, formatter: PromptFormatter, state=None
) -> BenchmarkResult:
    """Run one benchmark; every process returns the full result, but only the main one has scores."""
    state = state or process_state()
    start = time.perf_counter()
    dataset = benchmark.load(options.data_dir)
    benchmark.check_columns(dataset.column_names, str(options.data_dir or benchmark.hub_id or "the package"))
    dataset = select_rows(dataset, benchmark, options.limit)
    shard = list(range(state.process_index, len(dataset), state.num_processes))
    drops = DropLog(benchmark.name)
    chunk = max(4 * options.batch_size, 32)
    local: list[tuple[EvalSample, object]] = []
    show = options.show_progress and state.is_main_process
    done = options.spool.done(benchmark.name) if options.spool else {}  # predicted before an interruption
    if done:
        logger.info("%s: %d rows already predicted (--resume)", benchmark.name, len(done))
    stale = 0
    with tqdm(total=len(shard), desc=benchmark.name, unit="row", disable=not show) as bar:
        for begin in range(0, len(shard), chunk):
            indices = shard[begin : begin + chunk]
            samples = [build_sample(benchmark, dataset, i, formatter, drops) for i in indices]
            samples = [s for s in samples if s is not None]
            keys = {s.meta["row_index"]: sample_key(s) for s in samples}
            fresh = [s for s in samples if done.get(s.meta["row_index"], (None,))[0] != keys[s.meta["row_index"]]]
            stale += sum(s.meta["row_index"] in done for s in fresh)  # the row changed since it was predicted
            predicted = predict(benchmark, predictor, fresh, options) if fresh else []
            new = {s.meta["row_index"]: output for s, output in zip(fresh, predicted, strict=True)}
            if options.spool:
                options.spool.append(benchmark.name, [(i, keys[i], output) for i, output in new.items()])
            outputs = [new[i] if i in new else done[i][1] for i in (s.meta["row_index"] for s in samples)]
            for sample, output in zip(samples, outputs):
                sample.meta["num_images"] = len(sample.images)
                sample.images = []  # release decoded images; the reports do not need them
                local.append((sample, output))
            bar.update(len(indices))
    if stale:
        logger.warning("%s: %d earlier prediction(s) were for rows that have changed since; predicted again",
                       benchmark.name, stale)
    pairs, drops = _gather(local, drops, state)
    pairs.sort(key=lambda pair: pair[0].meta["row_index"])
    samples = [s for s, _ in pairs]
    outputs = [o for _, o in pairs]
    if not samples:  # a score of "n/a" with exit code 0 would pass for a finished evaluation
        raise NothingToScoreError(f"{benchmark.name}: no row could be evaluated: "
                                  f"{_no_rows_reason(drops, len(dataset))}")
    benchmark.check_samples(samples)  # every process: a failure here must fail the benchmark on all of them
    scores = benchmark.score(samples, outputs) if state.is_main_process else None
    return BenchmarkResult(benchmark, samples, outputs, scores, drops, len(dataset), time.perf_counter() - start)


class NothingToScoreError(ValueError):
    """A benchmark of which no row could be evaluated (an empty split, or every row dropped)."""


def _no_rows_reason(drops: DropLog, num_rows: int) -> str:
    if not num_rows:
        return "the split (after the row filter and --limit) has no rows"
    return f"all {num_rows} row(s) were dropped: {dict(drops.reasons)}"


def _gather(local: list, drops: DropLog, state):
    if state.num_processes == 1:
        return local, drops
    from accelerate.utils import gather_object

    pairs = gather_object(local)
    merged = DropLog(drops.benchmark)
    for part in gather_object([drops]):
        merged.reasons.update(part.reasons)
        merged.examples.extend(part.examples[: merged.max_examples - len(merged.examples)])
    return pairs, merged


def evaluate_model(
    model, processor, benchmark_names, options: EvalOptions, state=None, keep_going: bool = True
) -> list[BenchmarkResult]:
    """Evaluate an already loaded model on the named benchmarks (comma-separated string or list).

    With ``keep_going`` a benchmark that cannot run (data missing, wrong schema, ...) is logged with its traceback and
    reported with its ``error``, and the others still run; otherwise the exception propagates.
    """
    benchmarks = parse_benchmark_list(benchmark_names)
    state = state or process_state()
    predictor = Predictor(model, processor, options.batch_size, show_progress=False)  # one bar per benchmark instead
    formatter = PromptFormatter(options.prompt_format, processor, options.chat_template)
    results = []
    for benchmark in benchmarks:
        logger.info("evaluating %s", benchmark.name)
        start = time.perf_counter()
        try:
            results.append(evaluate_benchmark(benchmark, predictor, options, formatter, state))
        except Exception as err:  # noqa: BLE001 - one unavailable benchmark must not cost the others' results
            if not keep_going:
                raise
            logger.exception("%s could not be evaluated", benchmark.name)
            seconds = time.perf_counter() - start
            failed = BenchmarkResult(benchmark, [], [], None, DropLog(benchmark.name), 0, seconds)
            failed.error = f"{type(err).__name__}: {err}"
            results.append(failed)
    return results
