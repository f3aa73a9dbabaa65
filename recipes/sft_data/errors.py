"""Bad-sample reporting: a clear error naming the sample, or a counted, logged skip."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import Counter
from pathlib import Path

from ..json_lines import read_json_lines

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

    Skips happen wherever data is read: in the main process, in DataLoader worker processes (the collator, a
    streaming filter) and on every rank. Worker processes hold copies of this object, so their counts never reach
    the main process; with ``spool_dir`` set, every skip is also appended to a per-process file there, and
    :meth:`write` merges those files (counting each distinct skip once: every rank counts the same encode-stage skips
    of a cached map-style dataset, and a bad sample is met again in every epoch).

    Args:
        max_logged: how many skips are logged one by one (the rest are only counted).
        max_kept: how many (sample, reason) pairs are kept for the summary file.
        spool_dir: folder shared by all processes of the run (e.g. under the output folder), or None.
    """

    def __init__(self, max_logged: int = 20, max_kept: int = 1000, spool_dir: str | Path | None = None):
        self.counts: Counter = Counter()
        self.examples: list[dict] = []
        self.max_logged = max_logged
        self.max_kept = max_kept
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: BadSampleError, stage: str = "encode") -> None:
        record = {"sample_id": error.sample_id, "kind": error.kind, "detail": error.detail, "stage": stage}
        self.counts[error.kind] += 1
        if len(self.examples) < self.max_kept:
            self.examples.append(record)
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            spool = self.spool_dir / f"{socket.gethostname()}-{os.getpid()}.jsonl"
            with spool.open("a", encoding="utf-8") as handle:  # one short line per skip: a single append
                handle.write(json.dumps(record) + "\n")
        if self.total <= self.max_logged:
            logger.warning("skipping %s (%s stage; --skip_bad_samples is set)", error, stage)
        elif self.total == self.max_logged + 1:
            logger.warning("more bad samples are being skipped; only counting them from now on")

    def merge_spool(self) -> None:
        """Replace this process's counts with the distinct skips spooled by all processes (no-op without a spool)."""
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return
        records = {}
        for spool in sorted(self.spool_dir.glob("*.jsonl")):
            for _, record in read_json_lines(spool):  # a process killed mid-write leaves a torn last line
                records.setdefault(tuple(sorted(record.items())), record)
        self.counts = Counter(record["kind"] for record in records.values())
        self.examples = list(records.values())[: self.max_kept]

    def summary(self) -> str:
        return self.describe(self.counts)

    @staticmethod
    def describe(counts: Counter) -> str:
        """One line for skip counts by kind (this log's, or a part of them)."""
        if not counts:
            return "no samples skipped"
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        return f"skipped {sum(counts.values())} bad sample(s) ({parts})"

    def write(self, path: str | Path) -> None:
        """Write the counts and examples as JSON (after merging the spool of all processes, if there is one)."""
        self.merge_spool()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"total": self.total, "counts": dict(self.counts), "examples": self.examples},
                                   indent=2), encoding="utf-8")
