"""What a benchmark row becomes before the model sees it, and how bad rows are counted instead of crashing a run."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class SampleError(ValueError):
    """A row the harness cannot evaluate (missing image, unsupported option count, unreadable field ...).

    The message says why (rows dropped for the same cause share it: they are counted by message); ``detail`` holds
    what differs from row to row (a decoder's message), shown with the row's example. The caller adds which benchmark
    and row. Such rows are dropped and counted, never fatal.
    """

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


@dataclass
class EvalSample:
    """One evaluation item.

    ``text`` is the benchmark's instruction with ``<image>`` markers (no BOS, no chat wrapping: the run's prompt
    format adds those); ``images`` are PIL images in marker order; ``answer`` is the gold answer in the form the
    benchmark's scorers expect; ``choices`` maps option letters to option texts for multiple choice.
    """

    benchmark: str
    sample_id: str
    text: str
    images: list
    answer: Any
    choices: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    chat_text: str | None = None  # the user message for --prompt chat; None = derived from ``text``
    prompt: str = ""  # filled by the prompt formatter


@dataclass
class DropLog:
    """Counts rows dropped per reason and keeps the first few examples for the report."""

    benchmark: str
    max_examples: int = 20
    reasons: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def drop(self, row_id: str, reason: str, detail: str | None = None) -> None:
        """Count a dropped row under ``reason`` (shared by rows dropped for the same cause, so the counts add up);
        ``detail`` (e.g. the decoder's message) goes with the row's example only."""
        self.reasons[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"id": row_id, "reason": reason, **({"detail": detail} if detail else {})})
            logger.warning("%s: dropped row %s: %s%s", self.benchmark, row_id, reason, f": {detail}" if detail else "")
            if len(self.examples) == self.max_examples:
                logger.warning("%s: further dropped rows are counted in the summary, not logged", self.benchmark)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.reasons), "examples": list(self.examples)}
