"""Bad-sample reporting: a clear error naming the sample, or a counted, logged skip.

Content a kept sample loses (a system turn the ``compat`` format cannot show) is reported the same way: a
:class:`DroppedContent` record, counted by kind in :class:`SkipLog` and summarised, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import Counter
from pathlib import Path

from ..json_lines import read_json_lines

logger = logging.getLogger(__name__)


class _Reason:
    """``kind``, ``sample_id`` and ``detail`` as one line, the form kept in a dataset column across processes."""

    sample_id: str
    kind: str
    detail: str

    def as_reason(self) -> str:
        """One-line form stored in the ``skip_reason`` / ``dropped_content`` columns: ``kind|{json of sample_id and
        detail}`` (kind first, for counting in Arrow; JSON, since a sample id or detail may hold a "|")."""
        return f"{self.kind}|{json.dumps([self.sample_id, self.detail])}"

    @classmethod
    def from_reason(cls, reason: str):
        kind, rest = reason.split("|", 1)
        sample_id, detail = json.loads(rest)
        return cls(sample_id, kind, detail)


class BadSampleError(_Reason, ValueError):
    """A training sample that cannot be used as is. ``kind`` is a short category used to count skips."""

    def __init__(self, sample_id: str, kind: str, detail: str):
        self.sample_id = sample_id
        self.kind = kind
        self.detail = detail
        super().__init__(f"sample {sample_id!r}: {detail} [{kind}]")


class DroppedContent(_Reason):
    """Content of a KEPT sample that its chat format cannot show; ``detail`` says why and how to keep it (the same
    text for every sample of a ``kind``, so a summary can show it once)."""

    def __init__(self, sample_id: str, kind: str, detail: str):
        self.sample_id = sample_id
        self.kind = kind
        self.detail = detail

    def __repr__(self) -> str:
        return f"DroppedContent({self.sample_id!r}, {self.kind!r}, {self.detail!r})"


class SkipLog:
    """Counts skipped samples by kind, logs the first ones in full and writes a JSON summary.

    Skips happen wherever data is read: in the main process, in DataLoader worker processes (the collator, a
    streaming filter) and on every rank. Worker processes hold copies of this object, so their counts never reach
    the main process; with ``spool_dir`` set, every skip is also appended to a per-process file there, and
    :meth:`write` merges those files (counting each distinct skip once: every rank counts the same encode-stage skips
    of a cached map-style dataset, and a bad sample is met again in every epoch).

    Kept samples that lost content (:class:`DroppedContent`) are counted apart, in ``dropped``: they still train.

    Args:
        max_logged: how many skips are logged one by one (the rest are only counted).
        max_kept: how many (sample, reason) pairs are kept for the summary file.
        spool_dir: folder shared by all processes of the run (e.g. under the output folder), or None.
    """

    def __init__(self, max_logged: int = 20, max_kept: int = 1000, spool_dir: str | Path | None = None):
        self.counts: Counter = Counter()
        self.examples: list[dict] = []
        self.dropped: Counter = Counter()  # kept samples that lost content, by kind
        self.dropped_examples: list[dict] = []
        self._local_dropped: Counter = Counter()  # the part counted by add_dropped_counts (not spooled)
        self._local_dropped_examples: list[dict] = []
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
        self._spool(record)
        if self.total <= self.max_logged:
            logger.warning("skipping %s (%s stage; --skip_bad_samples is set)", error, stage)
        elif self.total == self.max_logged + 1:
            logger.warning("more bad samples are being skipped; only counting them from now on")

    def add_dropped(self, note: DroppedContent, stage: str = "encode") -> None:
        """One kept sample's dropped content, met while a stream is read: counted and spooled like a skip; the first
        of each kind (in this process) is logged with its reason, the rest only counted (once per run, not per
        sample)."""
        record = {"sample_id": note.sample_id, "kind": note.kind, "detail": note.detail, "stage": stage, "kept": True}
        self.dropped[note.kind] += 1
        if len(self.dropped_examples) < self.max_kept:
            self.dropped_examples.append(record)
        self._spool(record)
        if self.dropped[note.kind] == 1:
            logger.warning("sample %r: %s [%s]; further ones are only counted (see the summary at the end)",
                           note.sample_id, note.detail, note.kind)

    def add_dropped_counts(self, counts: Counter, examples: list[DroppedContent], stage: str = "encode") -> None:
        """Dropped content counted over a whole map-style dataset (the caller logs one line for it). Every rank
        counts all of it, so nothing is spooled: a line per sample per rank would add up for nothing."""
        self.dropped.update(counts)
        self._local_dropped.update(counts)
        for note in examples[: max(0, self.max_kept - len(self.dropped_examples))]:
            record = {"sample_id": note.sample_id, "kind": note.kind, "detail": note.detail, "stage": stage,
                      "kept": True}
            self.dropped_examples.append(record)
            self._local_dropped_examples.append(record)

    def _spool(self, record: dict) -> None:
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            spool = self.spool_dir / f"{socket.gethostname()}-{os.getpid()}.jsonl"
            with spool.open("a", encoding="utf-8") as handle:  # one short line per record: a single append
                handle.write(json.dumps(record) + "\n")

    def merge_spool(self) -> None:
        """Replace this process's counts with the distinct skips (and dropped content) spooled by all processes, plus
        the dropped content this process counted over whole datasets (no-op without a spool)."""
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return
        records = {}
        for spool in sorted(self.spool_dir.glob("*.jsonl")):
            for _, record in read_json_lines(spool):  # a process killed mid-write leaves a torn last line
                records.setdefault(tuple(sorted(record.items())), record)
        skipped = [record for record in records.values() if not record.get("kept")]
        dropped = [record for record in records.values() if record.get("kept")]
        self.counts = Counter(record["kind"] for record in skipped)
        self.examples = skipped[: self.max_kept]
        self.dropped = self._local_dropped + Counter(record["kind"] for record in dropped)
        self.dropped_examples = (self._local_dropped_examples + dropped)[: self.max_kept]

    def summary(self) -> str:
        if not self.dropped:
            return self.describe(self.counts)
        reasons = {record["kind"]: record["detail"] for record in reversed(self.dropped_examples)}
        return f"{self.describe(self.counts)}; {self.describe_dropped(self.dropped, reasons)}"

    @staticmethod
    def describe(counts: Counter) -> str:
        """One line for skip counts by kind (this log's, or a part of them)."""
        if not counts:
            return "no samples skipped"
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        return f"skipped {sum(counts.values())} bad sample(s) ({parts})"

    @staticmethod
    def describe_dropped(counts: Counter, reasons: dict[str, str], of: int | None = None) -> str:
        """One line for kept samples that lost content, by kind, with each kind's reason once."""
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        why = "; ".join(reasons[kind] for kind in sorted(counts) if kind in reasons)
        total = f"{sum(counts.values())}" + (f" of {of}" if of is not None else "")
        return f"{total} conversation(s) kept with content dropped ({parts})" + (f": {why}" if why else "")

    def write(self, path: str | Path) -> None:
        """Write the counts and examples as JSON (after merging the spool of all processes, if there is one)."""
        self.merge_spool()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"total": self.total, "counts": dict(self.counts), "examples": self.examples,
                                    "dropped_content": {"counts": dict(self.dropped),
                                                        "examples": self.dropped_examples}},
                                   indent=2), encoding="utf-8")
