"""Per-stage sample accounting: read = kept + dropped (by reason), summed over a stage's datatrove task stats.

Every step of the kit counts into datatrove's own per-step stats with three kinds of labels:
``read`` (samples a stage took in), ``kept`` (samples it wrote), ``dropped/<reason>`` (samples it lost, anywhere in
the pipeline), plus ``event/<name>`` for things that are not samples (a corrupt shard, a derived uid, a re-encoded
image, an unparsable score), and ``reclassified/<reason>`` for samples an earlier task of the stage counted as kept
and a later single task dropped (select's uid de-duplication: kept minus, dropped plus). Datatrove saves one stats
file per completed task (``stats/00000.json``), so summing those files gives the whole stage even when a rerun
skipped completed tasks.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from datatrove.io import DataFolder, DataFolderLike, get_datafolder
from datatrove.utils.stats import PipelineStats

READ = "read"
KEPT = "kept"
DROPPED = "dropped/"
EVENT = "event/"
RECLASSIFIED = "reclassified/"
# A stage's single follow-up task (select's uid de-duplication, pipelines.run_select) logs beside the stage's folder.
FOLLOW_UP_SUFFIX = "-finalize"
# The statistics files the stages leave beside their outputs, read by the demo's report and the release tool: each
# stage's read = kept + dropped in its executor folder (<output>/.datatrove/<stage>/), and the pack stage's
# <config>/packing_stats.json (fill, packs, drops by reason).
ACCOUNTING_FILE = "accounting.json"
PACKING_STATS_FILE = "packing_stats.json"


@dataclass
class Accounting:
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    tasks: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def balanced(self) -> bool:
        return self.read == self.kept + self.dropped_total

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": self.dropped_total,
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "events": dict(sorted(self.events.items())),
            "tasks": self.tasks,
            "balanced": self.balanced,
        }

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        text = f"read {self.read} = kept {self.kept} + dropped {self.dropped_total} ({reasons})"
        if self.events:
            text += "; events: " + ", ".join(f"{k}={v}" for k, v in sorted(self.events.items()))
        return text if self.balanced else text + "  [UNBALANCED: read != kept + dropped]"

    def __add__(self, other: "Accounting") -> "Accounting":
        return Accounting(
            self.read + other.read,
            self.kept + other.kept,
            dict(Counter(self.dropped) + Counter(other.dropped)),
            dict(Counter(self.events) + Counter(other.events)),
            self.tasks + other.tasks,
        )


def from_pipeline_stats(stats: PipelineStats) -> Accounting:
    """Fold one task's (or a merged) datatrove PipelineStats into an Accounting."""
    acc = Accounting(tasks=1)
    dropped: Counter = Counter()
    events: Counter = Counter()
    for step in stats.stats:
        for label, metric in getattr(step, "stats", {}).items():
            total = _total(metric)
            if label == READ:
                acc.read += total
            elif label == KEPT:
                acc.kept += total
            elif label.startswith(DROPPED):
                dropped[label[len(DROPPED) :]] += total
            elif label.startswith(EVENT):
                events[label[len(EVENT) :]] += total
            elif label.startswith(RECLASSIFIED):
                acc.kept -= total
                dropped[label[len(RECLASSIFIED) :]] += total
    acc.dropped, acc.events = dict(dropped), dict(events)
    return acc


def _total(metric) -> int:
    # Live stats are MetricStats; stats reloaded from json keep datatrove's compact form (a number or a dict).
    if isinstance(metric, dict):
        return int(metric.get("total", 0))
    if isinstance(metric, (int, float)):
        return int(metric)
    return int(metric.total)


def _sum_stats(folder: DataFolder) -> Accounting:
    total = Accounting()
    for name in folder.list_files("stats", glob_pattern="*.json") if folder.isdir("stats") else []:
        with folder.open(name, "rt") as handle:
            total = total + from_pipeline_stats(PipelineStats.from_json(json.load(handle)))
    return total


def collect(logging_dir: DataFolderLike) -> Accounting:
    """Sum the per-task stats files a datatrove executor wrote under ``logging_dir/stats``, plus the drops of the
    stage's follow-up task (``<logging_dir>-finalize``: select's uid de-duplication) when it has run; its task is
    not counted in ``tasks``."""
    folder = get_datafolder(logging_dir)
    total = _sum_stats(folder)
    follow_up = get_datafolder((folder.path.rstrip("/") + FOLLOW_UP_SUFFIX, folder.fs))
    if not folder.path.rstrip("/").endswith(FOLLOW_UP_SUFFIX) and follow_up.isdir("stats"):
        extra = _sum_stats(follow_up)
        total = total + Accounting(kept=extra.kept, dropped=extra.dropped, events=extra.events)
    return total


def write_accounting(folder: DataFolderLike, accounting: Accounting, **extra) -> None:
    """Store the stage's accounting as json (``ACCOUNTING_FILE``) in ``folder``."""
    with get_datafolder(folder).open(ACCOUNTING_FILE, "wt") as handle:
        json.dump({**accounting.to_dict(), **extra}, handle, indent=2)
