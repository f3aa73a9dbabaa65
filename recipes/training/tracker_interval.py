"""What the trackers get every ``logging_steps``: figures of the whole interval since the last log, not of its last
step (transformers' Trainer likewise logs the mean loss since its last log). ``metrics.jsonl`` keeps every step.

- ``loss``: over all supervised tokens of the interval (each step's loss weighted by its supervised tokens, as the
  default ``loss_reduction=token`` weighs tokens within a step);
- ``tokens``, ``supervised_tokens``, ``documents_dropped``, ``seconds``: sums;
- ``tokens_per_s``: interval tokens / interval seconds; ``tflops_per_s`` and ``mfu``: step figures weighted by their
  seconds (total FLOPs / total time);
- ``grad_norm``: mean over the interval's steps; ``max_memory_gib``: the highest;
- ``lr``, ``epoch``: at the interval's last step.

A resumed run refills the interval with the steps since the last log from ``metrics.jsonl``, so the logged figures
are the same as an uninterrupted run's.
"""

from __future__ import annotations

SUMMED = ("tokens", "supervised_tokens", "documents_dropped", "seconds")
TIME_WEIGHTED = ("tflops_per_s", "mfu")
AT_LAST_STEP = ("lr", "epoch")


class IntervalMetrics:
    """Collects the per-step records of ``metrics.jsonl`` between two tracker logs."""

    def __init__(self, logging_steps: int):
        self.logging_steps = logging_steps
        self.records: list[dict] = []

    def refill(self, earlier_records: list[dict], start_step: int) -> None:
        """Take the steps of the interval a resumed run (at ``start_step``) is in from the run's earlier records."""
        first = start_step - start_step % self.logging_steps + 1
        self.records = [r for r in earlier_records if first <= r["step"] <= start_step]

    def add(self, record: dict) -> None:
        self.records.append(record)

    def pop_summary(self) -> dict:
        """The interval's figures (keys of the step records, None where no step had the value); starts a new one."""
        records, self.records = self.records, []
        if not records:
            raise ValueError("no step recorded since the last log")
        summary = {key: records[-1].get(key) for key in AT_LAST_STEP}
        for key in SUMMED:
            summary[key] = sum(r.get(key) or 0 for r in records)
        supervised = summary["supervised_tokens"]
        summary["loss"] = (sum(r["loss"] * r["supervised_tokens"] for r in records) / supervised if supervised
                           else sum(r["loss"] for r in records) / len(records))
        seconds = summary["seconds"]
        summary["tokens_per_s"] = summary["tokens"] / seconds if seconds > 0 else None
        for key in TIME_WEIGHTED:
            timed = [(r[key], r["seconds"]) for r in records if r.get(key) is not None]
            summary[key] = sum(v * s for v, s in timed) / seconds if timed and seconds > 0 else None
        norms = [r["grad_norm"] for r in records if r.get("grad_norm") is not None]
        summary["grad_norm"] = sum(norms) / len(norms) if norms else None
        memory = [r["max_memory_gib"] for r in records if r.get("max_memory_gib") is not None]
        summary["max_memory_gib"] = max(memory) if memory else None
        return summary


__all__ = ["IntervalMetrics"]
