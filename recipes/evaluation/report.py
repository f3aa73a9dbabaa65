"""Evaluation outputs: per-sample JSONL, a summary JSON and a Markdown table for a model card.

Files written under the output folder:

- ``samples/<benchmark>.jsonl``: one line per sample: ``id``, ``prompt``, ``output`` (generated text, or the letter
  probabilities / candidate log-likelihoods), ``answer``, ``parsed``/``correct`` (harness rules),
  ``parsed_strict``/``correct_strict`` (the benchmark's own rules; MMBench adds ``question_correct_strict``, its
  question under CircularEval, which ``accuracy_strict`` averages over questions), ``meta``.
- ``summary.json``: run settings and, under ``benchmarks.<name>``:
  ``accuracy`` (fraction, harness rules; the headline number), ``accuracy_strict`` (fraction or null),
  ``original`` / ``strict`` (all metric numbers), ``num_samples`` (scored), ``num_rows`` (read), ``dropped``
  (``total``, ``by_reason``, ``examples``: ``id``, ``reason`` and, for an undecodable row, ``detail``), ``seconds``, ``samples_per_second``, ``error`` (null, or why the
  benchmark could not run), ``paper`` (percentage or null, with the paper column) and benchmark extras
  (easy_vqa: ``majority_baseline``, ``chance_baseline``, ``majority_answers``, ``per_kind``).
- ``results.md``: the table.

Each file is replaced atomically (written beside it, then renamed), in UTF-8.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from .original_settings import ORIGINAL_MAX_NEW_TOKENS
from .paper_scores import PAPER, PAPER_SCORES


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def sample_records(result) -> list[dict]:
    per_sample = result.scores.per_sample if result.scores else [{} for _ in result.samples]
    records = []
    for sample, output, scored in zip(result.samples, result.outputs, per_sample):
        record = {"id": sample.sample_id, "prompt": sample.prompt, "output": output, "answer": sample.answer}
        record.update(scored)
        if sample.choices:
            record["choices"] = sample.choices
        record["meta"] = sample.meta
        records.append(_jsonable(record))
    return records


def benchmark_summary(result, with_paper: bool) -> dict:
    scores = result.scores
    original = scores.original if scores else {}
    strict = scores.strict if scores else None
    count = len(result.samples)
    summary = {
        "title": result.benchmark.title,
        "accuracy": original.get("accuracy"),
        "accuracy_strict": strict.get("accuracy") if strict else None,
        "original": original,
        "strict": strict,
        "num_samples": count,
        "num_rows": result.num_rows,
        "dropped": result.drops.as_dict(),
        "seconds": round(result.seconds, 3),
        "samples_per_second": round(count / result.seconds, 3) if result.seconds > 0 else None,
        "error": result.error,
    }
    if with_paper:
        summary["paper"] = PAPER_SCORES.get(result.benchmark.name)
    if scores:
        summary.update(scores.extra)
    return _jsonable(summary)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def decoding_description(settings: dict) -> str:
    """How the run decoded, as the table's note states it: the token budget actually used, not the original's."""
    budget = settings.get("max_new_tokens", ORIGINAL_MAX_NEW_TOKENS)
    original = "" if budget == ORIGINAL_MAX_NEW_TOKENS else f" (the original: {ORIGINAL_MAX_NEW_TOKENS})"
    return f"greedy, at most {budget} new tokens{original}, stop at `.` `,` newline"


def markdown_table(model: str, settings: dict, benchmarks: dict, with_paper: bool) -> str:
    """The model-card table: harness-rule and benchmark-rule scores (percent), paper column when asked."""
    has_baseline = any(b.get("majority_baseline") is not None for b in benchmarks.values())
    headers = ["Benchmark", "Samples", "Open-Qwen2VL harness rules", "Benchmark's own rules"]
    headers += ["Majority baseline"] if has_baseline else []
    headers += [f"Paper ({PAPER})"] if with_paper else []
    lines = [
        f"Evaluation of `{model}` (prompt format `{settings['prompt_format']}`, batch size {settings['batch_size']}"
        + (f", first {settings['limit']} rows per benchmark" if settings.get("limit") else "")
        + "). Scores are accuracy in percent.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for name, b in benchmarks.items():
        dropped = b["dropped"]["total"]
        samples = f"{b['num_samples']}" + (f" ({dropped} dropped)" if dropped else "")
        if b.get("error"):
            row = [b["title"], "failed: " + b["error"].splitlines()[0][:80].replace("|", "/"), "n/a", "n/a"]
        else:
            row = [b["title"], samples, _percent(b["accuracy"]), _percent(b["accuracy_strict"])]
        if has_baseline:
            row.append(_percent(b.get("majority_baseline")))
        if with_paper:
            paper = b.get("paper")
            row.append("n/a" if paper is None else f"{paper:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Harness rules: the prompts, decoding ({decoding_description(settings)}) and answer "
        "matching of the original Open-Qwen2VL evaluation code. Benchmark's own rules: the matching of each "
        "benchmark's official evaluator (VLMEvalKit exact matching for MMBench/SEED/MMStar, on MMBench with "
        "CircularEval: a question counts only when all its rotated copies are answered correctly; MathVista's "
        "normalisation, MMMU parsing without random credit, official VQA accuracy, POPE's yes/no rule, AI2D letters "
        "restricted to the question's options).",
    ]
    return "\n".join(lines) + "\n"


def _replace_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) beside ``path`` and move it into place: a reader (or a run killed mid-write) sees the
    old file or the new one, never a torn one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_reports(output: Path, model: str, settings: dict, results: list, with_paper: bool) -> dict:
    """Write the three outputs and return the summary. Everything is rendered before any file is replaced, and each
    file is replaced atomically, so a failure while reporting leaves the previous reports as they were."""
    output = Path(output)
    texts, benchmarks = {}, {}
    for result in results:
        name = result.benchmark.name
        texts[Path("samples") / f"{name}.jsonl"] = "".join(
            json.dumps(record, ensure_ascii=False) + "\n" for record in sample_records(result)
        )
        benchmarks[name] = benchmark_summary(result, with_paper)
    summary = {
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "paper_column": with_paper,
        "benchmarks": benchmarks,
    }
    texts[Path("summary.json")] = json.dumps(_jsonable(summary), indent=2, ensure_ascii=False) + "\n"
    texts[Path("results.md")] = markdown_table(model, settings, benchmarks, with_paper)
    (output / "samples").mkdir(parents=True, exist_ok=True)
    for relative, text in texts.items():
        _replace_atomically(output / relative, text)
    return summary
