"""Bad-sample reporting: a clear error naming the sample, or a counted, logged skip."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A training sample that cannot be used as is. ``kind`` is a short category used to count skips."""

    def __init__(self, sample_id: str, kind: str, detail: str):
        self.sample_id = sample_id
        self.kind = kind
        self.detail = detail
        super().__init__(f"sample {sample_id!r}: {detail} [{kind}]")

    def as_reason(self) -> str:
        """One-line form stored in the ``skip_reason`` column: ``kind|sample_id|detail``."""
        return f"{self.kind}|{self.sample_id}|{self.detail}"

    @classmethod
    def from_reason(cls, reason: str) -> "BadSampleError":
        kind, sample_id, detail = reason.split("|", 2)
        return cls(sample_id, kind, detail)


class SkipLog:
    """Counts skipped samples by kind, logs the first ones in full and writes a JSON summary.

    Args:
        max_logged: how many skips are logged one by one (the rest are only counted).
        max_kept: how many (sample, reason) pairs are kept for the summary file.
    """

    def __init__(self, max_logged: int = 20, max_kept: int = 1000):
        self.counts: Counter = Counter()
        self.examples: list[dict] = []
        self.max_logged = max_logged
        self.max_kept = max_kept

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: BadSampleError, stage: str = "encode") -> None:
        self.counts[error.kind] += 1
        if len(self.examples) < self.max_kept:
            self.examples.append({"sample_id": error.sample_id, "kind": error.kind, "detail": error.detail,
                                  "stage": stage})
        if self.total <= self.max_logged:
            logger.warning("skipping %s (%s stage; --skip_bad_samples is set)", error, stage)
        elif self.total == self.max_logged + 1:
            logger.warning("more bad samples are being skipped; only counting them from now on")

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
        return f"skipped {self.total} bad sample(s) ({parts})"

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"total": self.total, "counts": dict(self.counts), "examples": self.examples},
                                   indent=2), encoding="utf-8")
